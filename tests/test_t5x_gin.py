"""gin/t5x/gqa_t5_network.gin with a stand-in t5x package (so it is tested where t5x is not
installed) and with the real t5x where it is, including t5x's own decoding loops."""

import contextlib
import functools
import os
import sys
import textwrap

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_t5 import partitioning, t5x_compat
from gqa_t5.model import Transformer
from gqa_t5.model.scanning import stack_layers
from gqa_t5.models import EncoderDecoderModel
from model_fixtures import init_params, tiny_batch
from tiny_configs import VARIANTS, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORK_GIN = os.path.join(REPO, "gin", "t5x", "gqa_t5_network.gin")


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
        class _Mesh:
          def __init__(self, **shape):
            self.shape = shape
        def default_mesh(num_partitions, model_parallel_submesh=None, backend=None,
                         ici_mesh_shape=None, dcn_mesh_shape=None):
          # As t5x on 8 CPU devices: one model axis over all of them unless a submesh is given.
          if model_parallel_submesh:
            model = 1
            for size in model_parallel_submesh:
              model *= size
            return _Mesh(data=8 // model, model=model)
          return _Mesh(data=1, model=8)
        class PjitPartitioner:
          def __init__(self, num_partitions=None, model_parallel_submesh=None,
                       logical_axis_rules=None):
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


@contextlib.contextmanager
def _isolated_gin():
  """gin's registry outlives clear_config(): the t5x classes these tests register (and the
  stand-in's) would make 'network.T5Config' ambiguous for every later gin test."""
  # pylint: disable-next=protected-access
  registry, inverse = gin.config._REGISTRY, gin.config._INVERSE_REGISTRY
  saved_registry, saved_inverse = registry.copy(), dict(inverse)
  gin.clear_config()
  gin.enter_interactive_mode()  # the stand-in's classes take the real ones' names
  try:
    yield
  finally:
    gin.exit_interactive_mode()
    gin.clear_config(clear_constants=False)
    registry.clear()
    for selector, info in saved_registry.items():
      registry[selector] = info
    inverse.clear()
    inverse.update(saved_inverse)


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
  with _isolated_gin():
    yield tmp_path
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


def _partitioner_rules(fake_t5x, bindings):
  gin.parse_config_files_and_bindings([str(fake_t5x / "size.gin"), NETWORK_GIN],
                                      ["DROPOUT_RATE = 0.0"] + bindings)
  import t5x.partitioning  # the stand-in
  return dict(gin.get_configurable(t5x.partitioning.PjitPartitioner)().logical_axis_rules)


def test_network_gin_reads_the_model_axis_from_the_mesh_t5x_builds(fake_t5x, caplog,
                                                                  monkeypatch):
  monkeypatch.setattr(t5x_compat, "_LOGGED", set())  # logged once per process
  # t5x's CPU mesh puts all 8 devices on the model axis whatever num_partitions says.
  with caplog.at_level("INFO"):
    rules = _partitioner_rules(fake_t5x, ["NUM_KV_HEADS = 2",
                                          "partitioning.PjitPartitioner.num_partitions = 2"])
  assert rules["grouped_kv"] is None  # K = 2 is not a multiple of 8: replicated
  assert any("replicated" in r.getMessage() and "'model': 8" in r.getMessage()
             for r in caplog.records)


def test_network_gin_with_a_submesh_shards_k_when_it_divides_the_model_axis(fake_t5x):
  rules = _partitioner_rules(fake_t5x, [
      "NUM_KV_HEADS = 2", "partitioning.PjitPartitioner.model_parallel_submesh = (1, 1, 1, 2)"])
  assert rules["grouped_kv"] == "model"


def test_network_gin_refuses_num_partitions_that_the_mesh_does_not_have(fake_t5x):
  with pytest.raises(t5x_compat.MeshMismatchError, match="NUM_PARTITIONS = 2, but the mesh"):
    _partitioner_rules(fake_t5x, ["NUM_KV_HEADS = 2", "NUM_PARTITIONS = 2",
                                  "partitioning.PjitPartitioner.num_partitions = 2"])


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
  with _isolated_gin():
    yield os.path.dirname(os.path.dirname(t5x.__file__))


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


def test_network_gin_reads_t5x_s_real_mesh(t5x_dir):
  """t5x's own default_mesh decides the model axis: on this host's CPU devices it spans them
  all, so a NUM_PARTITIONS that says otherwise is refused before anything runs."""
  from t5x import partitioning as t5x_partitioning
  gin.add_config_file_search_path(t5x_dir)
  files = [os.path.join(t5x_dir, "t5x/examples/t5/t5_1_1/tiny.gin"), NETWORK_GIN]
  size = jax.local_device_count() if jax.devices()[-1].platform == "cpu" else None
  if size is None:
    pytest.skip("t5x's CPU mesh rule only")
  gin.parse_config_files_and_bindings(
      files, ["DROPOUT_RATE = 0.0", "NUM_KV_HEADS = 2",
              "partitioning.PjitPartitioner.num_partitions = 1",
              f"NUM_PARTITIONS = {size + 1}"])
  with pytest.raises(t5x_compat.MeshMismatchError,
                     match=rf"NUM_PARTITIONS = {size + 1}, but the mesh t5x builds has a model "
                           rf"axis of size {size}"):
    gin.get_configurable(t5x_partitioning.PjitPartitioner)()


def test_t5x_decoding_loops_on_our_scanned_and_unrolled_models(t5x_dir):
  """t5x's greedy and beam search (with its prompt prefill and, when scanned, cache_offset=1)
  agree with each other and t5x's greedy with ours."""
  import seqio
  from t5x import adafactor, decoding
  from t5x import models as t5x_models

  batch = tiny_batch()
  module, params = init_params(tiny_config("network", 2), batch)
  vocabulary = seqio.PassThroughVocabulary(size=VARIANTS["network"]["vocab_size"], eos_id=1)
  request = {"encoder_input_tokens": batch["encoder_input_tokens"],
             "decoder_input_tokens": jnp.zeros_like(batch["decoder_input_tokens"])}
  ours = EncoderDecoderModel(module).predict_batch(
      params, request, decoder_params={"max_decode_length": 6})

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
