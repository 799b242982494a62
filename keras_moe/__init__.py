"""keras_moe: the Sparsely-Gated Mixture-of-Experts layer for Keras 3.

Shazeer et al. 2017, "Outrageously Large Neural Networks".
"""

from keras_moe.gating import HierarchicalNoisyTopKGating
from keras_moe.gating import NoisyTopKGating
from keras_moe.gating import cv_squared
from keras_moe.gating import prob_in_top_k
from keras_moe.layers import HierarchicalMixtureOfExperts
from keras_moe.layers import MixtureOfExperts

__version__ = "0.1.0"

__all__ = [
    "HierarchicalMixtureOfExperts",
    "HierarchicalNoisyTopKGating",
    "MixtureOfExperts",
    "NoisyTopKGating",
    "cv_squared",
    "prob_in_top_k",
]
