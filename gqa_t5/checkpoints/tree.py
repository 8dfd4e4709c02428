"""The T5X T5.1.1 parameter tree: flatten/unflatten, expected shapes of a config, validation.

Names are '/'-joined tree paths, e.g. 'decoder/layers_0/self_attention/key/kernel'. Every reader
checks what it found against `expected_shapes(config)`, so a missing, extra or wrongly shaped
tensor is reported by name with both shapes before anything is written.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax.numpy as jnp

from gqa_t5.checkpoints.errors import CheckpointError
from gqa_t5.model.config import T5Config

Shape = Tuple[int, ...]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """Nested dicts -> {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten(value, name))
    else:
      flat[name] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """{'a/b/c': leaf} -> nested dicts."""
  tree: Dict[str, Any] = {}
  for name, value in flat.items():
    node = tree
    parts = name.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise CheckpointError(f"tensor name {name!r} nests under a leaf {part!r}")
    node[parts[-1]] = value
  return tree


def _mlp_shapes(prefix: str, config: T5Config) -> Dict[str, Shape]:
  d, m = config.emb_dim, config.mlp_dim
  shapes = {}
  if len(config.mlp_activations) == 1:
    shapes[f"{prefix}/mlp/wi/kernel"] = (d, m)
  else:
    for i in range(len(config.mlp_activations)):
      shapes[f"{prefix}/mlp/wi_{i}/kernel"] = (d, m)
  shapes[f"{prefix}/mlp/wo/kernel"] = (m, d)
  return shapes


def _attention_shapes(prefix: str, config: T5Config, kv_heads: int) -> Dict[str, Shape]:
  d, h = config.emb_dim, config.head_dim
  return {
      f"{prefix}/query/kernel": (d, config.num_heads * h),
      f"{prefix}/key/kernel": (d, kv_heads * h),
      f"{prefix}/value/kernel": (d, kv_heads * h),
      f"{prefix}/out/kernel": (config.num_heads * h, d),
  }


def expected_shapes(config: T5Config) -> Dict[str, Shape]:
  """{name: shape} of every parameter of an unscanned T5.1.1 network with this config."""
  if config.scan_layers:
    raise CheckpointError("checkpoint readers handle unscanned trees only "
                          "(T5Config.scan_layers=True stacks layers)")
  d = config.emb_dim
  buckets = config.relative_attention_num_buckets
  shapes: Dict[str, Shape] = {
      "token_embedder/embedding": (config.vocab_size, d),
      "encoder/relpos_bias/rel_embedding": (config.num_heads, buckets),
      "encoder/encoder_norm/scale": (d,),
      "decoder/relpos_bias/rel_embedding": (config.num_heads, buckets),
      "decoder/decoder_norm/scale": (d,),
  }
  if not config.logits_via_embedding:
    shapes["decoder/logits_dense/kernel"] = (d, config.vocab_size)
  for i in range(config.num_encoder_layers):
    prefix = f"encoder/layers_{i}"
    shapes[f"{prefix}/pre_attention_layer_norm/scale"] = (d,)
    shapes[f"{prefix}/pre_mlp_layer_norm/scale"] = (d,)
    shapes.update(_attention_shapes(f"{prefix}/attention", config, config.num_heads))
    shapes.update(_mlp_shapes(prefix, config))
  for i in range(config.num_decoder_layers):
    prefix = f"decoder/layers_{i}"
    for norm in ("pre_self_attention_layer_norm", "pre_cross_attention_layer_norm",
                 "pre_mlp_layer_norm"):
      shapes[f"{prefix}/{norm}/scale"] = (d,)
    shapes.update(_attention_shapes(f"{prefix}/self_attention", config,
                                    config.self_attention_kv_heads))
    shapes.update(_attention_shapes(f"{prefix}/encoder_decoder_attention", config,
                                    config.cross_attention_kv_heads))
    shapes.update(_mlp_shapes(prefix, config))
  return shapes


def validate_shapes(found: Mapping[str, Shape], config: T5Config, source: str = "checkpoint"
                   ) -> None:
  """Raises CheckpointError naming every missing, extra or wrongly shaped tensor."""
  expected = expected_shapes(config)
  problems = []
  for name in sorted(set(expected) - set(found)):
    problems.append(f"missing tensor {name!r} (expected shape {expected[name]})")
  for name in sorted(set(found) - set(expected)):
    problems.append(f"unexpected tensor {name!r} with shape {tuple(found[name])}")
  for name in sorted(set(found) & set(expected)):
    if tuple(found[name]) != tuple(expected[name]):
      problems.append(f"tensor {name!r} has shape {tuple(found[name])}, "
                      f"expected {expected[name]}")
  if problems:
    shown = problems[:20]
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise CheckpointError(f"{source} does not match the T5.1.1 layout:\n  "
                          + "\n  ".join(shown) + more)


