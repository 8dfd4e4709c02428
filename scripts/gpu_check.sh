#!/usr/bin/env bash
# One prepared check of the GPU path on one GPU (an H200), in at most 10 minutes wall time:
#   (a) the GPU-relevant tests, (b) start-up figures (Large cold and warm compilation cache, XXL
#   cold), (c) benchmark-decode at shapes L (with --compare-hf) and XXL, (d) benchmark-train
#   (Large, with --compare-hf); the benchmarks with --profile (where each K's decode step and
#   train step spend their time: operations, device busy vs idle). Each step has its own
#   timeout and writes JSON (and a log) into
#   ${OUT:-./gpu_check_out}; a summary table is printed and written as summary.json.
#
#   bash scripts/gpu_check.sh            # on the GPU box (jax[cuda], torch, transformers there)
#   bash scripts/gpu_check.sh --smoke    # the same steps on a CPU, tiny shapes, < 2 minutes
#   bash scripts/gpu_check.sh --only tests,train   # some steps (tests decode_L startup_L_warm
#                                                  # decode_XXL train); the rest are "not run"
#
# It installs nothing: the package runs from this checkout (PYTHONPATH), so a box without
# TensorFlow, seqio or gin-config needs only jax, flax, optax, orbax (and torch/transformers
# for the HF comparisons). Budgets (seconds) can be overridden: T_TESTS, T_DECODE_L, T_WARM,
# T_DECODE_XXL, T_TRAIN; PYTEST_FLAGS (default "-q -rfE", with "-n 8" where pytest-xdist is
# installed) sets the tests' flags. Every failure is listed: one run must show them all.
# The compilation caches live outside $OUT (in ${TMPDIR:-/tmp}), so $OUT holds only logs and
# JSON: small enough to copy back whole. Keep your own console log outside $OUT too: the
# script empties $OUT of earlier logs.
set -u -o pipefail

STEPS_ALL="tests decode_L startup_L_warm decode_XXL train"
SMOKE=0
ONLY="$STEPS_ALL"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --only) ONLY="${2:-}"; shift
      for name in ${ONLY//,/ }; do
        case " $STEPS_ALL " in *" $name "*) ;; *)
          echo "gpu_check.sh: --only: no step '$name' (steps: $STEPS_ALL)" >&2; exit 2 ;;
        esac
      done ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --smoke, --only STEPS or nothing)" >&2
       exit 2 ;;
  esac
  shift
done
ONLY=" ${ONLY//,/ } "

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-./gpu_check_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# A fresh cache directory per run, so "cold" means cold even when two runs overlap (pytest-xdist
# workers each running the smoke); removed when the script exits.
CACHE="$(mktemp -d "${TMPDIR:-/tmp}/gqa_t5_gpu_check_cache.XXXXXX")"
trap 'rm -rf "$CACHE"' EXIT
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PY="${PYTHON:-python}"
GQA=("$PY" -m gqa_t5.cli)
if ! "$PY" -c "import gqa_t5.benchmarks.common" 2>/dev/null; then
  echo "gqa_t5 is not importable from $REPO with $PY: check jax/flax/optax are installed" >&2
  exit 2
fi

TESTS=()
for pattern in tests/test_attention.py tests/test_network.py tests/test_models.py \
               tests/test_param_init.py tests/test_decoding.py tests/test_checkpoints_*.py \
               tests/test_convert*.py tests/test_trainer.py; do
  for file in $pattern; do
    if [ -f "$file" ]; then TESTS+=("$file"); else echo "gpu_check.sh: no $file, skipped" >&2; fi
  done
done
if [ "$SMOKE" = 1 ]; then
  # On a CPU the limits are hang guards only: a busy machine may run these steps several
  # times slower, and a smoke run judges no speed.
  T_TESTS="${T_TESTS:-600}" T_DECODE_L="${T_DECODE_L:-600}" T_WARM="${T_WARM:-600}"
  T_DECODE_XXL="${T_DECODE_XXL:-600}" T_TRAIN="${T_TRAIN:-600}"
  TEST_ARGS=(--collect-only -q)  # on a CPU the suite's own run checks them; here: they import
  DECODE_L=(--smoke --compare-hf --profile)
  DECODE_XXL=(--smoke --shape XXL --output-length 16 --timed-steps 4 --kv-heads 8,1 --profile)
  TRAIN=(--smoke --compare-hf --peak-tflops 1 --profile)
  export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
