"""The verdicts on the paper's claims (a)-(d) from a run's typed results (`run_results.Results`).

The verdict rules (docs/REPRODUCE.md, "How verdicts are decided"): a claim "held" or "did not
hold" only on differences that exceed the noise: the run-to-run noise the run measured (the
same comparison fine-tuned with other seeds), or, where the run measured none, the noise the
`mini` preset measured (`DEFAULT_NOISE`, stated as such). Inside the noise the verdict is
"inconclusive (within noise)", with the numbers; every verdict carries the tolerance it used.
Pure Python.
"""

from __future__ import annotations

from typing import List, Optional

from gqa_t5.reproduce.report import paper
from gqa_t5.reproduce.report import run_results as rr

HELD = "held"
NOT_RUN = "not run"
AT_FLOOR = "inconclusive (scores at the floor)"
NOT_HELD = "did not hold"
WITHIN_NOISE = "inconclusive (within noise)"

# The seed noise the `mini` preset measured (results/mini/results.json, "noise": the largest
# change of a variant's number between fine-tuning seeds), the default for a run that measures
# none; a test keeps these equal to the committed mini results.
DEFAULT_NOISE = {"average": 1.17, "loss": 0.042}
DEFAULT_NOISE_SOURCE = "the mini preset's measured seed noise"

# Thresholds of the verdicts (the paper gives none; these say what "most", "close", "barely" mean).
MOST_OF_GAP = 0.5          # (b) uptraining recovers at least half of MHA's lead at alpha 0
CLOSE_QUALITY = 0.5        # (c) GQA's gap to MHA is at most half MQA's gap (or within noise)
CLOSE_SPEED = 0.5          # (c) GQA's time is in the MQA half of the MQA..MHA range
BARELY = 0.5               # (d) 1 -> a few groups adds under half the MQA -> MHA rise
TIME_TOLERANCE = 0.05      # (d) timing differences under 5% count as equal


def fmt(x: Optional[float], digits: int = 2) -> str:
  return "n/a" if x is None else f"{x:.{digits}f}"


class Measure:
  """What a claim compares: the average quality (higher is better, the paper's) or the
  teacher-forced loss (lower is better, less noisy), with that measure's seed noise."""

  NAMES = {"average": "average quality", "loss": "fine-tuned validation loss",
           "start_loss": "span-corruption loss before fine-tuning"}

  def __init__(self, results: rr.Results, field: str):
    self.field = field
    self.sign = 1.0 if field == "average" else -1.0
    self.name = self.NAMES[field]
    # A checkpoint's pretraining-objective loss is deterministic, but other pretraining and
    # uptraining seeds would move it: the nearest measured noise is the loss's seed noise.
    noise_of = "loss" if field == "start_loss" else field
    measured = results.noise.of(noise_of)
    self.measured = measured is not None
    self.noise = measured if self.measured else DEFAULT_NOISE[noise_of]

  def tolerance_text(self) -> str:
    """The tolerance a verdict on this measure used, for printing beside it."""
    source = "measured in this run" if self.measured else DEFAULT_NOISE_SOURCE
    of_loss = " (of the fine-tuned loss)" if self.field == "start_loss" else ""
    return f"seed noise {self.noise:.2f}{of_loss}, {source}"

  def noise_text(self) -> str:
    return f"differences within {self.tolerance_text()} are inconclusive"

  def score(self, variant) -> Optional[float]:
    """Higher is better, whatever the measure (a `VariantResult`, or None: not run)."""
    if variant is None or self.raw(variant) is None:
      return None
    return self.sign * self.raw(variant)

  def raw(self, variant) -> Optional[float]:
    return getattr(variant, self.field)


def _greater(a: float, b: float, noise: float) -> str:
  """'>' if a exceeds b beyond noise, '<' if below beyond noise, '~' otherwise."""
  if a - b > noise:
    return ">"
  if b - a > noise:
    return "<"
  return "~"


def _not_run(claim_id: str, why: str) -> rr.Claim:
  return rr.Claim(id=claim_id, verdict=NOT_RUN, evidence=why)


def claim_a(results: rr.Results, m: Measure) -> rr.Claim:
  a = results.preset.method_alpha
  found = {meth: results.find(1, meth, a) for meth in ("mean", "first", "random", "aligned")}
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
              f"first {second} random; {m.noise_text()}).")
  converted = {c.method: c.start_loss for c in results.conversions if c.kv_heads == 1}
  if m.field == "start_loss" and converted:
    evidence += (" Straight after conversion, before uptraining: " + ", ".join(
        f"{meth} {loss:.2f}" for meth, loss in sorted(converted.items(), key=lambda x: x[1]))
        + " (MHA before conversion: " + fmt(m.raw(results.mha)) + ").")
  return rr.Claim(id="a", verdict=verdict, evidence=evidence,
                  numbers={meth: m.raw(v) for meth, v in rows.items()})


