"""The written outputs: table1.md in the paper's layout and REPORT.md, which checks the paper's
claims (a)-(d) against a run's numbers. Pure Python over the results dict of `outputs.collect`.

A difference counts only when it exceeds the run-to-run noise the run measured (the same
comparison fine-tuned with other seeds); without a noise measurement a claim's verdict says so.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from gqa_t5.reproduce import paper
from gqa_t5.reproduce import presets as presets_lib

HELD = "held"
NOT_RUN = "not run"
NOT_HELD = "did not hold"
WITHIN_NOISE = "inconclusive (within noise)"

# Thresholds of the verdicts (the paper gives none; these say what "most", "close", "barely" mean).
MOST_OF_GAP = 0.5          # (b) uptraining recovers at least half of MHA's lead at alpha 0
CLOSE_QUALITY = 0.5        # (c) GQA's gap to MHA is at most half MQA's gap (or within noise)
CLOSE_SPEED = 0.5          # (c) GQA's time is in the MQA half of the MQA..MHA range
BARELY = 0.5               # (d) 1 -> a few groups adds under half the MQA -> MHA rise
TIME_TOLERANCE = 0.05      # (d) timing differences under 5% count as equal


def _fmt(x: Optional[float], digits: int = 2) -> str:
  return "n/a" if x is None else f"{x:.{digits}f}"


class Measure:
  """What a claim compares: the average quality (higher is better, the paper's) or the
  teacher-forced loss (lower is better, less noisy), with that measure's seed noise."""

  def __init__(self, results: Dict, field: str):
    self.field = field
    self.sign = -1.0 if field == "loss" else 1.0
    self.noise = results["noise"].get("loss" if field == "loss" else "average")
    self.name = "validation loss" if field == "loss" else "average quality"

  def score(self, variant: Optional[Dict]) -> Optional[float]:
    """Higher is better, whatever the measure."""
    if variant is None or variant.get(self.field) is None:
      return None
    return self.sign * variant[self.field]

  def raw(self, variant: Dict) -> float:
    return variant[self.field]


def _find(results: Dict, kv_heads: int, method: str = "mean", alpha: float = 0.0,
          seed: int = 0) -> Optional[Dict]:
  n = results["scale"]["num_heads"]
  for v in results["variants"]:
    if v["seed"] != seed or v["kv_heads"] != kv_heads:
      continue
    if kv_heads == n or (v["method"] == method and abs(v["alpha"] - alpha) < 1e-9):
      return v
  return None


def _greater(a: float, b: float, noise: Optional[float]) -> str:
  """'>' if a exceeds b beyond noise, '<' if below beyond noise, '~' otherwise."""
  margin = noise or 0.0
  if a - b > margin:
    return ">"
  if b - a > margin:
    return "<"
  return "~"


def _noise_text(noise: Optional[float]) -> str:
  return (f"seed noise {noise:.2f}" if noise is not None
          else "noise not measured at this preset: differences are taken at face value")


def _not_run(claim_id: str, why: str) -> Dict:
  return {"id": claim_id, "verdict": NOT_RUN, "evidence": why}


def claim_a(results: Dict, m: Measure) -> Dict:
  a = results["preset"]["method_alpha"]
  found = {meth: _find(results, 1, meth, a) for meth in ("mean", "first", "random", "aligned")}
  rows = {meth: v for meth, v in found.items() if m.score(v) is not None}
  needed = [meth for meth in ("mean", "first", "random") if meth not in rows]
  if needed:
    return _not_run("a", f"methods {needed} were not fine-tuned or measured at this preset")
  first = _greater(m.score(rows["mean"]), m.score(rows["first"]), m.noise)
  second = _greater(m.score(rows["first"]), m.score(rows["random"]), m.noise)
  if first == ">" and second == ">":
    verdict = HELD
  elif "<" in (first, second):
    verdict = NOT_HELD
  else:
    verdict = WITHIN_NOISE
  order = ", ".join(f"{meth} {m.raw(rows[meth]):.2f}"
                    for meth in sorted(rows, key=lambda k: m.score(rows[k]), reverse=True))
  evidence = (f"MQA, alpha {a:g}, {m.name} by method, best first: {order} (mean {first} first, "
              f"first {second} random; {_noise_text(m.noise)}).")
  return {"id": "a", "verdict": verdict, "evidence": evidence,
          "numbers": {meth: m.raw(v) for meth, v in rows.items()}}


def claim_b(results: Dict, m: Measure) -> Dict:
  p = results["preset"]
  g, alphas = p["gqa_kv_heads"], p["alphas"]
  mha = m.score(results["mha"])
  mqa = [m.score(_find(results, 1, "mean", a)) for a in alphas]
  gqa = [m.score(_find(results, g, "mean", a)) for a in alphas]
  if len(alphas) < 3 or None in mqa + gqa or mha is None:
    return _not_run("b", "the alpha sweep (0 and two uptraining proportions) was not run")
  noise = m.noise or 0.0
  far = _greater(gqa[0], mqa[0], m.noise)
  gap = mha - mqa[0]
  recovered = (mqa[1] - mqa[0]) / gap if gap > noise and gap > 0 else None
  gain1, gain2 = mqa[1] - mqa[0], mqa[2] - mqa[1]
  diminishing = gain2 < gain1
  if far == ">" and recovered is not None and recovered >= MOST_OF_GAP and diminishing:
    verdict = HELD
  elif far == "~" or recovered is None:
    verdict = WITHIN_NOISE
  else:
    verdict = NOT_HELD
  raw = m.sign  # back to the measure's own scale for the text
  a1, a2 = alphas[1], alphas[2]
  evidence = (
      f"{m.name.capitalize()} at alpha 0: GQA-{g} {raw * gqa[0]:.2f} vs MQA {raw * mqa[0]:.2f} "
      f"(GQA {far} MQA), MHA {raw * mha:.2f}. MQA by alpha "
      f"{', '.join(f'{a:g}: {raw * x:.2f}' for a, x in zip(alphas, mqa))}; GQA-{g} "
      f"{', '.join(f'{a:g}: {raw * x:.2f}' for a, x in zip(alphas, gqa))}. Alpha {a1:g} "
      "recovers " + (f"{recovered:.0%}" if recovered is not None else "an undefined share")
      + f" of MQA's gap to MHA ({abs(gap):.2f}; 'most' means >= {MOST_OF_GAP:.0%}); the "
      f"change from {a1:g} to {a2:g} ({raw * gain2:+.2f}) is "
      f"{'smaller' if diminishing else 'not smaller'} than from 0 to {a1:g} ({raw * gain1:+.2f})"
      f". {_noise_text(m.noise).capitalize()}.")
  return {"id": "b", "verdict": verdict, "evidence": evidence,
          "numbers": {"mqa": dict(zip(map(str, alphas), (raw * x for x in mqa))),
                      "gqa": dict(zip(map(str, alphas), (raw * x for x in gqa))),
                      "mha": raw * mha, "recovered_share": recovered}}


def claim_c(results: Dict, m: Measure) -> Dict:
  p = results["preset"]
  g, a = p["gqa_kv_heads"], p["method_alpha"]
  mha, mqa, gqa = results["mha"], _find(results, 1, "mean", a), _find(results, g, "mean", a)
  if None in (m.score(mha), m.score(mqa), m.score(gqa)):
    return _not_run("c", "MQA or GQA was not fine-tuned at this preset")
  gqa_gap = m.score(mha) - m.score(gqa)
  mqa_gap = m.score(mha) - m.score(mqa)
  quality_close = gqa_gap <= max(m.noise or 0.0, CLOSE_QUALITY * max(mqa_gap, 0.0))
  t_mha, t_mqa, t_gqa = (mha["time_per_sample"], mqa["time_per_sample"],
                         gqa["time_per_sample"])
  speed_share = (t_gqa - t_mqa) / (t_mha - t_mqa) if t_mha > t_mqa else None
  speed_close = speed_share is not None and speed_share <= CLOSE_SPEED
  verdict = HELD if quality_close and speed_close else NOT_HELD
  evidence = (
      f"{m.name.capitalize()}: MHA {m.raw(mha):.2f}, GQA-{g} {m.raw(gqa):.2f}, MQA "
      f"{m.raw(mqa):.2f}; GQA's shortfall from MHA is {gqa_gap:+.2f}, MQA's {mqa_gap:+.2f} "
      f"(negative: better than MHA); 'close' means GQA's shortfall is within noise or at most "
      f"{CLOSE_QUALITY:.0%} of MQA's: "
      f"{'yes' if quality_close else 'no'}. Time per sample: MHA {t_mha * 1e3:.2f} ms, GQA-{g} "
      f"{t_gqa * 1e3:.2f} ms, MQA {t_mqa * 1e3:.2f} ms; GQA sits at "
      + (f"{speed_share:.0%}" if speed_share is not None else "an undefined point")
      + f" of the way from MQA to MHA ('close to MQA' means <= {CLOSE_SPEED:.0%}): "
      f"{'yes' if speed_close else 'no'}. {_noise_text(m.noise).capitalize()}.")
  return {"id": "c", "verdict": verdict, "evidence": evidence,
          "numbers": {"gqa_shortfall": gqa_gap, "mqa_shortfall": mqa_gap,
                      "speed_share": speed_share}}


def claim_d(results: Dict, m: Optional[Measure] = None) -> Dict:
  del m  # timing only
  timing = results["timing"]["kv_heads"]
  ks = sorted(int(k) for k in timing)
  times = [timing[str(k)]["time_per_sample"] for k in ks]
  g = results["preset"]["gqa_kv_heads"]
  t1, tn, tg = times[0], times[-1], timing[str(g)]["time_per_sample"]
  rises = tn > t1 * (1 + TIME_TOLERANCE)
  monotone = all(b >= a * (1 - TIME_TOLERANCE) for a, b in zip(times, times[1:]))
  share = (tg - t1) / (tn - t1) if tn > t1 else None
  barely = share is not None and share <= BARELY
  verdict = HELD if rises and monotone and barely else NOT_HELD
  series = ", ".join(f"K={k}: {t * 1e3:.2f} ms" for k, t in zip(ks, times))
  evidence = (
      f"Time per sample {series}. MHA (K={ks[-1]}) is {tn / t1:.2f}x MQA; going from 1 to "
      f"{g} groups adds " + (f"{share:.0%}" if share is not None else "an undefined share")
      + f" of the MQA-to-MHA rise ('barely' means <= {BARELY:.0%}); the times "
      f"{'never fall' if monotone else 'do not always grow'} as K grows (within "
      f"{TIME_TOLERANCE:.0%}).")
  sim = results.get("paper_scale_roofline")
  if sim:
    groups = sim["groups_xxl"]
    gk = sorted(int(k) for k in groups)
    rise = (groups["8"] - groups["1"]) / (groups[str(gk[-1])] - groups["1"])
    evidence += (f" At paper scale the roofline model predicts 1 -> 8 groups adds {rise:.0%} "
                 f"of the rise to MHA (scripts/simulate_paper_timing.py).")
  return {"id": "d", "verdict": verdict, "evidence": evidence,
          "numbers": {"times": dict(zip(map(str, ks), times)), "share": share}}


def evaluate_claims(results: Dict) -> List[Dict]:
  """Each claim judged on the average quality; (a)-(c) also on the validation loss."""
  quality, loss = Measure(results, "average"), Measure(results, "loss")
  has_loss = all(v.get("loss") is not None for v in results["variants"])
  claims = []
  for fn in (claim_a, claim_b, claim_c, claim_d):
    claim = fn(results, quality)
    claim["statement"] = paper.CLAIMS[claim["id"]]
    if fn is not claim_d and has_loss:
      by_loss = fn(results, loss)
      claim["loss_verdict"] = by_loss["verdict"]
      claim["loss_evidence"] = by_loss["evidence"]
    claims.append(claim)
  return claims


FLOOR = 5.0  # an average below this means the models barely produce task outputs


def _floor_note(results: Dict) -> Optional[str]:
  best = max(v["average"] for v in results["variants"])
  if best >= FLOOR:
    return None
  return (f"The best average quality of any variant is {best:.2f}: at this scale the "
          f"fine-tuned models barely produce task outputs, so the decoded-text comparisons "
          f"are at the floor and the teacher-forced loss is the informative measure.")


# ---- table1.md -------------------------------------------------------------------------------

def _task_cells(v: Dict) -> List[str]:
  return [_fmt(v["main_scores"].get(t)) for t in presets_lib.TASKS]


def table1_markdown(results: Dict) -> str:
  s = results["scale"]
  labels = [presets_lib.TASK_LABELS[t] for t in presets_lib.TASKS]
  header = "| Model | T_infer (ms) | Average | " + " | ".join(labels) + " |"
  rule = "|---" * (3 + len(labels)) + "|"
  lines = [
      f"# Table 1, reproduced at `{results['preset']['name']}` scale",
      "",
      f"{s['description']}",
      "",
      f"Models: T5.1.1-style encoder-decoder, {s['num_layers']}+{s['num_layers']} layers, "
      f"d_model {s['emb_dim']}, {s['num_heads']} heads of {s['head_dim']}, MLP {s['mlp_dim']}, "
      f"vocabulary {s['vocab_size']} ({s['params'] / 1e6:.1f}M parameters for MHA), "
      f"{s['pretrain_origin']}. Uptrained models: alpha = "
      f"{results['preset']['method_alpha']:g}, mean pooling. Scores: greedy decoding of "
      f"{s['eval_examples']} test examples per demo task. T_infer: time per sample of greedy "
      f"decoding on this machine ({results['machine']['description']}), batch "
      f"{results['timing']['shape']['batch']}, input {results['timing']['shape']['input_length']}"
      f", output {results['timing']['shape']['output_length']}.",
      "",
      header, rule]
  for v in results["headline"]:
    lines.append(f"| {v['short_label']} | {v['time_per_sample'] * 1e3:.2f} | "
                 f"{v['average']:.2f} | " + " | ".join(_task_cells(v)) + " |")
  floor = _floor_note(results)
  if floor:
    lines += ["", floor]
  noise = results["noise"].get("average")
  loss_noise = results["noise"].get("loss")
  lines += ["", ("Run-to-run noise of the average (same comparison, other fine-tuning seeds): "
                 f"{noise:.2f}" + (f"; of the loss: {loss_noise:.3f}" if loss_noise is not None
                                   else "") + "." if noise is not None else
                 "Run-to-run noise was not measured at this preset (the mini preset measures it).")]
  lines += ["", "## Every variant", "",
            "| Model | K | method | alpha | seed | T_infer (ms) | Average | R1 | R2 | RL | BLEU "
            "| QA EM | QA F1 | Loss |", "|---" * 14 + "|"]
  for v in results["variants"]:
    sc = v["scores"]
    summ = sc.get("demo_summarize", {})
    qa = sc.get("demo_qa", {})
    lines.append(
        f"| {v['label']} | {v['kv_heads']} | {v['method'] if v['kv_heads'] != s['num_heads'] else '-'}"
        f" | {v['alpha']:g} | {v['seed']} | {v['time_per_sample'] * 1e3:.2f} | "
        f"{v['average']:.2f} | {_fmt(summ.get('rouge1'))} | {_fmt(summ.get('rouge2'))} | "
        f"{_fmt(summ.get('rougeL'))} | {_fmt(sc.get('demo_translate_en_de', {}).get('bleu'))} | "
        f"{_fmt(qa.get('em'))} | {_fmt(qa.get('f1'))} | {_fmt(v.get('loss'), 3)} |")
  lines += ["", "## The paper's Table 1 (T5.1.1 on TPU v4, for reference)", "",
            paper.table1_markdown(), "",
            "The paper's T_infer is seconds per sample per TPU v4 chip; its average is over the "
            "seven columns. The columns here are the demo tasks of this repository "
            "(`gqa-t5 prepare-demo-data`), not the paper's data sets: compare the orderings and "
            "gaps, not the values.", ""]
  return "\n".join(lines)


# ---- REPORT.md -------------------------------------------------------------------------------

def report_markdown(results: Dict) -> str:
  s = results["scale"]
  p = results["preset"]
  lines = [
      f"# Reproduction report: `{p['name']}` preset", "",
      f"**Scale.** {s['description']} A T5.1.1-style model with {s['params'] / 1e6:.1f}M "
      f"parameters ({s['num_layers']}+{s['num_layers']} layers, d_model {s['emb_dim']}, "
      f"{s['num_heads']} heads), {s['pretrain_origin']}; uptraining for alpha x "
      f"{p['pretrain_steps']} steps; fine-tuning {p['finetune_steps']} steps on the mixture of "
      f"the demo summarisation, translation and QA tasks; {s['eval_examples']} test examples "
      f"per task, greedy decoding. The paper used T5.1.1-XXL (11B parameters, 1M pretraining "
      f"steps) and seven public data sets: this is the same recipe several orders of magnitude "
      f"smaller, so absolute scores are not comparable and small differences may be noise.", "",
      f"**Run.** {results['wall_seconds'] / 60:.1f} minutes of wall-clock time for this "
      f"invocation ({results['stage_seconds'] / 60:.1f} minutes of stage time in total, "
      f"cached stages included), on {results['machine']['description']}.", ""]
  floor = _floor_note(results)
  if floor:
    lines += [f"**Floor.** {floor}", ""]
  noise = results["noise"]
  if noise.get("average") is not None:
    lines += [f"**Noise.** The cheapest comparison (MQA vs GQA-{p['gqa_kv_heads']} straight "
              f"after conversion, no uptraining) was fine-tuned again with seed(s) "
              f"{', '.join(map(str, p['noise_seeds']))}: " + "; ".join(
                  f"{pair['label']}: {pair['seed0']:.2f} vs {pair['other']:.2f}"
                  for pair in noise["pairs"]) +
              f". The largest change of an average, {noise['average']:.2f}, is the noise level "
              f"the verdicts below use. It covers fine-tuning randomness (data order, dropout) "
              f"only, not pretraining or uptraining seeds.", ""]
  else:
    lines += ["**Noise.** Not measured at this preset: the verdicts take every difference at "
              "face value. Use `--preset mini` for verdicts that account for run-to-run "
              "noise.", ""]
  lines += ["## The paper's claims", "",
            "Verdicts on the paper's measure (average of ROUGE-1, BLEU and F1 of greedy "
            "decoding) and, as a less noisy cross-check, on the teacher-forced validation loss "
            "of the same examples (cross-entropy per target token, lower is better).", "",
            "| claim | quality | loss |", "|---|---|---|"]
  for claim in results["claims"]:
    lines.append(f"| ({claim['id']}) {claim['statement']} | **{claim['verdict']}** | "
                 f"{claim.get('loss_verdict', '-')} |")
  lines.append("")
  for claim in results["claims"]:
    lines += [f"**({claim['id']}) {claim['verdict']}.** {claim['evidence']}", ""]
    if "loss_evidence" in claim:
      lines += [f"*By loss, {claim['loss_verdict']}:* {claim['loss_evidence']}", ""]
  lines += [
      "## Figures", "",
      "![Figure 3](fig3.png)", "", "![Figure 4](fig4.png)", "", "![Figure 5](fig5.png)", "",
      "![Figure 6](fig6.png)", "",
      "## Caveats", "",
      "- The demo summaries are Wikipedia short descriptions (a few words) and the German "
      "references are the Elberfelder's literal wording, so ROUGE and BLEU are low and noisy; "
      "compare variants with each other, not with the paper's scores.",
      "- Decode times are CPU times of small models: there the weights and the logits layer, "
      "not the key/value caches, dominate the bytes a step reads, so the speed-ups of fewer "
      "key/value heads are much smaller than on TPU at paper scale. "
      "`scripts/simulate_paper_timing.py` predicts the paper-scale times from a roofline "
      "model.",
      "- Fine-tuning is one run on the mixture of the three tasks (the paper fine-tunes each "
      "data set separately), with a higher constant learning rate than the paper's 0.001 "
      f"({p['finetune_learning_rate']:g}) because the runs are short.",
      "- Timings on a shared machine are pessimistic and vary between runs; each K is timed "
      "interleaved with the others, best of several repeats.", ""]
  lines += ["## Stages", "", "| stage | seconds | this run |", "|---|---|---|"]
  for name, info in results["stages"].items():
    lines.append(f"| {name} | {info['seconds']:.0f} | {'cached' if info['cached'] else 'ran'} |")
  lines.append("")
  return "\n".join(lines)
