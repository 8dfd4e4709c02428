"""gqa_t5: grouped-query attention for T5.1.1 in JAX/Flax, the T5X way."""

import re
from pathlib import Path

from setuptools import find_packages, setup

_VERSION = re.search(r'__version__ = "([^"]+)"',
                     (Path(__file__).parent / "gqa_t5" / "__init__.py").read_text()).group(1)

# The network, decoding, checkpoints and trainer: enough for a GPU box without TensorFlow.
CORE = [
    "jax>=0.10",
    "flax>=0.12",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12",
    "numpy",
    "msgpack",
    "tensorstore",
    "safetensors",
    "etils",
    "gin-config>=0.5",
    "clu",
    "tensorboard",
    "matplotlib",
]
# seqio tasks, TFDS, metrics, vocabularies (TensorFlow).
DATA = [
    "seqio>=0.0.20",
    "tensorflow>=2.16",
    "tensorflow-text",
    "tensorflow-datasets>=4.9",
    "sentencepiece",
    "rouge-score",
    "sacrebleu",
]
# Parity tests against HF transformers. torch is pinned: an unpinned one pulls a CUDA build.
TEST = DATA + ["pytest", "pytest-xdist", "torch==2.13.0", "transformers>=4.40"]

setup(
    name="gqa_t5",
    version=_VERSION,
    description="GQA (Ainslie et al., 2023) for T5.1.1 in JAX/Flax with T5X-compatible pieces",
    long_description=(Path(__file__).parent / "README.md").read_text()
    if (Path(__file__).parent / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["gqa_t5", "gqa_t5.*"]),
    # The CPU decode kernels' source, compiled on first use (gqa_t5/model/cpu_kernels.py).
    package_data={"gqa_t5.model": ["cpu_kernels.cc"]},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        "data": DATA,
        "test": TEST,
        # t5x's own imports that its repository does not pin compatibly with ours. t5x, airio and
        # jestimator (PyPI's 0.3.3 fails to import on jax 0.10) come from their repositories with
        # `pip install --no-deps` after this extra: gin/t5x/README.md has the recipe. Nothing
        # here imports t5x.
        "t5x": ["grain", "fiddle", "jaxtyping", "cached_property"],
        # TPU's compiler (libtpu, about 700 MB installed), pinned by jax to its own version:
        # `gqa-t5 compile` and `--dry_run_tpu` compile for TPU v4 slices on this machine.
        "tpu": ["jax[tpu]>=0.10"],
    },
    entry_points={"console_scripts": ["gqa-t5=gqa_t5.cli:main"]},
)
