"""Figures 3-6 of the paper, redrawn from a run's results.json (matplotlib, Agg backend).

Every function takes the typed results (`run_results.Results`) and a path, and writes the PNG
through a temporary file (a reader never sees half an image).
"""

from __future__ import annotations

import os
from typing import List, Optional

from gqa_t5.checkpoints import atomic
from gqa_t5.reproduce.report import claims
from gqa_t5.reproduce.report import paper
from gqa_t5.reproduce.report import run_results as rr

_COLORS = {"MHA": "#1f77b4", "MQA": "#d62728", "GQA": "#2ca02c"}


def _pyplot():
  # matplotlib is an optional heavy extra: loaded only when figures are drawn.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path: str) -> None:
  atomic.save_figure(fig, path, dpi=110, bbox_inches="tight")


def _color(attention: str) -> str:
  return _COLORS["GQA"] if attention.startswith("GQA") else _COLORS.get(attention, "#555555")


def _scale_note(results: rr.Results) -> str:
  s = results.scale
  return (f"{results.preset.name} preset: {s.params / 1e6:.1f}M params, "
          f"{s.pretrain_steps} pretraining steps, {s.eval_examples} test examples/task")


def _noise_bar(results: rr.Results) -> Optional[float]:
  return results.noise.average


def figure3(results: rr.Results, path: str) -> None:
  """Average quality vs time per sample (this run) beside the paper's Table 1 points."""
  plt = _pyplot()
  fig, (ax, ax_paper) = plt.subplots(1, 2, figsize=(11, 4.2))
  noise = _noise_bar(results)
  for v in results.headline:
    ax.errorbar(v.time_per_sample * 1e3, v.average, yerr=noise, fmt="o", capsize=3,
                color=_color(v.attention), ms=8)
    ax.annotate(v.short_label, (v.time_per_sample * 1e3, v.average),
                textcoords="offset points", xytext=(6, 4), fontsize=9)
  ax.margins(x=0.25, y=0.2)  # room for the labels beside the outermost points
  ax.set_xlabel("time per sample (ms, this machine)")
  ax.set_ylabel("average quality (%: R1, BLEU, F1)")
  title = "This run" + (f" (error bar: seed noise {noise:.2f})" if noise is not None else "")
  best = max(v.average for v in results.variants)
  at_floor = best < claims.FLOOR
  if at_floor:
    # The axes scale to whatever the points are: say when they are noise at the floor.
    title += (f"\nscores at the floor (best average {best:.2f} < {claims.FLOOR:g}):\nthe "
              f"decoded text barely solves the tasks; any shape here is noise")
  ax.set_title(title, fontsize=9 if at_floor else 10, color="#b22222" if at_floor else "black")
  ax.grid(alpha=0.3)
  for name, row in paper.TABLE1.items():
    # The name's first part is its attention ('GQA-8-XXL': GQA).
    ax_paper.plot(row["time"], row["average"], "o", color=_color(name.split("-")[0]), ms=8)
    ax_paper.annotate(name, (row["time"], row["average"]), textcoords="offset points",
                      xytext=(6, 4), fontsize=9)
  ax_paper.margins(x=0.25, y=0.2)
  ax_paper.set_xlabel("time per sample (s, TPU v4)")
  ax_paper.set_ylabel("average quality")
  ax_paper.set_title("Paper, Table 1 (Ainslie et al. 2023)", fontsize=10)
  ax_paper.grid(alpha=0.3)
  fig.suptitle(f"Figure 3: quality vs time per sample -- {_scale_note(results)}", fontsize=10,
               y=1.1 if at_floor else 1.03)
  _save(fig, path)
  plt.close(fig)


def _points(ax, names, values, noise, ylabel, lower_is_better=False):
  """One point per method with its seed-noise error bar (no cut-off bars to mislead)."""
  xs = list(range(len(names)))
  for x, name, value in zip(xs, names, values):
    ax.errorbar([x], [value], yerr=noise, fmt="o", ms=9, capsize=5,
                color="#2ca02c" if name == "mean" else "#7f7f7f")
    ax.annotate(f"{value:.3f}" if lower_is_better else f"{value:.2f}", (x, value),
                textcoords="offset points", xytext=(10, -3), fontsize=9)
  ax.set_xticks(xs)
  ax.set_xticklabels(names)
  ax.set_xlim(-0.5, len(names) - 0.3)
  ax.margins(y=0.25)
  ax.set_ylabel(ylabel)
  ax.grid(axis="y", alpha=0.3)


_PANELS = (("average", "average quality, % (higher is better)"),
           ("loss", "fine-tuned loss per token (lower is better)"),
           ("start_loss", "span-corruption loss before fine-tuning\n(lower is better)"))


def _panels(results: rr.Results, rows) -> List:
  """The measures every row has: quality always, the two losses when measured."""
  out = []
  for field, label in _PANELS:
    if field == "average" or all(getattr(r, field) is not None for r in rows):
      noise = results.noise.of(field) if field != "start_loss" else None
      out.append((field, label, noise))
  return out


