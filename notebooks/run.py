"""Runs the notebooks top to bottom and saves them with their outputs.

`python notebooks/run.py [NOTEBOOK ...]` (or `make notebooks`): the full
versions (unset KERAS_MOE_QUICK), as committed. `make test` runs the quick
versions through `pytest --nbmake` instead and saves nothing.
"""

import glob
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.abspath(__file__))


def main(paths):
    paths = paths or sorted(glob.glob(os.path.join(HERE, "[0-9]*.ipynb")))
    for path in paths:
        start = time.time()
        notebook = nbformat.read(path, as_version=4)
        NotebookClient(
            notebook, timeout=7200, kernel_name="python3",
            resources={"metadata": {"path": HERE}},
        ).execute()
        nbformat.write(notebook, path)
        print(f"{os.path.basename(path)}: {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
