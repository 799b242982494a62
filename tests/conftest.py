"""Test set-up: keep Keras out of the home directory and TF quiet."""

import os
import tempfile

os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="keras_home_"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts with a fresh global policy and session."""
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()


@pytest.fixture
def classes_always(monkeypatch):
    """Capacity classes on every dropless batch, 3 classes."""
    from keras_moe import dispatch

    monkeypatch.setattr(dispatch, "NUM_CLASSES", 3)
    monkeypatch.setattr(dispatch, "CLASSES_MIN_ROWS", 0)
    monkeypatch.setattr(dispatch, "CLASSES_MIN_ROWS_PER_EXPERT", 0)
