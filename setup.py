"""Packaging for synthunlearn.

Versions are pinned to the ranges this project is tested with; constraints.txt holds the exact
version of every package, transitive ones too, that ``make setup`` installs. torch is installed
first by ``make setup`` (``torch==2.13.0``, the CPU build on CI machines); the range below admits
it so pip does not replace it with another build.
"""
from setuptools import find_namespace_packages, setup

setup(
    name="synthunlearn",
    version="0.1.0",
    description=(
        "SFT and lower-bounded unlearning of synthetic-data pattern overfitting for LLMs, "
        "on DeepSpeed ZeRO, with fused linear log-prob/KL kernels"
    ),
    # Namespace packages so data-only folders (synthunlearn/assets/...) ship as package data.
    packages=find_namespace_packages(include=["synthunlearn", "synthunlearn.*"]),
    package_data={"synthunlearn": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.11",  # transformers 5.23 and matplotlib 3.11 need it
    install_requires=[
        "torch>=2.13,<2.15",
        "deepspeed==0.19.8",
        "transformers==5.23.0",
        "accelerate==1.15.0",  # transformers needs it to load models under ZeRO-3 (zero.Init)
        "datasets==5.2.0",
        "tokenizers>=0.23,<0.24",
        "safetensors>=0.8,<0.9",
        "triton==3.9.0",
        "ninja>=1.13,<1.14",
        "tqdm>=4.70,<5",
        "pyyaml>=6.0,<7",
        "numpy>=2.0,<3",
        "matplotlib==3.11.2",  # the evaluation report's headline plot
    ],
    extras_require={
        "dev": [
            "pytest>=9.2,<10",
            "pytest-timeout>=2.4,<3",
        ],
    },
)
