"""Running a test scenario in a fresh Python process.

Device set-up (logical CPUs, XLA host devices), the Keras backend and
process-wide switches (op determinism) must be chosen before TensorFlow or
JAX initialise, so such tests run their code in a subprocess.
"""

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _environment(tmp_path, env_extra):
    env = dict(os.environ, KERAS_HOME=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_CONFIG", None)
    env.update(env_extra or {})
    return env


def _command(code):
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r})\n" + code]


def start_python(code, tmp_path, env_extra=None):
    """Starts `code` like `run_python` without waiting; returns the Popen.

    For scenarios of several processes at once (workers of one cluster);
    collect them with `wait_all`.
    """
    return subprocess.Popen(
        _command(code), env=_environment(tmp_path, env_extra), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_all(processes, timeout=600):
    """Waits for every process (killing the rest on a failure or time-out);
    asserts each exited 0 and printed DONE; returns their stdouts."""
    outputs = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            assert process.returncode == 0 and "DONE" in stdout, (
                stdout[-2000:] + stderr[-4000:]
            )
            outputs.append(stdout)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return outputs


def run_module(module, arguments, tmp_path, env_extra=None, timeout=300):
    """Runs `python -m module arguments...` as `run_python` runs code, but
    asserts nothing; returns the `subprocess.CompletedProcess` (for exit
    statuses and error output)."""
    return subprocess.run(
        [sys.executable, "-m", module, *arguments],
        env=_environment(tmp_path, env_extra), capture_output=True,
        text=True, timeout=timeout, cwd=ROOT,
    )


def run_python(code, tmp_path, env_extra=None, timeout=900):
    """Runs `code` with the repository importable; asserts it printed DONE.

    `KERAS_HOME` goes to `tmp_path`, TensorFlow's C++ logs are off and no
    inherited `TF_CONFIG` leaks in; `env_extra` is applied last. Returns the
    process's stdout.
    """
    result = subprocess.run(
        _command(code), env=_environment(tmp_path, env_extra),
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )
    assert result.returncode == 0 and "DONE" in result.stdout, (
        result.stdout[-3000:] + result.stderr[-4000:]
    )
    return result.stdout


def free_ports(count):
    """`count` TCP ports of 127.0.0.1 that are free now."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports
