"""t5x-ready axis rules, the fail-fast rules check, our config from t5x's (the gin file and
t5x's own loops: tests/test_t5x_gin.py)."""

import dataclasses

import jax
import pytest

from gqa_t5 import param_init, partitioning, t5x_compat
from gqa_t5.model import Transformer
from gqa_t5.models import EncoderDecoderModel
from tiny_configs import tiny_config



CONFIGS = [(k, scan, cross) for k in (4, 2, 1) for scan in (False, True) for cross in (None, 1)]


@pytest.mark.parametrize("k,scan,cross", CONFIGS)
def test_rules_cover_every_logical_axis_of_the_parameter_tree(k, scan, cross):
  config = tiny_config("t5x", k, scan_layers=scan, num_cross_kv_heads=cross)
  _, axes = partitioning.abstract_params_and_axes(EncoderDecoderModel(Transformer(config)))
  names = set(partitioning.logical_axis_names(axes))
  assert "grouped_kv" in names and ("layers" in names) == scan
  assert names <= set(t5x_compat.PARAM_AXES)  # the module's list is the truth
  rules = t5x_compat.logical_axis_rules(k, cross, num_partitions=2)
  partitioning.check_rules_cover(axes, rules)
  partitioning.check_rules_cover(axes, t5x_compat.logical_factor_rules())
  t5x_compat.check_model_rules(config, rules)


@pytest.mark.parametrize("scan", [False, True])
def test_rules_cover_every_logical_axis_of_the_cache(scan):
  config = tiny_config("t5x", 2, scan_layers=scan)
  model = EncoderDecoderModel(Transformer(config))
  params = param_init.init_params(model, jax.random.PRNGKey(0))
  cache = model.init_cache(params, 3, 5, 4)
  axes = t5x_compat.cache_logical_axes(cache, scanned=scan)
  key_axes = axes["decoder"]["layers" if scan else "layers_0"]["self_attention"]["cached_key"]
  assert key_axes == (("layers",) if scan else ()) + ("batch", "kv_heads", "length", "kv")
  names = set(partitioning.logical_axis_names(axes))
  assert names <= set(t5x_compat.CACHE_AXES)
  partitioning.check_rules_cover(axes, t5x_compat.logical_axis_rules(2, num_partitions=2))


def test_t5x_standard_tables_without_our_axes_are_refused_naming_them():
  config = tiny_config("t5x", 2)
  # A t5x user's tables: t5x's standard partitioning and factor rules, which lack our axes.
  with pytest.raises(partitioning.LogicalAxisError,
                     match=r"do not cover logical axis/axes \['grouped_kv'\].*"
                           r"decoder/layers_0/encoder_decoder_attention/key/kernel"):
    t5x_compat.check_model_rules(config, partitioning.T5X_STANDARD_RULES)
  factor_rules = {k: v for k, v in t5x_compat.logical_factor_rules().items()
                  if k not in ("grouped_kv", "kv_heads")}
  with pytest.raises(partitioning.LogicalAxisError, match="grouped_kv"):
    t5x_compat.check_model_rules(config, factor_rules, "the Adafactor factor rules")
  with pytest.raises(partitioning.LogicalAxisError, match=r"\['grouped_kv', 'kv_heads'\]"):
    t5x_compat.check_rules(partitioning.T5X_STANDARD_RULES)


def test_kv_head_rules_shard_only_when_k_divides_the_model_axis():
  rules = dict(t5x_compat.logical_axis_rules(8, 8, num_partitions=4))
  assert rules["grouped_kv"] == "model" and rules["kv_heads"] == "model"
  assert rules["joined_kv"] == "model" and rules["embed"] is None
  rules = dict(t5x_compat.logical_axis_rules(2, 2, num_partitions=4))
  assert rules["grouped_kv"] is None and rules["kv_heads"] is None
  # A base table that already names an axis keeps its own rule.
  base = list(partitioning.T5X_STANDARD_RULES) + [("grouped_kv", "model")]
  assert dict(t5x_compat.logical_axis_rules(2, num_partitions=4, base_rules=base))[
      "grouped_kv"] == "model"
  factors = t5x_compat.logical_factor_rules()  # t5x's FactorDim where t5x is installed
  assert factors["grouped_kv"] == factors["joined_kv"] == factors["kv_heads"]
  assert factors["layers"] == factors["stack"] != factors["embed"]