def figure4(results: rr.Results, path: str) -> None:
  """Conversion methods: MQA uptrained with alpha = method_alpha, on every measure."""
  plt = _pyplot()
  rows = results.methods
  panels = _panels(results, rows)
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
  names = [r.method for r in rows]
  for ax, (field, label, noise) in zip(axes[0], panels):
    _points(ax, names, [getattr(r, field) for r in rows], noise, label,
            lower_is_better=field != "average")
  alpha = results.preset.method_alpha
  bars = ("error bars: seed noise" if any(noise is not None for _, _, noise in panels)
          else "no error bars: noise not measured at this preset")
  fig.suptitle(f"Figure 4: conversion methods, MQA uptrained alpha={alpha:g}; {bars} "
               f"(paper, T5-Large: mean > first > random)\n{_scale_note(results)}",
               fontsize=10, y=1.08)
  fig.tight_layout(w_pad=3.0)  # each panel's y-label clear of its neighbour's frame
  _save(fig, path)
  plt.close(fig)


def figure5(results: rr.Results, path: str) -> None:
  """Each measure vs uptraining proportion alpha for MQA and GQA; MHA as a line."""
  plt = _pyplot()
  curves = results.alpha_curves
  rows = [pt for points in curves.values() for pt in points] + [results.mha]
  panels = _panels(results, rows)
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
  for ax, (field, label, noise) in zip(axes[0], panels):
    for attention, points in curves.items():
      ax.errorbar([pt.alpha for pt in points], [getattr(pt, field) for pt in points], yerr=noise,
                  marker="o", capsize=3, label=attention, color=_color(attention))
    ax.axhline(getattr(results.mha, field), color=_COLORS["MHA"], ls="--", label="MHA")
    ax.set_xlabel("uptraining proportion alpha")
    ax.set_ylabel(label)
    ax.set_xticks(results.preset.alphas)
    ax.legend()
    ax.grid(alpha=0.3)
  fig.suptitle(f"Figure 5: quality vs uptraining proportion -- {_scale_note(results)}",
               fontsize=10, y=1.03)
  _save(fig, path)
  plt.close(fig)


def _paper_scale_panel(ax, results: rr.Results) -> None:
  """Fig. 6 at paper scale, each time over MHA-XXL's: the roofline for 8 TPU v4 chips, the
  paper's Table 1 points, and this run's measurement at the XXL shape when it made one."""
  sim = results.paper_scale_roofline
  if not sim:
    ax.axis("off")
    return
  ks = sim.xxl_groups()
  mha = sim.xxl(ks[-1])
  ax.plot(ks, [sim.xxl(k) / mha for k in ks], "o-", color=_COLORS["GQA"],
          label="roofline, 8 TPU v4 (simulate_paper_timing)")
  points = paper.xxl_seconds()
  ax.plot(list(points), [t / points[ks[-1]] for t in points.values()], "s",
          color="black", ms=8, label="paper, Table 1 (TPU v4)")
  measured = results.paper_timing
  if measured is not None:
    rows = {r.kv_heads: r.measured for r in measured.rows.values() if r.size == "xxl"}
    if ks[-1] in rows:
      mk = sorted(rows)
      ax.plot(mk, [rows[k] / rows[ks[-1]] for k in mk], "^--", color=_COLORS["MQA"], ms=8,
              label=f"measured here ({results.machine.description[:40]})")
  ax.set_xscale("log", base=2)
  ax.set_xticks(ks)
  ax.set_xticklabels([str(k) for k in ks])
  ax.set_ylim(0.0, 1.1)
  ax.set_xlabel("number of key/value groups K (T5.1.1-XXL, K=64: MHA)")
  ax.set_ylabel("time per sample / MHA-XXL's")
  ax.set_title("Paper scale: input 2048, output 512", fontsize=9)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)


def figure6(results: rr.Results, path: str) -> None:
  """Time per sample vs number of groups (this machine, the preset's model), MHA as a line;
  beside it the paper-scale shape: roofline, the paper's points and any measurement here."""
  plt = _pyplot()
  fig, (ax, ax_paper) = plt.subplots(1, 2, figsize=(11, 4.2))
  timing = results.timing
  n = results.scale.num_heads
  groups = [k for k in timing.ks() if k < n]
  times = [timing.of(k).time_per_sample * 1e3 for k in groups]
  ax.plot(groups, times, "o-", color=_COLORS["GQA"], label="GQA / MQA (K groups)")
  mha_ms = timing.of(n).time_per_sample * 1e3
  ax.axhline(mha_ms, color=_COLORS["MHA"], ls="--", label=f"MHA (K={n})")
  ax.set_xscale("log", base=2)
  ax.set_xticks(groups)
  ax.set_xticklabels([str(k) for k in groups])
  ax.set_ylim(0.0, 1.15 * max(times + [mha_ms]))
  ax.set_xlabel("number of key/value groups K")
  ax.set_ylabel("time per sample (ms)")
  shape = timing.shape
  ax.set_title(f"This machine, this preset's model: batch {shape.batch}, input "
               f"{shape.input_length}, output {shape.output_length}", fontsize=9)
  ax.legend()
  ax.grid(alpha=0.3)
  _paper_scale_panel(ax_paper, results)
  fig.suptitle(f"Figure 6: time per sample vs number of groups -- {_scale_note(results)}",
               fontsize=10, y=1.06)
  _save(fig, path)
  plt.close(fig)


FIGURES = {"fig3.png": figure3, "fig4.png": figure4, "fig5.png": figure5, "fig6.png": figure6}


def write_figures(results: rr.Results, out_dir: str) -> List[str]:
  paths = []
  for name, fn in FIGURES.items():
    path = os.path.join(out_dir, name)
    fn(results, path)
    paths.append(path)
  return paths