def _layer_count(names, stack: str) -> int:
  pattern = re.compile(rf"^{stack}/layers_(\d+)/")
  indices = {int(m.group(1)) for m in map(pattern.match, names) if m}
  return max(indices) + 1 if indices else 0


def _shape_of(found: Mapping[str, Shape], name: str, source: str) -> Shape:
  if name not in found:
    raise CheckpointError(f"{source}: missing tensor {name!r}, needed to infer the model "
                          "configuration")
  return tuple(found[name])


def _heads_from(width: int, head_dim: int, name: str, source: str) -> int:
  if width % head_dim:
    raise CheckpointError(f"{source}: tensor {name!r} width {width} is not a multiple of "
                          f"head_dim={head_dim}")
  return width // head_dim


def infer_config(found: Mapping[str, Shape], source: str = "checkpoint",
                 mlp_activations: Optional[Tuple[str, ...]] = None, **overrides) -> T5Config:
  """The T5Config whose parameter shapes these are (layers, widths, heads, K, K_cross).

  A T5X tree does not record activations: two input kernels mean a gated MLP, taken as T5.1.1's
  ('gelu', 'linear') unless `mlp_activations` says otherwise; one means ('relu',) (original T5).
  """
  if any(re.match(r"^(encoder|decoder)/layers/", n) for n in found):
    raise CheckpointError(f"{source}: holds scanned (stacked) layers; only unscanned trees "
                          "are supported here")
  vocab, emb = _shape_of(found, "token_embedder/embedding", source)
  num_heads, buckets = _shape_of(found, "encoder/relpos_bias/rel_embedding", source)
  num_enc = _layer_count(found, "encoder")
  num_dec = _layer_count(found, "decoder")
  query = "decoder/layers_0/self_attention/query/kernel"
  if num_dec == 0:
    raise CheckpointError(f"{source}: no decoder layers ('decoder/layers_0/...') found")
  width = _shape_of(found, query, source)[1]
  if width % num_heads:
    raise CheckpointError(f"{source}: tensor {query!r} width {width} is not a multiple of "
                          f"num_heads={num_heads} (from relpos_bias)")
  head_dim = width // num_heads
  key = "decoder/layers_0/self_attention/key/kernel"
  cross_key = "decoder/layers_0/encoder_decoder_attention/key/kernel"
  kv = _heads_from(_shape_of(found, key, source)[1], head_dim, key, source)
  cross_kv = _heads_from(_shape_of(found, cross_key, source)[1], head_dim, cross_key, source)
  gated = "decoder/layers_0/mlp/wi_0/kernel" in found
  mlp_name = "decoder/layers_0/mlp/wi_0/kernel" if gated else "decoder/layers_0/mlp/wi/kernel"
  mlp_dim = _shape_of(found, mlp_name, source)[1]
  if mlp_activations is None:
    if gated:
      count = len([n for n in found if re.match(r"^decoder/layers_0/mlp/wi_\d+/kernel$", n)])
      mlp_activations = ("gelu",) + ("linear",) * (count - 1)
    else:
      mlp_activations = ("relu",)
  fields: Dict[str, Any] = dict(
      vocab_size=vocab, emb_dim=emb, num_heads=num_heads, head_dim=head_dim, mlp_dim=mlp_dim,
      num_encoder_layers=num_enc, num_decoder_layers=num_dec, mlp_activations=mlp_activations,
      logits_via_embedding="decoder/logits_dense/kernel" not in found,
      num_kv_heads=None if kv == num_heads else kv,
      num_cross_kv_heads=None if cross_kv == kv else cross_kv,
      relative_attention_num_buckets=buckets, dropout_rate=0.0)
  fields.update(overrides)
  try:
    return T5Config(**fields)
  except ValueError as error:
    raise CheckpointError(f"{source}: inferred an invalid configuration: {error}") from error


def config_to_dict(config: T5Config) -> Dict[str, Any]:
  """A JSON-friendly view of a config (provenance records, MODEL_DIR/model_config.json).

  The dtype is written by its numpy name ('bfloat16', 'float32') whether the config holds a
  string, a numpy dtype or a jnp scalar type, so records compare equal across spellings."""
  out = {}
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if field.name == "dtype":
      value = jnp.dtype(value).name
    elif isinstance(value, tuple):
      value = list(value)
    out[field.name] = value
  return out
