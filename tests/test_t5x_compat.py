"""t5x-ready axis rules, the fail-fast rules check, and gin/t5x/gqa_t5_network.gin (with a
stand-in t5x package, so the tests run where t5x is not installed)."""

import dataclasses
import os
import sys
import textwrap

import gin
import jax
import jax.numpy as jnp
import pytest

from gqa_t5 import partitioning, t5x_compat
from gqa_t5.model import T5Config, Transformer
from gqa_t5.models import EncoderDecoderModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORK_GIN = os.path.join(REPO, "gin", "t5x", "gqa_t5_network.gin")


def _config(num_kv_heads, scan_layers=False, num_cross_kv_heads=None):
  return T5Config(vocab_size=64, emb_dim=16, num_heads=4, head_dim=4, mlp_dim=32,
                  num_encoder_layers=2, num_decoder_layers=2, num_kv_heads=num_kv_heads,
                  num_cross_kv_heads=num_cross_kv_heads, scan_layers=scan_layers)


CONFIGS = [(k, scan, cross) for k in (4, 2, 1) for scan in (False, True) for cross in (None, 1)]


@pytest.mark.parametrize("k,scan,cross", CONFIGS)
def test_rules_cover_every_logical_axis_of_the_parameter_tree(k, scan, cross):
  config = _config(k, scan, cross)
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
  config = _config(2, scan)
  model = EncoderDecoderModel(Transformer(config))
  params = partitioning.init_params(model, jax.random.PRNGKey(0))
  cache = model.init_cache(params, 3, 5, 4)
  axes = t5x_compat.cache_logical_axes(cache, scanned=scan)
  key_axes = axes["decoder"]["layers" if scan else "layers_0"]["self_attention"]["cached_key"]
  assert key_axes == (("layers",) if scan else ()) + ("batch", "kv_heads", "length", "kv")
  names = set(partitioning.logical_axis_names(axes))
  assert names <= set(t5x_compat.CACHE_AXES)
  partitioning.check_rules_cover(axes, t5x_compat.logical_axis_rules(2, num_partitions=2))


def test_t5x_standard_tables_without_our_axes_are_refused_naming_them():
  config = _config(2)
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


# ---- the gin file, with a stand-in t5x package --------------------------------------------

_FAKE_T5X = {
    "t5x/__init__.py": "",
    "t5x/models.py": """
        class EncoderDecoderModel:
          def __init__(self, module, optimizer_def=None, z_loss=0.0):
            self.module, self.optimizer_def, self.z_loss = module, optimizer_def, z_loss
        """,
    "t5x/adafactor.py": """
        def standard_logical_factor_rules():
          return {'vocab': 'column', 'embed': 'row', 'mlp': 'column', 'heads': 'column',
                  'kv': 'column', 'joined_kv': 'column', 'relpos_buckets': 'none',
                  'layers': 'batch', 'stack': 'batch'}
        def factor_name_to_factordim(name):
          return name
        class Adafactor:
          def __init__(self, decay_rate=0.8, logical_factor_rules=None):
            self.logical_factor_rules = logical_factor_rules
        """,
    "t5x/partitioning.py": """
        def standard_logical_axis_rules():
          return [('batch', 'data'), ('vocab', 'model'), ('embed', None), ('mlp', 'model'),
                  ('heads', 'model'), ('kv', None), ('joined_kv', 'model'),
                  ('relpos_buckets', None), ('length', None), ('layers', None)]
        class PjitPartitioner:
          def __init__(self, num_partitions=1, logical_axis_rules=None):
            self.logical_axis_rules = logical_axis_rules
        """,
    "t5x/examples/__init__.py": "",
    "t5x/examples/t5/__init__.py": "",
    "t5x/examples/t5/network.py": """
        import dataclasses
        from typing import Any, Sequence
        @dataclasses.dataclass(frozen=True)
        class T5Config:
          vocab_size: int
          dtype: Any = 'float32'
          emb_dim: int = 512
          num_heads: int = 8
          num_encoder_layers: int = 6
          num_decoder_layers: int = 6
          head_dim: int = 64
          mlp_dim: int = 2048
          mlp_activations: Sequence[str] = ('relu',)
          dropout_rate: float = 0.1
          logits_via_embedding: bool = False
          float32_attention_logits: bool = False
        class Transformer:
          def __init__(self, config=None):
            self.config = config
        """,
}