def claim_b(results: rr.Results, m: Measure) -> rr.Claim:
  g, alphas = results.preset.gqa_kv_heads, results.preset.alphas
  mha = m.score(results.mha)
  mqa = [m.score(results.find(1, "mean", a)) for a in alphas]
  gqa = [m.score(results.find(g, "mean", a)) for a in alphas]
  if len(alphas) < 3 or None in mqa + gqa or mha is None:
    return _not_run("b", "the alpha sweep (0 and two uptraining proportions) was not run")
  noise = m.noise
  far = _greater(gqa[0], mqa[0], m.noise)
  gap = mha - mqa[0]  # MHA's lead over MQA straight after conversion
  has_gap = gap > noise and gap > 0
  recovered = (mqa[1] - mqa[0]) / gap if has_gap else None
  # Improvements of MQA's measure (positive: better), from 0 to a1 and from a1 to a2.
  gain1, gain2 = mqa[1] - mqa[0], mqa[2] - mqa[1]
  diminishing = gain1 - gain2 > noise
  if far == ">" and has_gap and recovered >= MOST_OF_GAP and diminishing:
    verdict = HELD
  elif (far == "<" or gap < -noise or (has_gap and recovered < MOST_OF_GAP)
        or gain2 - gain1 > noise):
    verdict = NOT_HELD
  else:
    verdict = WITHIN_NOISE
  returns = ("smaller than" if diminishing else "larger than" if gain2 - gain1 > noise
             else "the same within noise as")
  raw = m.sign  # back to the measure's own scale for the text
  a1, a2 = alphas[1], alphas[2]
  evidence = (
      f"{m.name.capitalize()} at alpha 0: GQA-{g} {raw * gqa[0]:.2f} vs MQA {raw * mqa[0]:.2f} "
      f"(GQA {far} MQA), MHA {raw * mha:.2f}. MQA by alpha "
      f"{', '.join(f'{a:g}: {raw * x:.2f}' for a, x in zip(alphas, mqa))}; GQA-{g} "
      f"{', '.join(f'{a:g}: {raw * x:.2f}' for a, x in zip(alphas, gqa))}. "
      + (f"Alpha {a1:g} recovers {recovered:.0%} of MHA's lead over MQA ({gap:.2f}; 'most' "
         f"means >= {MOST_OF_GAP:.0%}); " if has_gap else
         f"MHA does not lead MQA at alpha 0 beyond noise ({gap:+.2f}): there is no gap to "
         f"recover; ")
      + f"MQA's improvement from alpha {a1:g} to {a2:g} ({gain2:+.2f}; positive: better) is "
      f"{returns} its improvement from 0 to {a1:g} ({gain1:+.2f}). "
      f"{m.noise_text().capitalize()}.")
  return rr.Claim(id="b", verdict=verdict, evidence=evidence,
                  numbers={"mqa": dict(zip(map(str, alphas), (raw * x for x in mqa))),
                           "gqa": dict(zip(map(str, alphas), (raw * x for x in gqa))),
                           "mha": raw * mha, "recovered_share": recovered})


def claim_c(results: rr.Results, m: Measure) -> rr.Claim:
  g, a = results.preset.gqa_kv_heads, results.preset.method_alpha
  mha, mqa, gqa = results.mha, results.find(1, "mean", a), results.find(g, "mean", a)
  if None in (m.score(mha), m.score(mqa), m.score(gqa)):
    return _not_run("c", "MQA or GQA was not fine-tuned at this preset")
  gqa_gap = m.score(mha) - m.score(gqa)
  mqa_gap = m.score(mha) - m.score(mqa)
  # MHA must lead MQA beyond the noise for "close to MHA" to discriminate anything.
  has_gap = mqa_gap > m.noise
  quality_close = gqa_gap <= max(m.noise, CLOSE_QUALITY * max(mqa_gap, 0.0))
  t_mha, t_mqa, t_gqa = mha.time_per_sample, mqa.time_per_sample, gqa.time_per_sample
  speed_share = (t_gqa - t_mqa) / (t_mha - t_mqa) if t_mha > t_mqa else None
  speed_close = speed_share is not None and speed_share <= CLOSE_SPEED
  if not speed_close:
    verdict = NOT_HELD
  elif not has_gap:
    verdict = WITHIN_NOISE
  else:
    verdict = HELD if quality_close else NOT_HELD
  evidence = (
      f"{m.name.capitalize()}: MHA {m.raw(mha):.2f}, GQA-{g} {m.raw(gqa):.2f}, MQA "
      f"{m.raw(mqa):.2f}; GQA's shortfall from MHA is {gqa_gap:+.2f}, MQA's {mqa_gap:+.2f} "
      f"(negative: better than MHA); 'close' means GQA's shortfall is within noise or at most "
      f"{CLOSE_QUALITY:.0%} of MQA's: "
      f"{'yes' if quality_close else 'no'}. Time per sample: MHA {t_mha * 1e3:.2f} ms, GQA-{g} "
      f"{t_gqa * 1e3:.2f} ms, MQA {t_mqa * 1e3:.2f} ms; GQA sits at "
      + (f"{speed_share:.0%}" if speed_share is not None else "an undefined point")
      + f" of the way from MQA to MHA ('close to MQA' means <= {CLOSE_SPEED:.0%}): "
      f"{'yes' if speed_close else 'no'}. "
      + ("" if has_gap else f"MHA does not lead MQA beyond the noise ({mqa_gap:+.2f}): there is "
                            f"no gap for GQA to close. ")
      + f"{m.noise_text().capitalize()}.")
  return rr.Claim(id="c", verdict=verdict, evidence=evidence,
                  numbers={"gqa_shortfall": gqa_gap, "mqa_shortfall": mqa_gap,
                           "speed_share": speed_share})


