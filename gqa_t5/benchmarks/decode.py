"""Greedy decoding speed for several key/value head counts, against this machine's memory roofline.

For each K it times the steady decode loop (the encoder is timed apart), interleaving the runs of
different K, and prints min and median step time, time per sample, the bytes one step must read
(decoder weights + logits layer + self-attention cache + cross-attention keys/values), the fraction
of the memory roofline reached, and the speed-up over MHA beside the ideal byte ratio. Memory
bandwidth is measured in the same run (a jitted sum over >= 1 GB, best of several) right before and
after the timed runs. With --compare-hf, HF transformers' greedy `generate` runs on the same MHA
weights in the same run.

  python scripts/benchmark_decode.py --shape A --kv-heads 8,4,2,1   (or: gqa-t5 benchmark-decode ...)
  python scripts/benchmark_decode.py --shape B --dtype bfloat16 --compare-hf
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

from gqa_t5 import decoding
from gqa_t5.model import T5Config, Transformer
from gqa_t5.models import EncoderDecoderModel

# The shapes the decode-speed targets are measured on.
SHAPES = {
    "A": dict(emb_dim=512, num_heads=8, head_dim=64, mlp_dim=1024, layers=6, vocab=32128,
              input_length=512, output_length=128, batch=8),
    "B": dict(emb_dim=512, num_heads=8, head_dim=64, mlp_dim=1024, layers=6, vocab=32128,
              input_length=2048, output_length=64, batch=16),
    "C": dict(emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048, layers=12, vocab=32128,
              input_length=512, output_length=64, batch=8),
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", choices=sorted(SHAPES), default="A",
                      help="preset shape; the flags below override its fields")
  for name in ("emb_dim", "num_heads", "head_dim", "mlp_dim", "layers", "vocab", "input_length",
               "output_length", "batch"):
    parser.add_argument("--" + name.replace("_", "-"), type=int, default=None)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--kv-heads", default=None,
                      help="comma-separated K values (default: N, N/2, ..., 1)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--bandwidth-gb", type=float, default=1.0,
                      help="size of the array the bandwidth probe sums")
  parser.add_argument("--compare-hf", action="store_true",
                      help="also time HF transformers' greedy generate on the MHA weights")
  args = parser.parse_args(argv)
  shape = dict(SHAPES[args.shape])
  for name in shape:
    if getattr(args, name) is not None:
      shape[name] = getattr(args, name)
  n = shape["num_heads"]
  if args.kv_heads:
    kv_heads = [int(k) for k in args.kv_heads.split(",")]
  else:
    kv_heads = [k for k in (n, n // 2, n // 4, 2, 1) if k >= 1 and n % k == 0]
    kv_heads = sorted(set(kv_heads), reverse=True)
  for k in kv_heads:
    if k <= 0 or n % k:
      parser.error(f"--kv-heads value {k} does not divide num_heads={n}")
  return args, shape, kv_heads


def measure_bandwidth(gigabytes: float, repeats: int = 5) -> float:
  """Bytes/s of a read-dominated jitted sum over a float32 array of `gigabytes`."""
  x = jnp.ones((int(gigabytes * 2 ** 30) // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    total(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  del x
  return gigabytes * 2 ** 30 / best


def step_bytes(config: T5Config, shape: Dict[str, int], params) -> Dict[str, float]:
  """Bytes one decode step reads: weights of the decoder and logits layer, both caches."""
  itemsize = jnp.dtype(config.dtype).itemsize
  decoder = params["decoder"]
  # The cross-attention key/value kernels are read once per sequence (the prefill), not per step.
  weights = sum(x.size for name, layer in decoder.items() if name.startswith("layers_")
                for sub, module in layer.items()
                for part, x in _flatten(module).items()
                if not (sub == "encoder_decoder_attention" and part[0] in ("key", "value")))
  weights += decoder["logits_dense"]["kernel"].size
  weight_dtype = jax.tree.leaves(params)[0].dtype.itemsize
  b, h, layers = shape["batch"], config.head_dim, config.num_decoder_layers
  self_cache = 2 * b * config.self_attention_kv_heads * shape["output_length"] * h * layers
  cross_cache = 2 * b * config.cross_attention_kv_heads * shape["input_length"] * h * layers
  return {"weights": weights * weight_dtype, "self_cache": self_cache * itemsize,
          "cross_kv": cross_cache * itemsize,
          "total": weights * weight_dtype + (self_cache + cross_cache) * itemsize}


class Variant:
  """One K: its model, parameters and compiled encode / decode-loop functions."""

  def __init__(self, shape, num_kv_heads, dtype, seed=0):
    self.num_kv_heads = num_kv_heads
    self.config = T5Config(vocab_size=shape["vocab"], emb_dim=shape["emb_dim"],
                           num_heads=shape["num_heads"], head_dim=shape["head_dim"],
                           mlp_dim=shape["mlp_dim"], num_encoder_layers=shape["layers"],
                           num_decoder_layers=shape["layers"], dropout_rate=0.0, dtype=dtype,
                           num_kv_heads=num_kv_heads)
    self.model = EncoderDecoderModel(Transformer(self.config), eos_id=-1)  # never stop early
    b, s, t = shape["batch"], shape["input_length"], shape["output_length"]
    self.inputs = jax.random.randint(jax.random.PRNGKey(seed + 1), (b, s), 2, shape["vocab"])
    variables = jax.jit(lambda rng: self.model.get_initial_variables(
        rng, {"encoder_input_tokens": (b, s), "decoder_input_tokens": (b, t)}))(
            jax.random.PRNGKey(seed))
    # Decoding reads the weights at the activation dtype: store them so.
    self.params = jax.tree.map(lambda x: x.astype(dtype), variables["params"])
    self.bytes = step_bytes(self.config, shape, self.params)
    module, model = self.model.module, self.model

    @jax.jit
    def encode(params, inputs):
      return module.apply({"params": params}, inputs, enable_dropout=False, method=module.encode)

    def loop(params, encoded, inputs, cache):
      cache = model.prefill_cross_attention(params, cache, encoded, inputs)
      fn = model.tokens_to_logits_fn(params, encoded, inputs)
      return decoding.greedy_decode(cache, fn, b, t, eos_id=-1)[0]

    self.encode = encode
    self.loop = jax.jit(loop, donate_argnums=(3,))
    self.new_cache = jax.jit(lambda p: model.init_cache(p, b, s, t))
    self.encoded = encode(self.params, self.inputs).block_until_ready()
    self.loop(self.params, self.encoded, self.inputs, self.new_cache(self.params)).block_until_ready()
    self.loop_times: List[float] = []
    self.encode_times: List[float] = []

  def run_once(self):
    start = time.perf_counter()
    self.encode(self.params, self.inputs).block_until_ready()
    self.encode_times.append(time.perf_counter() - start)
    cache = self.new_cache(self.params)
    jax.block_until_ready(cache)
    start = time.perf_counter()
    self.loop(self.params, self.encoded, self.inputs, cache).block_until_ready()
    self.loop_times.append(time.perf_counter() - start)


def time_hf(variant: Variant, shape, repeats: int) -> List[float]:
  """Seconds per decode step of HF transformers' greedy generate on the same MHA weights."""
  import torch
  import transformers

  from gqa_t5.checkpoints.hf import hf_name_map

  cfg = variant.config
  hf_config = transformers.T5Config(
      vocab_size=cfg.vocab_size, d_model=cfg.emb_dim, d_kv=cfg.head_dim, d_ff=cfg.mlp_dim,
      num_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
      num_heads=cfg.num_heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(hf_config).eval()
  flat = {"/".join(k): np.asarray(v, np.float32)
          for k, v in _flatten(variant.params).items()}
  state = model.state_dict()
  for ours, (theirs, transpose) in hf_name_map(cfg).items():
    value = flat[ours].T if transpose else flat[ours]
    state[theirs] = torch.from_numpy(np.ascontiguousarray(value))
  state["encoder.embed_tokens.weight"] = state["shared.weight"]
  state["decoder.embed_tokens.weight"] = state["shared.weight"]
  model.load_state_dict(state)
  if cfg.dtype == jnp.bfloat16:
    model = model.to(torch.bfloat16)
  inputs = torch.from_numpy(np.asarray(variant.inputs, np.int64))
  t = shape["output_length"]
  times = []
  with torch.inference_mode():
    encoder_outputs = model.get_encoder()(input_ids=inputs)
    for _ in range(repeats + 1):
      start = time.perf_counter()
      model.generate(encoder_outputs=encoder_outputs, attention_mask=torch.ones_like(inputs),
                     max_new_tokens=t, min_new_tokens=t, do_sample=False, num_beams=1,
                     use_cache=True)
      times.append((time.perf_counter() - start) / t)
  return times[1:]  # the first call warms up


def _flatten(tree, prefix=()):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def main(argv=None) -> int:
  args, shape, kv_heads = parse_args(argv)
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  print(f"shape {args.shape}: {shape}, dtype {args.dtype}, K in {kv_heads}, "
        f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
  variants = [Variant(shape, k, dtype) for k in kv_heads]
  bandwidth_before = measure_bandwidth(args.bandwidth_gb)
  for _ in range(args.repeats):
    for variant in variants:  # interleaved, so drift hits every K alike
      variant.run_once()
  bandwidth_after = measure_bandwidth(args.bandwidth_gb)
  bandwidth = max(bandwidth_before, bandwidth_after)
  print(f"memory bandwidth (jitted sum over {args.bandwidth_gb:.1f} GB): before "
        f"{bandwidth_before / 1e9:.1f} GB/s, after {bandwidth_after / 1e9:.1f} GB/s; "
        f"roofline uses {bandwidth / 1e9:.1f} GB/s")
  t, b = shape["output_length"], shape["batch"]
  mha = variants[0]
  header = (f"{'K':>3} {'step min ms':>11} {'step med ms':>11} {'s/sample':>9} {'MB/step':>8} "
            f"{'roofline':>8} {'speedup':>8} {'ideal':>6} {'of ideal':>8}")
  print(header)
  results = []
  for v in variants:
    step_min = min(v.loop_times) / t
    step_med = statistics.median(v.loop_times) / t
    per_sample = (min(v.encode_times) + min(v.loop_times)) / b
    roofline = v.bytes["total"] / step_min / bandwidth
    speedup = (min(mha.loop_times) / min(v.loop_times))
    ideal = mha.bytes["total"] / v.bytes["total"]
    results.append((v.num_kv_heads, step_min, speedup, ideal))
    print(f"{v.num_kv_heads:>3} {step_min * 1e3:>11.3f} {step_med * 1e3:>11.3f} "
          f"{per_sample:>9.4f} {v.bytes['total'] / 1e6:>8.1f} {roofline:>8.2f} "
          f"{speedup:>7.2f}x {ideal:>5.2f}x {speedup / ideal:>8.0%}")
  print("bytes per step (MB): " + "; ".join(
      f"K={v.num_kv_heads}: weights {v.bytes['weights'] / 1e6:.1f}, self cache "
      f"{v.bytes['self_cache'] / 1e6:.1f}, cross k/v {v.bytes['cross_kv'] / 1e6:.1f}"
      for v in variants))
  monotone = all(results[i][1] >= results[i + 1][1] * 0.97 for i in range(len(results) - 1))
  print(f"fewer KV heads never slower (3% tolerance): {monotone}")
  if args.compare_hf:
    if mha.num_kv_heads != shape["num_heads"]:
      print("--compare-hf needs K = num_heads among --kv-heads; skipped")
    else:
      hf_steps = time_hf(mha, shape, args.repeats)
      ours = min(mha.loop_times) / t
      print(f"HF transformers greedy generate (MHA, same weights): step min "
            f"{min(hf_steps) * 1e3:.3f} ms, median {statistics.median(hf_steps) * 1e3:.3f} ms; "
            f"ours {ours * 1e3:.3f} ms: {min(hf_steps) / ours:.2f}x faster")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
