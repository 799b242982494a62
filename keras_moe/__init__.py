"""keras_moe: the Sparsely-Gated Mixture-of-Experts layer for Keras 3.

Shazeer et al. 2017, "Outrageously Large Neural Networks".
"""

from keras_moe import console as _console

_console.import_backend()

from keras_moe.gating import HierarchicalNoisyTopKGating  # noqa: E402
from keras_moe.gating import NoisyTopKGating  # noqa: E402
from keras_moe.gating import cv_squared  # noqa: E402
from keras_moe.gating import prob_in_top_k  # noqa: E402
from keras_moe.layers import HierarchicalMixtureOfExperts  # noqa: E402
from keras_moe.layers import MixtureOfExperts  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "HierarchicalMixtureOfExperts",
    "HierarchicalNoisyTopKGating",
    "MixtureOfExperts",
    "NoisyTopKGating",
    "cv_squared",
    "prob_in_top_k",
]
