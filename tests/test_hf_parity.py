"""Parity with a reference no one here wrote: HF transformers' T5 (T5.1.1 configuration)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from gqa_t5.checkpoints.detect import load_checkpoint  # noqa: E402
from gqa_t5.model import Transformer  # noqa: E402
from gqa_t5.models import EncoderDecoderModel  # noqa: E402

INPUT_LENGTH, TARGET_LENGTH = 40, 24  # past 8 positions, so the log-spaced buckets are used


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
  torch.manual_seed(0)
  hf_config = transformers.T5Config(
      vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
      num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
      relative_attention_num_buckets=32, relative_attention_max_distance=20,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  hf_model = transformers.T5ForConditionalGeneration(hf_config).eval()
  path = tmp_path_factory.mktemp("hf_t5")
  hf_model.save_pretrained(path)
  params, _, config = load_checkpoint(str(path), format="hf")
  return hf_model, params, config


def batch(seed=0):
  rng = np.random.RandomState(seed)
  inputs = rng.randint(2, 96, (3, INPUT_LENGTH))
  inputs[1, 30:] = 0
  targets = rng.randint(2, 96, (3, TARGET_LENGTH))
  decoder_inputs = np.concatenate([np.zeros((3, 1), np.int64), targets[:, :-1]], axis=1)
  return inputs, decoder_inputs, targets


def test_config_is_t5_1_1(hf_and_ours):
  _, _, config = hf_and_ours
  assert config.mlp_activations == ("gelu", "linear")
  assert not config.logits_via_embedding
  assert (config.num_encoder_layers, config.num_decoder_layers) == (2, 3)


def test_logits_agree_to_1e_4(hf_and_ours):
  hf_model, params, config = hf_and_ours
  inputs, decoder_inputs, targets = batch()
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.from_numpy(inputs),
                      attention_mask=torch.from_numpy((inputs > 0).astype(np.int64)),
                      decoder_input_ids=torch.from_numpy(decoder_inputs)).logits.numpy()
  ours = Transformer(config).apply({"params": params}, jnp.asarray(inputs),
                                   jnp.asarray(decoder_inputs), jnp.asarray(targets),
                                   enable_dropout=False)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4)


def test_greedy_decodes_are_identical(hf_and_ours):
  hf_model, params, config = hf_and_ours
  inputs, _, _ = batch(seed=1)
  with torch.no_grad():
    theirs = hf_model.generate(
        input_ids=torch.from_numpy(inputs),
        attention_mask=torch.from_numpy((inputs > 0).astype(np.int64)),
        max_new_tokens=TARGET_LENGTH, do_sample=False, num_beams=1,
        # transformers 5 sizes its KV cache by num_layers, not num_decoder_layers.
        use_cache=False).numpy()[:, 1:]  # drop BOS
  model = EncoderDecoderModel(Transformer(config))
  ours = np.asarray(model.predict_batch(params, {"encoder_input_tokens": jnp.asarray(inputs)},
                                        decoder_params={"max_decode_length": TARGET_LENGTH}))
  theirs = np.pad(theirs, ((0, 0), (0, TARGET_LENGTH - theirs.shape[1])))
  np.testing.assert_array_equal(ours, theirs)
