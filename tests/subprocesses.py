"""Running a test scenario in a fresh Python process.

Device set-up (logical CPUs, XLA host devices), the Keras backend and
process-wide switches (op determinism) must be chosen before TensorFlow or
JAX initialise, so such tests run their code in a subprocess.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, tmp_path, env_extra=None, timeout=900):
    """Runs `code` with the repository importable; asserts it printed DONE.

    `KERAS_HOME` goes to `tmp_path`, TensorFlow's C++ logs are off and no
    inherited `TF_CONFIG` leaks in; `env_extra` is applied last. Returns the
    process's stdout.
    """
    env = dict(os.environ, KERAS_HOME=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    env.update(env_extra or {})
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r})\n" + code],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )
    assert result.returncode == 0 and "DONE" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-4000:]
    )
    return result.stdout
