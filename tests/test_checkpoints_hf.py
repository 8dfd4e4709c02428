"""Hugging Face T5 checkpoints: logits parity with transformers, layouts, dtypes, bad input."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from gqa_t5.checkpoints import hf  # noqa: E402
from gqa_t5.checkpoints import tree as tree_lib  # noqa: E402
from gqa_t5.checkpoints.errors import CheckpointError  # noqa: E402

VOCAB = 67


def _hf_model(feed_forward_proj="gated-gelu", tie=False, seed=0, **overrides):
  fields = dict(vocab_size=VOCAB, d_model=24, d_kv=8, d_ff=40, num_layers=2,
                num_decoder_layers=3, num_heads=4, feed_forward_proj=feed_forward_proj,
                tie_word_embeddings=tie, dropout_rate=0.0, decoder_start_token_id=0,
                pad_token_id=0, eos_token_id=1)
  fields.update(overrides)
  torch.manual_seed(seed)
  return transformers.T5ForConditionalGeneration(transformers.T5Config(**fields)).eval()


def _batch(seed=0):
  rng = np.random.RandomState(seed)
  inputs = rng.randint(2, VOCAB, (2, 9))
  inputs[1, 6:] = 0
  targets = rng.randint(2, VOCAB, (2, 6))
  decoder_inputs = np.concatenate([np.zeros((2, 1), np.int64), targets[:, :-1]], axis=1)
  return inputs, decoder_inputs, targets


def _hf_logits(model, batch):
  inputs, decoder_inputs, _ = batch
  with torch.no_grad():
    return model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
                 decoder_input_ids=torch.tensor(decoder_inputs)).logits.numpy()


def _our_logits(source, batch):
  from gqa_t5.model.network import Transformer
  inputs, decoder_inputs, targets = batch
  logits = Transformer(source.config).apply({"params": source.read_all()}, jnp.asarray(inputs),
                                            jnp.asarray(decoder_inputs), jnp.asarray(targets),
                                            enable_dropout=False)
  return np.asarray(logits)


def _assert_parity(model, source, seed=0):
  batch = _batch(seed)
  ours, theirs = _our_logits(source, batch), _hf_logits(model, batch)
  # Padded target positions aside, every logit agrees.
  assert np.abs(ours - theirs).max() < 1e-4, np.abs(ours - theirs).max()


def test_logits_match_transformers_after_save_pretrained(tmp_path):
  model = _hf_model()
  model.save_pretrained(str(tmp_path))
  source = hf.open_hf(str(tmp_path))
  config = source.config
  assert (config.num_encoder_layers, config.num_decoder_layers, config.num_heads,
          config.head_dim, config.mlp_dim) == (2, 3, 4, 8, 40)
  assert config.mlp_activations == ("gelu", "linear")
  _assert_parity(model, source)


def _write_state_dict(path, model, config_dict, drop=(), add=None, dtype=None):
  os.makedirs(path, exist_ok=True)
  state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
           if k not in drop}
  if dtype is not None:
    state = {k: v.to(dtype) for k, v in state.items()}
  state.update(add or {})
  safetensors_torch.save_file(state, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_dict, f)
  return state


def _t511_config_dict(model, **changes):
  cfg = model.config.to_dict()
  cfg.pop("scale_decoder_outputs", None)
  cfg["tie_word_embeddings"] = False  # what the T5.1.1 / Flan-T5 hub configs say
  cfg.update(changes)
  return cfg


def test_t511_layout_with_a_separate_lm_head(tmp_path):
  model = _hf_model()
  # Untie lm_head (a T5.1.1 checkpoint has its own output kernel).
  model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 24) * 0.3)
  _write_state_dict(str(tmp_path), model, _t511_config_dict(model))
  source = hf.open_hf(str(tmp_path))
  assert not source.config.logits_via_embedding
  _assert_parity(model, source, seed=1)


def test_original_t5_tied_and_scaled_relu(tmp_path):
  model = _hf_model(feed_forward_proj="relu", tie=True)
  model.save_pretrained(str(tmp_path))
  source = hf.open_hf(str(tmp_path))
  assert source.config.logits_via_embedding and source.config.mlp_activations == ("relu",)
  assert "decoder/logits_dense/kernel" not in source.tensors
  _assert_parity(model, source, seed=2)


def test_hf_config_to_t5config():
  model = _hf_model()
  config = hf.hf_config_to_t5config(model.config)
  assert (config.vocab_size, config.emb_dim, config.num_heads, config.head_dim) == (VOCAB, 24, 4, 8)
  assert not config.logits_via_embedding  # built with tie_word_embeddings=False: no scaling
  as_dict = _t511_config_dict(model)
  assert hf.hf_config_to_t5config(as_dict, dropout_rate=0.1).dropout_rate == 0.1
  with pytest.raises(CheckpointError, match="feed_forward_proj='gated-tanh'"):
    hf.hf_config_to_t5config(dict(as_dict, feed_forward_proj="gated-tanh"))


def test_pytorch_bin_and_bfloat16(tmp_path):
  model = _hf_model()
  reference = tree_lib.flatten(hf.open_hf(_save(model, tmp_path / "st")).read_all())
  bin_dir = tmp_path / "bin"
  os.makedirs(bin_dir)
  torch.save(model.state_dict(), str(bin_dir / "pytorch_model.bin"))
  (bin_dir / "config.json").write_text(json.dumps(model.config.to_dict()))
  from_bin = tree_lib.flatten(hf.open_hf(str(bin_dir)).read_all())
  assert sorted(from_bin) == sorted(reference)
  for name in reference:
    assert np.array_equal(from_bin[name], reference[name]), name
  bf16_dir = str(tmp_path / "bf16")
  _write_state_dict(bf16_dir, model, model.config.to_dict(), dtype=torch.bfloat16,
                    drop=("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                          "lm_head.weight"))
  from_bf16 = tree_lib.flatten(hf.open_hf(bf16_dir).read_all())
  kernel = from_bf16["decoder/layers_1/self_attention/query/kernel"]
  assert kernel.dtype.name == "bfloat16"
  want = reference["decoder/layers_1/self_attention/query/kernel"]
  assert np.allclose(kernel.astype(np.float32), want, atol=1e-2)


def _save(model, path):
  model.save_pretrained(str(path))
  return str(path)


def test_truncated_and_corrupt_safetensors(tmp_path):
  path = _save(_hf_model(), tmp_path / "m")
  weights = os.path.join(path, "model.safetensors")
  data = open(weights, "rb").read()
  with open(weights, "wb") as f:
    f.write(data[:-500])
  with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: tensor '"):
    hf.open_hf(path)
  with open(weights, "wb") as f:
    f.write(data[:4])
  with pytest.raises(CheckpointError, match="truncated"):
    hf.open_hf(path)
  with open(weights, "wb") as f:
    f.write(len(b"{not json").to_bytes(8, "little") + b"{not json" + data[100:])
  with pytest.raises(CheckpointError, match="corrupt"):
    hf.open_hf(path)


def test_missing_extra_and_misshaped_hf_tensors(tmp_path):
  model = _hf_model()
  cfg = model.config.to_dict()
  _write_state_dict(str(tmp_path / "missing"), model, cfg,
                    drop=("decoder.block.2.layer.1.EncDecAttention.v.weight",))
  with pytest.raises(CheckpointError, match=r"missing tensors: 'decoder\.block\.2\.layer\.1\."
                     r"EncDecAttention\.v\.weight' \(for 'decoder/layers_2/"
                     r"encoder_decoder_attention/value/kernel'\)"):
    hf.open_hf(str(tmp_path / "missing"))
  _write_state_dict(str(tmp_path / "extra"), model, cfg,
                    add={"decoder.block.3.layer.0.SelfAttention.q.weight": torch.zeros(32, 24)})
  with pytest.raises(CheckpointError, match=r"unexpected tensors: 'decoder\.block\.3"):
    hf.open_hf(str(tmp_path / "extra"))
  _write_state_dict(str(tmp_path / "shape"), model, cfg,
                    add={"encoder.block.1.layer.1.DenseReluDense.wo.weight": torch.zeros(24, 41)})
  with pytest.raises(CheckpointError, match=r"encoder/layers_1/mlp/wo/kernel' has shape "
                     r"\(41, 24\), expected \(40, 24\)"):
    hf.open_hf(str(tmp_path / "shape"))
  os.remove(os.path.join(tmp_path / "shape", "model.safetensors"))
  with pytest.raises(CheckpointError, match="holds no model.safetensors"):
    hf.open_hf(str(tmp_path / "shape"))
