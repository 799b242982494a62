"""Clean output for the package's command-line programs.

The `tensorflow` wheel logs oneDNN/CUDA notices from C++ while it is
imported (and a cuInit error on machines without a GPU); no environment
variable silences them. When the package is imported by one of its own
programs (`python -m keras_moe.<module>`, a `keras-moe-*` script, or with
`KERAS_MOE_QUIET=1`), the backend is imported with file descriptor 2
pointed at /dev/null, then stderr is restored. A library import by user
code is left alone: those messages can matter on a GPU machine.

This module imports nothing heavy, so the package can use it first.
"""

import os
import sys


def is_command_line():
    """True while one of the package's command-line programs starts.

    Those parse their arguments before importing the backend, so that
    `--help` and usage errors answer at once.
    """
    program = sys.argv[0] if sys.argv else ""
    # While `python -m keras_moe.x` imports the package, argv[0] is "-m".
    return program == "-m" or os.path.basename(program).startswith("keras-moe")


def _is_own_program():
    return os.environ.get("KERAS_MOE_QUIET") == "1" or is_command_line()


def import_backend():
    """Imports Keras (and TensorFlow) quietly when run as our program."""
    if "keras" in sys.modules or not _is_own_program():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import keras

        # TensorFlow too on other backends: the programs use tf.data and
        # TensorBoard, and it logs the same notices when imported later.
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
        # Device discovery logs too (cuInit); listing physical devices
        # does not start the runtime, so virtual devices can still be set.
        tf.config.list_physical_devices()
        del keras
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)