else
  # The H200 runs (jax 0.11.2): 8 workers ran 151 of these 211 tests in 168 s; decode_L took
  # 105 s (HF included), startup_L_warm 13 s, decode_XXL 91 s, train 213 s with 10 steps. The
  # profiles (one traced loop, or two traced steps, per K) came later: 5 s more each, a guess.
  # The limits add up to 600 s.
  T_TESTS="${T_TESTS:-130}" T_DECODE_L="${T_DECODE_L:-130}" T_WARM="${T_WARM:-25}"
  T_DECODE_XXL="${T_DECODE_XXL:-110}" T_TRAIN="${T_TRAIN:-205}"
  WORKERS=""
  if "$PY" -c "import xdist" 2>/dev/null; then WORKERS="-n 8"; fi
  read -r -a TEST_ARGS <<< "${PYTEST_FLAGS:--q -rfE $WORKERS}"
  DECODE_L=(--shape L --compare-hf --profile)
  DECODE_XXL=(--shape XXL --profile)
  TRAIN=(--compare-hf --steps 5 --profile)
fi

START=$(date +%s)
# step NAME TIMEOUT MEM_FRACTION COMMAND...: runs it under `timeout`, log in $OUT/NAME.log. At
# the limit the step gets SIGINT first: pytest then prints the failures it has seen, and a
# benchmark its Python stack (where the time went).
step() {
  local name="$1" limit="$2" fraction="$3"; shift 3
  case "$ONLY" in *" $name "*) ;; *) echo "=== $name: not run (--only)"; return ;; esac
  echo "=== $name (timeout ${limit}s, XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction): $*"
  local begin=$(date +%s)
  XLA_PYTHON_CLIENT_MEM_FRACTION="$fraction" timeout --signal=INT --kill-after=10 "$limit" "$@" \
    2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "{\"rc\": $rc, \"seconds\": $(( $(date +%s) - begin )), \"timeout_s\": $limit}" \
    > "$OUT/$name.status.json"
  echo "=== $name: exit $rc after $(( $(date +%s) - begin ))s"
}

rm -f "$OUT"/*.json "$OUT"/*.log
# (a) Tests. They share the GPU with nothing else: no preallocation, so their children fit too.
XLA_PYTHON_CLIENT_PREALLOCATE=false step tests "$T_TESTS" 0.5 \
  "$PY" -m pytest "${TEST_ARGS[@]}" "${TESTS[@]}"
# (c)+(b) Decode at L with a cold cache (its start-up is the cold figure), then a fresh process
# on the warm cache that stops at the first timed step (the warm figure). HF needs memory too.
step decode_L "$T_DECODE_L" 0.5 "${GQA[@]}" benchmark-decode "${DECODE_L[@]}" \
  --jax-cache-dir "$CACHE/L" --json "$OUT/decode_L.json"
step startup_L_warm "$T_WARM" 0.5 "${GQA[@]}" benchmark-decode "${DECODE_L[@]}" --startup-only \
  --jax-cache-dir "$CACHE/L" --json "$OUT/startup_L_warm.json"
# XXL, cold: its batch is fitted to the memory JAX may take.
step decode_XXL "$T_DECODE_XXL" 0.92 "${GQA[@]}" benchmark-decode "${DECODE_XXL[@]}" \
  --jax-cache-dir "$CACHE/XXL" --json "$OUT/decode_XXL.json"
# (d) Training, with HF transformers (torch) on the same GPU.
step train "$T_TRAIN" 0.45 "${GQA[@]}" benchmark-train "${TRAIN[@]}" \
  --jax-cache-dir "$CACHE/train" --json "$OUT/train.json"

"$PY" -m gqa_t5.benchmarks.gpu_summary "$OUT" --wall-s $(( $(date +%s) - START )) \
  $([ "$SMOKE" = 1 ] && echo --smoke)