def claim_d(results: rr.Results, m: Optional[Measure] = None) -> rr.Claim:
  del m  # timing only
  timing = results.timing
  ks = timing.ks()
  times = [timing.of(k).time_per_sample for k in ks]
  g = results.preset.gqa_kv_heads
  t1, tn, tg = times[0], times[-1], timing.of(g).time_per_sample
  rises = tn > t1 * (1 + TIME_TOLERANCE)
  monotone = all(b >= a * (1 - TIME_TOLERANCE) for a, b in zip(times, times[1:]))
  share = (tg - t1) / (tn - t1) if tn > t1 else None
  barely = share is not None and share <= BARELY
  strictly = all(b >= a for a, b in zip(times, times[1:]))
  if rises and monotone and barely:
    # A time that falls by less than the tolerance as K grows: the shape holds only within it.
    verdict = HELD if strictly else WITHIN_NOISE
  else:
    verdict = NOT_HELD
  series = ", ".join(f"K={k}: {t * 1e3:.2f} ms" for k, t in zip(ks, times))
  evidence = (
      f"Time per sample {series}. MHA (K={ks[-1]}) is {tn / t1:.2f}x MQA; going from 1 to "
      f"{g} groups adds " + (f"{share:.0%}" if share is not None else "an undefined share")
      + f" of the MQA-to-MHA rise ('barely' means <= {BARELY:.0%}); the times "
      f"{'never fall' if monotone else 'do not always grow'} as K grows (within "
      f"{TIME_TOLERANCE:.0%}).")
  evidence += _where_decode_time_goes(timing, ks)
  sim = results.paper_scale_roofline
  if sim:
    mha = sim.xxl_groups()[-1]
    rise = (sim.xxl(8) - sim.xxl(1)) / (sim.xxl(mha) - sim.xxl(1))
    evidence += (f" At paper scale the roofline model predicts 1 -> 8 groups adds {rise:.0%} "
                 f"of the rise to MHA (scripts/simulate_paper_timing.py).")
  return rr.Claim(id="d", verdict=verdict, evidence=evidence,
                  tolerance=f"timing differences under {TIME_TOLERANCE:.0%} count as equal",
                  numbers={"times": dict(zip(map(str, ks), times)), "share": share})


def _where_decode_time_goes(timing: rr.DecodeTiming, ks: List[int]) -> str:
  """The encoder's share of a sample's time and each K's fraction of the memory roofline."""
  rows = [timing.of(k) for k in ks]
  if any(r.encode_time_per_sample is None or r.roofline_fraction is None for r in rows):
    return ""
  shares = [r.encode_time_per_sample / r.time_per_sample for r in rows]
  fractions = ", ".join(f"K={k}: {r.roofline_fraction:.2f}" for k, r in zip(ks, rows))
  text = (f" The encoder, the same for every K, takes {min(shares):.0%}-{max(shares):.0%} of a "
          f"sample's time; a decode step reaches this fraction of the machine's memory "
          f"roofline: {fractions}.")
  if rows[0].roofline_fraction < 0.5:
    text += (" Far from the roofline, a step's time is set by costs other than the bytes that "
             "fewer key/value heads save (on a CPU, at this size: dispatching a step's "
             "many small operations, which costs the same for every K).")
  return text


def evaluate_claims(results: rr.Results) -> List[rr.Claim]:
  """Each claim judged on the average quality; (a)-(c) also on the validation loss."""
  quality = Measure(results, "average")
  extra = [Measure(results, f) for f in ("loss", "start_loss")
           if all(getattr(v, f) is not None for v in results.variants)]
  at_floor = floor_note(results) is not None
  claims = []
  for fn in (claim_a, claim_b, claim_c, claim_d):
    claim = fn(results, quality)
    claim.statement = paper.CLAIMS[claim.id]
    if claim.tolerance is None:
      claim.tolerance = quality.tolerance_text()
    if at_floor and fn is not claim_d and claim.verdict != NOT_RUN:
      claim.verdict = AT_FLOOR  # decoded-text scores this low compare nothing
    if fn is not claim_d:
      for m in extra:
        other = fn(results, m)
        claim.checks[m.field] = rr.CrossCheck(verdict=other.verdict,
                                              tolerance=m.tolerance_text(),
                                              evidence=other.evidence)
    claims.append(claim)
  return claims


FLOOR = 5.0  # an average below this means the models barely produce task outputs


def floor_note(results: rr.Results) -> Optional[str]:
  best = max(v.average for v in results.variants)
  if best >= FLOOR:
    return None
  return (f"The best average quality of any variant is {best:.2f}: at this scale the "
          f"fine-tuned models barely produce task outputs, so the decoded-text comparisons "
          f"are at the floor and the teacher-forced loss is the informative measure.")
