"""scripts/gpu_check.sh's summary: reads its steps' JSON files, prints one table of every target
figure and check, and writes it as summary.json (sections steps, tests, startup, decode, train).

  python -m gqa_t5.benchmarks.gpu_summary OUT_DIR --wall-s 412 [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, Dict, List, Optional

from gqa_t5.benchmarks import common
from gqa_t5.benchmarks import decode_report

STEPS = ("tests", "decode_L", "startup_L_warm", "decode_XXL", "train")
# The decode benchmark's own start-up targets, by the names this summary gives them.
STARTUP_TARGETS_S = {f"{shape}_{'warm' if warm else 'cold'}": seconds
                     for (shape, warm), seconds in decode_report.STARTUP_TARGETS.items()
                     if shape != "smoke"}


def _load(out: str, name: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(out, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _status(out: str, name: str) -> Dict[str, Any]:
  status = _load(out, f"{name}.status.json") or {"rc": None}
  status["timed_out"] = status.get("rc") in (124, 137)
  return status


def _tests_result(out: str) -> Optional[str]:
  path = os.path.join(out, "tests.log")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    lines = [l for l in f.read().splitlines()
             if re.search(r"\d+ (passed|failed|errors?|skipped|tests? collected)", l)]
  return lines[-1].strip("= ") if lines else None


def _startup_s(result) -> Optional[float]:
  if not result or "startup" not in result:
    return None
  return round(result["startup"]["process_start_to_first_timed_step_s"], 1)


def _profile(row: Dict[str, Any]) -> Optional[Dict[str, Any]]:
  """A benchmark row's profile (`benchmarks/profile.py`), without its top operations."""
  summary = row.get("profile")
  if not summary or "error" in summary:
    return summary
  return {"operations": round(summary["kernels"]), "busy_ms": round(summary["busy_ms"], 3),
          "span_ms": round(summary["span_ms"], 3), "top": summary["top"][0]["name"][:80]}


def _decode(result) -> Optional[Dict[str, Any]]:
  if not result:
    return None
  bandwidth = result.get("bandwidth")
  return {
      "batch": result["run"]["batch"],
      "bandwidth_GBps": round(bandwidth["used_bytes_per_s"] / 1e9, 1) if bandwidth else None,
      "per_k": [{"K": r["kv_heads"], "ms": round(r["step_ms_min"], 3),
                 "roofline": round(r["roofline_fraction"], 2),
                 "speedup": round(r["speedup_vs_mha"], 2), "ideal": round(r["ideal_speedup"], 2),
                 "profile": _profile(r)}
                for r in result.get("per_k", [])],
      "hf": result.get("hf"),
      "checks": [c for c in result.get("checks", []) if not c["name"].startswith("start-up")]}


def _train(result) -> Optional[Dict[str, Any]]:
  if not result:
    return None
  return {"ours": [{"name": o["name"], "step_ms": round(o["step_s"] * 1e3, 1),
                    "tokens_per_s": round(o["tokens_per_s"]),
                    "mfu": None if o["mfu"] is None else round(o["mfu"], 3),
                    "profile": _profile(o)}
                   for o in result["ours"]],
          "hf": result["hf"], "compile_s": round(result["compile_s"], 1),
          "checks": result["checks"]}


def summarize(out: str, wall_s: int, smoke: bool) -> Dict[str, Any]:
  steps = {name: _status(out, name) for name in STEPS}
  decode = {name: _load(out, f"decode_{name}.json") for name in ("L", "XXL")}
  warm = _load(out, "startup_L_warm.json")
  startup_checks = [c for r in (decode["L"], warm, decode["XXL"]) if r
                    for c in r.get("checks", []) if c["name"].startswith("start-up")]
  summary = {
      "smoke": smoke, "wall_s": wall_s, "steps": steps,
      "tests": dict(steps["tests"], result=_tests_result(out)),
      "startup": {"L_cold_s": _startup_s(decode["L"]), "L_warm_s": _startup_s(warm),
                  "XXL_cold_s": _startup_s(decode["XXL"]), "targets_s": STARTUP_TARGETS_S,
                  "checks": startup_checks},
      "decode": {name: _decode(r) for name, r in decode.items()},
      "train": _train(_load(out, "train.json"))}
  checks = startup_checks + [c for d in summary["decode"].values() if d for c in d["checks"]]
  checks += summary["train"]["checks"] if summary["train"] else []
  summary["checks"] = checks
  summary["all_checks_passed"] = bool(checks) and all(c["passed"] for c in checks)
  return summary


def print_summary(summary: Dict[str, Any]) -> None:
  kind = "smoke, CPU" if summary["smoke"] else "GPU"
  print(f"\n==== gpu_check summary ({kind}; {summary['wall_s']} s wall) ====")
  for name, s in summary["steps"].items():
    print(f"  step {name:<15} exit {s['rc']}{' (TIMED OUT)' if s['timed_out'] else ''}, "
          f"{s.get('seconds', '?')} s of {s.get('timeout_s', '?')}")
  print(f"  tests: {summary['tests']['result']}")
  st = summary["startup"]
  print(f"  start-up to the first timed decode step: L cold {st['L_cold_s']} s (target 60), "
        f"L warm {st['L_warm_s']} s (target 20), XXL cold {st['XXL_cold_s']} s (target 120)")
  for name, d in summary["decode"].items():
    if not d:
      print(f"  decode {name}: no result")
      continue
    print(f"  decode {name} (batch {d['batch']}, {d['bandwidth_GBps']} GB/s):")
    for k in d["per_k"]:
      print(f"    K={k['K']:>2}: {k['ms']:8.3f} ms/step, roofline {k['roofline']:.2f}, "
            f"speed-up {k['speedup']:.2f}x (ideal {k['ideal']:.2f}x)" + _profile_text(k))
    hf = d["hf"] or {}
    if "speedup_ours_vs_hf" in hf:
      print(f"    HF generate {hf['step_ms']:.3f} ms/step: ours {hf['speedup_ours_vs_hf']:.2f}x")
  _print_train(summary["train"])
  common.print_checks(summary["checks"])


def _print_train(train) -> None:
  if not train:
    print("  train: no result")
    return
  rows: List[Dict[str, Any]] = list(train["ours"])
  hf = train["hf"] or {}
  if "step_s" in hf:
    rows.append({"name": "HF", "step_ms": round(hf["step_s"] * 1e3, 1),
                 "tokens_per_s": round(hf["tokens_per_s"]), "mfu": hf.get("mfu")})
  for o in rows:
    mfu = "n/a" if o["mfu"] is None else f"{o['mfu']:.1%}"
    print(f"  train {o['name']:>6}: {o['step_ms']:8.1f} ms/step, {o['tokens_per_s']:>10,} "
          f"tokens/s, MFU {mfu}" + _profile_text(o))


def _profile_text(row: Dict[str, Any]) -> str:
  p = row.get("profile")
  if not p:
    return ""
  if "error" in p:
    return f"; profile: {p['error']}"
  return (f"; {p['operations']} operations busy {p['busy_ms']} of {p['span_ms']} ms, most: "
          f"{p['top']}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("out")
  parser.add_argument("--wall-s", type=int, default=0)
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args(argv)
  summary = summarize(args.out, args.wall_s, args.smoke)
  print_summary(summary)
  path = os.path.join(args.out, "summary.json")
  common.write_json(path, summary)
  print(f"  written: {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
