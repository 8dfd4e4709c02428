#!/usr/bin/env bash
# The paper's loop inside t5x, on the t5x-written multi-head fixture (tests/fixtures/t5x_tiny):
#   gqa-t5 convert (MHA K=8, GQA-2, MQA; unrolled and --scan-layers)
#   -> python -m t5x.train with t5x's finetune.gin, INITIAL_CHECKPOINT_PATH = the conversion
#      (no restore flags), a few uptraining steps, training eval before the first step
#   -> python -m t5x.eval   (the inference evaluator: exact match)
#   -> python -m t5x.infer  (beam search, 4 beams)
# It checks that every run exits 0, that each step-0 loss is the converted model's (far below
# a random model's ln(vocab)), that a scanned conversion starts at its unrolled twin's loss, and
# prints step-0 and final losses. Needs t5x installed as gin/t5x/README.md says. Usage:
#   bash scripts/t5x_end_to_end.sh [OUT_DIR] [STEPS]   (STEPS uptraining steps, default 10)
# t5x reads the step from INITIAL_CHECKPOINT_PATH's folder name: convert to .../checkpoint_<step>.
#   VARIANTS="gqa2:2" LAYOUTS="unrolled" bash scripts/t5x_end_to_end.sh   (a subset)
# (6 train/eval/infer triples: about 35 minutes on 2 busy CPU cores)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SP=$(python -c 'import os, t5x; print(os.path.dirname(os.path.dirname(t5x.__file__)))')
OUT=$(mkdir -p "${1:-t5x_end_to_end}" && cd "${1:-t5x_end_to_end}" && pwd)
STEPS=${2:-10}
VARIANTS=${VARIANTS:-"mha:8 gqa2:2 mqa:1"}
LAYOUTS=${LAYOUTS:-"unrolled scanned"}
export PYTHONPATH=$REPO/tests:$REPO/scripts:$REPO${PYTHONPATH:+:$PYTHONPATH}
FIXTURE="$REPO/tests/fixtures/t5x_tiny"
# The fixture's architecture (FIXTURE.md) on top of t5x's tiny.gin, its task and vocabulary.
SIZE=(--gin.network.T5Config.vocab_size=1152 --gin.network.T5Config.emb_dim=128
  --gin.network.T5Config.num_heads=8 --gin.network.T5Config.head_dim=32
  --gin.network.T5Config.mlp_dim=256 --gin.network.T5Config.num_encoder_layers=3
  --gin.network.T5Config.num_decoder_layers=2)
TASK=(--gin.MIXTURE_OR_TASK_NAME="'t5x_tiny_names'"
  --gin.MIXTURE_OR_TASK_MODULE="'t5x_fixture_task'"
  --gin.TASK_FEATURE_LENGTHS="{'inputs': 64, 'targets': 16}"
  --gin.seqio.SentencePieceVocabulary.sentencepiece_model_file="'$FIXTURE/spm.model'"
  --gin.seqio.SentencePieceVocabulary.extra_ids=100 --gin.DROPOUT_RATE=0.0)
