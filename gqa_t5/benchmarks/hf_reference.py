"""HF transformers' T5 (torch) as the benchmarks' reference, on the device JAX uses.

The decode benchmark loads our MHA weights into HF's `T5ForConditionalGeneration` through the
checkpoint reader's name table (`gqa_t5.checkpoints.hf.hf_name_map`) and times its eager greedy
`generate`; the train benchmark times HF's forward + backward + optimizer step at the same
shapes. torch and transformers are optional: they are imported only here, on use.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any, Dict, Optional

import jax
import numpy as np
from flax import traverse_util

from gqa_t5.checkpoints.hf import hf_name_map
from gqa_t5.model.config import T5Config


def available() -> bool:
  """Whether torch and transformers are installed (without importing them)."""
  return all(importlib.util.find_spec(name) is not None for name in ("torch", "transformers"))


def torch_device() -> str:
  """'cuda' when JAX runs on a GPU (and torch sees one), else 'cpu': both time one device."""
  import torch
  if jax.default_backend() == "gpu":
    if not torch.cuda.is_available():
      raise RuntimeError("JAX runs on a GPU but torch sees no CUDA device: the HF reference "
                         "would time a different device")
    return "cuda"
  return "cpu"


def hf_config(config: T5Config):
  import transformers
  return transformers.T5Config(
      vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
      d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
      num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance,
      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def _torch_dtype(dtype: str):
  import torch
  return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def model_from_params(config: T5Config, params, dtype: str):
  """HF T5 on `torch_device()` holding `params` (our MHA tree), in `dtype`.

  transformers >= 5 ties `lm_head` to `shared`, so `params`' logits kernel must be the
  transposed embedding (the decode benchmark builds its weights so); it is checked.
  """
  import torch
  import transformers
  model = transformers.T5ForConditionalGeneration(hf_config(config)).eval()
  flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
  state = model.state_dict()
  tied = model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
  for ours, (theirs, transpose) in hf_name_map(config).items():
    value = np.asarray(flat[ours], np.float32)
    state[theirs] = torch.from_numpy(np.array(value.T if transpose else value))
  if tied:
    kernel = np.asarray(flat["decoder/logits_dense/kernel"], np.float32)
    embedding = np.asarray(flat["token_embedder/embedding"], np.float32)
    if not np.array_equal(kernel, embedding.T):
      raise ValueError("this transformers ties lm_head to the embedding: the logits kernel "
                       "decoder/logits_dense/kernel must equal token_embedder/embedding.T")
    state["lm_head.weight"] = state["shared.weight"]
  for copy in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
    state[copy] = state["shared.weight"]
  model.load_state_dict(state)
  model.generation_config.eos_token_id = None  # never stop early, as our loop (eos_id=-1)
  return model.to(device=torch_device(), dtype=_torch_dtype(dtype))


def _synchronize(device: str) -> None:
  import torch
  if device == "cuda":
    torch.cuda.synchronize()


def time_generate(model, inputs: np.ndarray, steps: int, repeats: int) -> Dict[str, Any]:
  """Seconds per greedy decode step of `generate` (steady state: (T(steps) - T(1)) / (steps -
  1), so HF's first step, which projects the cross-attention keys/values, is left out as our
  prefill is) and the tokens of the last run [B, steps]."""
  import torch
  device = next(model.parameters()).device.type
  ids = torch.from_numpy(np.asarray(inputs, np.int64)).to(device)
  mask = torch.ones_like(ids)

  def run(new_tokens: int):
    _synchronize(device)
    start = time.perf_counter()
    out = model.generate(encoder_outputs=encoder_outputs, attention_mask=mask,
                         max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                         use_cache=True, pad_token_id=0, decoder_start_token_id=0)
    _synchronize(device)
    return time.perf_counter() - start, out

  with torch.inference_mode():
    _synchronize(device)
    start = time.perf_counter()
    encoder_outputs = model.get_encoder()(input_ids=ids, attention_mask=mask)
    _synchronize(device)
    encode_s = time.perf_counter() - start
    run(steps)  # warm-up
    firsts = [run(1)[0] for _ in range(repeats)]
    fulls, out = [], None
    for _ in range(repeats):
      seconds, out = run(steps)
      fulls.append(seconds)
  step_s = (min(fulls) - min(firsts)) / max(steps - 1, 1)
  tokens = out[:, 1:].cpu().numpy()  # drop the start token
  return {"step_s": step_s, "generate_s": min(fulls), "encode_s": encode_s,
          "device": device, "tokens": tokens}


def train_step_fn(config: T5Config, batch: Dict[str, np.ndarray], dtype: str,
                  optimizer: str = "adafactor"):
  """A function running one HF training step (forward, backward, optimizer) at `batch`'s
  shapes; float32 parameters, bfloat16 autocast when `dtype` is bfloat16."""
  import torch
  import transformers
  torch.manual_seed(0)
  device = torch_device()
  model = transformers.T5ForConditionalGeneration(hf_config(config)).to(device).train()
  if optimizer == "adafactor":
    # T5's settings, as ours: parameter-scaled updates, clipping 1.0, decay -0.8, no momentum.
    opt = transformers.optimization.Adafactor(
        model.parameters(), lr=1e-3, scale_parameter=True, relative_step=False,
        warmup_init=False, clip_threshold=1.0, decay_rate=-0.8, beta1=None)
  else:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device == "cuda")
  inputs = torch.from_numpy(batch["encoder_input_tokens"].astype(np.int64)).to(device)
  labels = torch.from_numpy(batch["decoder_target_tokens"].astype(np.int64)).to(device)
  use_autocast = dtype == "bfloat16"

  def step() -> float:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_autocast):
      loss = model(input_ids=inputs, labels=labels).loss
    loss.backward()
    opt.step()
    _synchronize(device)
    return float(loss.detach())

  return step


def token_agreement(ours: np.ndarray, theirs: Optional[np.ndarray]) -> Optional[float]:
  """Fraction of positions where two [B, T] greedy decodes agree."""
  if theirs is None:
    return None
  steps = min(ours.shape[1], theirs.shape[1])
  return float(np.mean(np.asarray(ours)[:, :steps] == np.asarray(theirs)[:, :steps]))
