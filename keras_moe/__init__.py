"""keras_moe: the Sparsely-Gated Mixture-of-Experts layer for Keras 3.

Shazeer et al. 2017, "Outrageously Large Neural Networks".
"""

import importlib

from keras_moe import console as _console

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC = {
    "ExpertChoiceGating": "gating",
    "HierarchicalMixtureOfExperts": "layers",
    "HierarchicalNoisyTopKGating": "gating",
    "MixtureOfExperts": "layers",
    "NoisyTopKGating": "gating",
    "SoftmaxTopKGating": "gating",
    "cv_squared": "gating",
    "prob_in_top_k": "gating",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'keras_moe' has no attribute {name!r}")
    _console.import_backend()
    return getattr(importlib.import_module(f"keras_moe.{_PUBLIC[name]}"), name)


# A library import registers the layers with Keras' serialisation at once
# (so `keras.models.load_model` finds them). The package's own programs
# import them after parsing their arguments instead, so that `--help` and
# usage errors do not wait for TensorFlow.
if not _console.is_command_line():
    _console.import_backend()
    for _name in __all__:
        globals()[_name] = __getattr__(_name)
    del _name