SOURCE_STEP=$(python -c "from gqa_t5.checkpoints import t5x_legacy as t
print(t.open_t5x('$FIXTURE/checkpoint_f32/checkpoint_20').step)")
cd "$OUT"
# t5x's EncoderDecoderModel decodes with beam search; 4 beams instead of its default 1.
cat > beam_search.gin <<'GIN'
from __gin__ import dynamic_registration
from t5x import models
models.EncoderDecoderModel.predict_batch_with_aux.num_decodes = 4
GIN

losses() {  # prints "<step-0 loss> <final loss>" of a MODEL_DIR's training eval
  python - "$1" "$SOURCE_STEP" <<'PY'
import glob, sys
import tensorflow as tf
found = {}
for path in glob.glob(f"{sys.argv[1]}/training_eval/t5x_tiny_names/events*"):
  for event in tf.compat.v1.train.summary_iterator(path):
    for v in event.summary.value:
      if v.tag == "loss_per_nonpadding_target_token":
        found[event.step] = float(tf.make_ndarray(v.tensor))
start = int(sys.argv[2])
if start not in found or len(found) < 2:
  sys.exit(f"training eval losses found at steps {sorted(found)}; expected {start} and later")
print(f"{found[start]:.4f} {found[max(found)]:.4f}")
PY
}

run() {  # run LOG CMD...: runs a t5x command, shows the log's tail and stops if it fails
  local log=$1; shift
  "$@" > "$log" 2>&1 || { echo "FAILED ($log):"; tail -40 "$log"; exit 1; }
}

declare -A STEP0
SUMMARY=()
for layout in $LAYOUTS; do
  for variant in $VARIANTS; do
    name=${variant%%:*}; k=${variant##*:}; tag=$name-$layout
    scan=False; flags=(); [ "$layout" = scanned ] && { scan=True; flags=(--scan-layers); }
    NET=(--gin_search_paths="$SP" "${SIZE[@]}" "${TASK[@]}" --gin.NUM_KV_HEADS=$k
      --gin.SCAN_LAYERS=$scan)
    echo "== $tag: gqa-t5 convert --num-kv-heads $k ${flags[*]}"
    rm -rf "ckpt/$tag" "model/$tag" "eval/$tag" "infer/$tag"
    python -m gqa_t5.convert --input "$FIXTURE/checkpoint_f32/checkpoint_20" \
      --output "ckpt/$tag/checkpoint_$SOURCE_STEP" --num-kv-heads "$k" "${flags[@]}"
    echo "== $tag: t5x.train ($STEPS steps from INITIAL_CHECKPOINT_PATH=ckpt/$tag, finetune.gin)"
    run "train-$tag.log" python -m t5x.train --gin_file=t5x/examples/t5/t5_1_1/tiny.gin \
      --gin_file=t5x/configs/runs/finetune.gin --gin_file="$REPO/gin/t5x/gqa_t5_network.gin" \
      "${NET[@]}" --gin.MODEL_DIR="'$OUT/model/$tag'" \
      --gin.INITIAL_CHECKPOINT_PATH="'$OUT/ckpt/$tag/checkpoint_$SOURCE_STEP'" \
      --gin.TRAIN_STEPS=$((SOURCE_STEP + STEPS)) --gin.BATCH_SIZE=16 --gin.USE_CACHED_TASKS=False \
      --gin.train.run_eval_before_training=True --gin.train.infer_eval_dataset_cfg=None \
      --gin.train.eval_period="$STEPS" --gin.train.eval_steps=2 \
      --gin.utils.SaveCheckpointConfig.period="$STEPS"
    if grep -q "Not restoring key from ckpt" "train-$tag.log"; then
      echo "FAILED: t5x did not restore every key of ckpt/$tag:"
      grep "Not restoring key from ckpt" "train-$tag.log" | head; exit 1
    fi
    read -r step0 final <<< "$(losses "model/$tag")"
    STEP0[$tag]=$step0
    echo "   step-0 loss $step0, final loss $final (step $((SOURCE_STEP + STEPS)))"
    python - "$step0" <<'PY'
import math, sys
loss, random_level = float(sys.argv[1]), math.log(1152)
if not loss < random_level - 0.5:
  sys.exit(f"FAILED: step-0 loss {loss:.3f} is not well below a random model's "
           f"ln(1152) = {random_level:.3f}: the converted parameters were not restored")
PY
    twin=$name-unrolled
    if [ "$layout" = scanned ] && [ -n "${STEP0[$twin]:-}" ]; then
      python - "$step0" "${STEP0[$twin]}" <<'PY'
import sys
scanned, unrolled = map(float, sys.argv[1:])
if abs(scanned - unrolled) > 0.02:
  sys.exit(f"FAILED: scanned step-0 loss {scanned:.4f} != unrolled {unrolled:.4f}")
PY
    fi
    CKPT=$(ls -d "$OUT/model/$tag"/checkpoint_* | sort -t_ -k2 -n | tail -1)
    echo "== $tag: t5x.eval ($CKPT)"
    run "eval-$tag.log" python -m t5x.eval --gin_file=t5x/examples/t5/t5_1_1/tiny.gin \
      --gin_file=t5x/configs/runs/eval.gin --gin_file="$REPO/gin/t5x/gqa_t5_network.gin" \
      "${NET[@]}" --gin.CHECKPOINT_PATH="'$CKPT'" --gin.EVAL_OUTPUT_DIR="'$OUT/eval/$tag'" \
      --gin.DatasetConfig.split="'validation'" --gin.DatasetConfig.batch_size=16 \
      --gin.utils.DatasetConfig.use_cached=False
    em=$(grep -o "t5x_tiny_names/exact_match at step [0-9]*: [0-9.]*" "eval-$tag.log" | tail -1)
    echo "   $em"
    echo "== $tag: t5x.infer (beam search, 4 beams)"
    run "infer-$tag.log" python -m t5x.infer --gin_file=t5x/examples/t5/t5_1_1/tiny.gin \
      --gin_file=t5x/configs/runs/infer.gin --gin_file="$REPO/gin/t5x/gqa_t5_network.gin" \
      "${NET[@]}" --gin.CHECKPOINT_PATH="'$CKPT'" --gin.INFER_OUTPUT_DIR="'$OUT/infer/$tag'" \
      --gin.DatasetConfig.split="'validation'" --gin.DatasetConfig.batch_size=16 \
      --gin.utils.DatasetConfig.use_cached=False --gin_file="$OUT/beam_search.gin"
    python - "$OUT/infer/$tag"/t5x_tiny_names-predict.jsonl-00000-of-00001 <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
first = rows[0]
print(f"   {len(rows)} predictions, e.g. {first['inputs']['targets_pretokenized']!r} -> "
      f"{first['prediction']!r}")
PY
    SUMMARY+=("$(printf '%-5s %-9s K=%s  step-0 loss %s  final loss %s  exact match %s' \
      "$name" "$layout" "$k" "$step0" "$final" "${em##*: }")")
  done
done
echo "== summary: training-eval loss per non-padding target token at step $SOURCE_STEP (step 0" \
  "of uptraining) and $((SOURCE_STEP + STEPS)); t5x.eval's exact match"
printf '%s\n' "${SUMMARY[@]}"