# A size file as t5x's t5_1_1 files are written: t5x's own network and T5Config bindings.
_SIZE_GIN = """
    from __gin__ import dynamic_registration
    from t5x import adafactor
    from t5x import models
    from t5x import partitioning
    from t5x.examples.t5 import network

    DROPOUT_RATE = %gin.REQUIRED
    OPTIMIZER = @adafactor.Adafactor()
    adafactor.Adafactor.logical_factor_rules = @adafactor.standard_logical_factor_rules()
    partitioning.PjitPartitioner.logical_axis_rules = @partitioning.standard_logical_axis_rules()
    MODEL = @models.EncoderDecoderModel()
    models.EncoderDecoderModel.module = @network.Transformer()
    models.EncoderDecoderModel.optimizer_def = %OPTIMIZER
    network.Transformer.config = @network.T5Config()
    network.T5Config:
      vocab_size = 64
      dtype = 'bfloat16'
      emb_dim = 16
      num_heads = 4
      num_encoder_layers = 3
      num_decoder_layers = 2
      head_dim = 4
      mlp_dim = 32
      mlp_activations = ('gelu', 'linear')
      dropout_rate = %DROPOUT_RATE
    """


def _t5x_modules():
  return [m for m in sys.modules if m == "t5x" or m.startswith("t5x.")]


@pytest.fixture
def fake_t5x(tmp_path, monkeypatch):
  """The stand-in replaces a real t5x for the test (and the real one comes back after)."""
  for name in _t5x_modules():
    monkeypatch.delitem(sys.modules, name)
  for name, text in _FAKE_T5X.items():
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
  (tmp_path / "size.gin").write_text(textwrap.dedent(_SIZE_GIN))
  monkeypatch.syspath_prepend(str(tmp_path))
  gin.clear_config()
  gin.enter_interactive_mode()  # the stand-in's classes replace the real ones' names
  yield tmp_path
  gin.exit_interactive_mode()
  gin.clear_config()
  for name in _t5x_modules():
    del sys.modules[name]


def test_network_gin_binds_our_network_from_t5x_size_files(fake_t5x):
  gin.parse_config_files_and_bindings(
      [str(fake_t5x / "size.gin"), NETWORK_GIN],
      ["DROPOUT_RATE = 0.05", "NUM_KV_HEADS = 2", "NUM_PARTITIONS = 2"])
  model = gin.query_parameter("MODEL/gin.macro.value").scoped_configurable_fn()
  module = model.module
  assert isinstance(module, Transformer)
  config = module.config
  assert (config.emb_dim, config.num_heads, config.num_encoder_layers,
          config.num_decoder_layers, config.mlp_dim) == (16, 4, 3, 2, 32)
  assert jnp.dtype(config.dtype) == jnp.bfloat16  # T5.1.1's activations, from the size file
  assert config.dropout_rate == 0.05 and config.num_kv_heads == 2
  assert config.mlp_activations == ("gelu", "linear")
  factor_rules = model.optimizer_def.logical_factor_rules
  assert factor_rules["grouped_kv"] == "column"
  import t5x.partitioning  # the stand-in
  rules = gin.get_configurable(t5x.partitioning.PjitPartitioner)().logical_axis_rules
  assert dict(rules)["grouped_kv"] == "model" and dict(rules)["joined_kv"] == "model"
  t5x_compat.check_model_rules(config, rules)


