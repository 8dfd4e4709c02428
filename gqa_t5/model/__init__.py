"""The network: jax, flax.linen and numpy only (runs where TensorFlow is absent).

`T5Config` and `Transformer` are loaded on first use, so code that needs only the config (the
checkpoint readers) does not import flax.
"""

__all__ = ["T5Config", "Transformer"]


def __getattr__(name):
  if name == "T5Config":
    from gqa_t5.model.config import T5Config
    return T5Config
  if name == "Transformer":
    from gqa_t5.model.network import Transformer
    return Transformer
  raise AttributeError(f"module 'gqa_t5.model' has no attribute {name!r}")