def test_config_from_t5x_copies_every_field_and_refuses_unknown_ones():
  @dataclasses.dataclass
  class T5xConfig:
    vocab_size: int = 64
    dtype: str = "bfloat16"
    emb_dim: int = 16
    num_heads: int = 4
    head_dim: int = 4
    mlp_dim: int = 32
    dropout_rate: float = 0.05

  config = t5x_compat.config_from_t5x(T5xConfig(), num_kv_heads=2, scan_layers=True)
  assert (config.dtype, config.dropout_rate, config.num_kv_heads, config.scan_layers) == (
      "bfloat16", 0.05, 2, True)

  @dataclasses.dataclass
  class Other(T5xConfig):
    rotary: bool = True

  with pytest.raises(ValueError, match=r"field\(s\) \['rotary'\] that gqa_t5's T5Config lacks"):
    t5x_compat.config_from_t5x(Other())


class _Mesh:
  """What the check reads of a jax Mesh: axis name -> size."""

  def __init__(self, **shape):
    self.shape = shape


def test_kv_layout_follows_the_mesh_t5x_builds_not_num_partitions(caplog, monkeypatch):
  monkeypatch.setattr(t5x_compat, "_LOGGED", set())  # logged once per process
  # t5x on 8 CPU devices builds a 1 x 8 mesh whatever num_partitions says: K = 2 is not a
  # multiple of 8, so the key/value heads are replicated (not sharded 8 ways).
  with caplog.at_level("INFO"):
    rules = dict(t5x_compat.logical_axis_rules(2, mesh=_Mesh(data=1, model=8)))
    t5x_compat.logical_axis_rules(2, mesh=_Mesh(data=1, model=8))  # logged once only
  assert rules["grouped_kv"] is None and rules["kv_heads"] is None
  logged = [r.getMessage() for r in caplog.records if "key/value heads" in r.getMessage()]
  assert len(logged) == 1 and "replicated" in logged[0] and "K=2 is not a multiple of 8" in \
      logged[0] and "'model': 8" in logged[0]
  # A (1, 1, 1, 2) submesh: K = 2 shards over its 2-way model axis, K = 1 is replicated.
  assert dict(t5x_compat.logical_axis_rules(2, mesh=_Mesh(data=4, model=2)))[
      "grouped_kv"] == "model"
  assert dict(t5x_compat.logical_axis_rules(1, mesh=_Mesh(data=4, model=2)))[
      "grouped_kv"] is None
  # Self- and cross-attention heads must both divide the axis to shard.
  assert dict(t5x_compat.logical_axis_rules(2, 1, mesh=_Mesh(data=4, model=2)))[
      "kv_heads"] is None
  assert "sharded over t5x's model axis of size 2" in t5x_compat.kv_layout(4, None, 2)


def test_num_partitions_that_disagrees_with_the_mesh_is_refused():
  with pytest.raises(t5x_compat.MeshMismatchError,
                     match=r"NUM_PARTITIONS = 2, but the mesh t5x builds has a model axis of "
                           r"size 8 \(mesh \{'data': 1, 'model': 8\}.*set NUM_PARTITIONS = 8"):
    t5x_compat.logical_axis_rules(2, num_partitions=2, mesh=_Mesh(data=1, model=8))
  assert t5x_compat.check_num_partitions(2, _Mesh(data=4, model=2)) == 2
  assert t5x_compat.check_num_partitions(None, _Mesh(data=8)) == 1  # no model axis: size 1
