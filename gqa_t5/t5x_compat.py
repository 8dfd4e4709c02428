"""Handing our network to t5x, where t5x is installed (it is not on PyPI; never a hard import).

`Transformer` already has t5x's `EncoderDecoder` interface (`encode`, `decode(..., decode=True,
max_decode_length=...)`, `__call__`, a mutable `cache` collection whose only non-batch-leading
leaves are named `cache_index`, as t5x's `decoding.cache_map` expects), so t5x's own
`EncoderDecoderModel` can wrap it directly:

  from gqa_t5 import t5x_compat
  model = t5x_compat.t5x_model(T5Config(..., num_kv_heads=8), vocabulary, optimizer_def)

In gin, bind `t5x.models.EncoderDecoderModel.module = @network.Transformer()` after
`from gqa_t5.model import network`, as gin/t5x/README.md shows.
"""

from __future__ import annotations

import importlib


def require_t5x():
  """The t5x package, or an ImportError that says how to get it."""
  try:
    return importlib.import_module("t5x.models")
  except ModuleNotFoundError as error:
    raise ImportError(
        "t5x is not installed: it is not on PyPI. Install it from its repository "
        "(pip install 'git+https://github.com/google-research/t5x') to use gqa_t5's network "
        "inside t5x; gqa_t5's own trainer needs no t5x.") from error


def t5x_model(config, vocabulary, optimizer_def, **model_kwargs):
  """t5x's `EncoderDecoderModel` around our `Transformer(config)`."""
  t5x_models = require_t5x()
  from gqa_t5.model import Transformer
  return t5x_models.EncoderDecoderModel(
      module=Transformer(config), input_vocabulary=vocabulary, output_vocabulary=vocabulary,
      optimizer_def=optimizer_def, **model_kwargs)
