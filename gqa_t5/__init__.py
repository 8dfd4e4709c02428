"""gqa_t5: grouped-query attention for T5.1.1 in JAX/Flax (Ainslie et al., 2023).

Nothing is imported eagerly here: `import gqa_t5` must stay cheap and must not pull in
TensorFlow, seqio or gin. Import the layer you need (`gqa_t5.model`, `gqa_t5.decoding`, ...).
"""

__version__ = "0.1.0"