def test_network_gin_needs_the_kv_head_count(fake_t5x):
  with pytest.raises(ValueError, match="NUM_KV_HEADS.*REQUIRED"):
    gin.parse_config_files_and_bindings([str(fake_t5x / "size.gin"), NETWORK_GIN],
                                        ["DROPOUT_RATE = 0.0"])


def test_t5x_absence_is_explained_with_a_pin_keeping_recipe(monkeypatch):
  monkeypatch.setitem(sys.modules, "t5x.models", None)  # what a box without t5x sees
  with pytest.raises(ImportError, match=r"not on PyPI.*pip install --no-deps 'git\+https"):
    t5x_compat.require_t5x()


# ---- with the real t5x, where it is installed ----------------------------------------------


@pytest.fixture
def t5x_dir():
  t5x = pytest.importorskip("t5x")
  gin.clear_config()
  gin.enter_interactive_mode()  # t5x's names may have been taken by the stand-in
  yield os.path.dirname(os.path.dirname(t5x.__file__))
  gin.exit_interactive_mode()
  gin.clear_config()


def test_network_gin_with_t5x_size_files(t5x_dir):
  from t5x import partitioning as t5x_partitioning
  gin.add_config_file_search_path(t5x_dir)
  gin.parse_config_files_and_bindings(
      [os.path.join(t5x_dir, "t5x/examples/t5/t5_1_1/tiny.gin"), NETWORK_GIN],
      ["DROPOUT_RATE = 0.0", "NUM_KV_HEADS = 2"])
  model = gin.query_parameter("MODEL/gin.macro.value").scoped_configurable_fn()
  config = model.module.config
  assert (config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim) == (8, 4, 3, 16)
  assert jnp.dtype(config.dtype) == jnp.bfloat16 and config.num_kv_heads == 2
  _, axes = partitioning.abstract_params_and_axes(EncoderDecoderModel(model.module))
  specs = jax.tree.map(lambda a: jax.sharding.PartitionSpec(*a), axes,
                       is_leaf=lambda x: isinstance(x, tuple))
  model.optimizer_def.set_param_axes(specs)  # t5x's Adafactor: KeyError without our rules
  rules = gin.get_configurable(t5x_partitioning.PjitPartitioner)(
      num_partitions=1).logical_axis_rules
  t5x_compat.check_model_rules(config, rules)


def test_t5x_decoding_loops_on_our_scanned_and_unrolled_models(t5x_dir):
  """t5x's greedy and beam search (with its prompt prefill and, when scanned, cache_offset=1)
  agree with each other and t5x's greedy with ours."""
  import functools
  import numpy as np
  import seqio
  from t5x import adafactor, decoding
  from t5x import models as t5x_models
  from gqa_t5.model.scanning import stack_layers
  from model_fixtures import init_params, tiny_batch, tiny_config

  batch = tiny_batch()
  module, params = init_params(tiny_config(2), batch)
  vocabulary = seqio.PassThroughVocabulary(size=67, eos_id=1)
  request = {"encoder_input_tokens": batch["encoder_input_tokens"],
             "decoder_input_tokens": jnp.zeros_like(batch["decoder_input_tokens"])}
  ours = EncoderDecoderModel(module).predict_batch(params, request, max_decode_length=6)

  def t5x_predict(scan_layers, decode_fn):
    net = Transformer(module.config.replace(scan_layers=scan_layers))
    model = t5x_models.EncoderDecoderModel(
        module=net, input_vocabulary=vocabulary, output_vocabulary=vocabulary,
        optimizer_def=adafactor.Adafactor(), decode_fn=decode_fn)
    return np.asarray(model.predict_batch(stack_layers(params) if scan_layers else params,
                                          request))

  greedy = functools.partial(decoding.temperature_sample, temperature=0.0)
  for scan_layers in (False, True):
    np.testing.assert_array_equal(t5x_predict(scan_layers, greedy), np.asarray(ours))
  np.testing.assert_array_equal(t5x_predict(True, decoding.beam_search),
                                t5x_predict(False, decoding.beam_search))
