"""The network: jax, flax.linen and numpy only (runs where TensorFlow is absent)."""

from gqa_t5.model.config import T5Config
from gqa_t5.model.network import Transformer

__all__ = ["T5Config", "Transformer"]
