#!/usr/bin/env bash
# t5x's own train.py / eval.py / infer.py on gqa_t5's network with 2 key/value heads: 20 steps
# of t5x's tiny T5.1.1 on the t5x_tiny fixture's task (scripts/t5x_fixture_task.py), then eval
# and infer of the checkpoint. Needs t5x installed as gin/t5x/README.md says. Usage:
#   bash scripts/t5x_end_to_end.sh [OUT_DIR]        (about 3 minutes on 2 CPU cores)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SP=$(python -c 'import os,t5x;print(os.path.dirname(os.path.dirname(t5x.__file__)))')
OUT=$(mkdir -p "${1:-t5x_end_to_end}" && cd "${1:-t5x_end_to_end}" && pwd)
export PYTHONPATH=$REPO/tests:$REPO/scripts:$REPO${PYTHONPATH:+:$PYTHONPATH}
VOCAB="$REPO/tests/fixtures/t5x_tiny/spm.model"
COMMON=(--gin_search_paths="$SP" --gin.DROPOUT_RATE=0.0
  --gin.MIXTURE_OR_TASK_NAME="'t5x_tiny_names'" --gin.MIXTURE_OR_TASK_MODULE="'t5x_fixture_task'"
  --gin.TASK_FEATURE_LENGTHS="{'inputs': 64, 'targets': 16}"
  --gin.NUM_KV_HEADS=2 --gin.network.T5Config.vocab_size=1152
  --gin.seqio.SentencePieceVocabulary.sentencepiece_model_file="'$VOCAB'"
  --gin.seqio.SentencePieceVocabulary.extra_ids=100)
cd "$OUT"
echo "== t5x.train"
python -m t5x.train --gin_file=t5x/examples/t5/t5_1_1/tiny.gin --gin_file=t5x/configs/runs/pretrain.gin \
  --gin_file=$REPO/gin/t5x/gqa_t5_network.gin "${COMMON[@]}" --gin.MODEL_DIR="'$OUT/model'" \
  --gin.TRAIN_STEPS=20 --gin.BATCH_SIZE=16 --gin.USE_CACHED_TASKS=False \
  --gin.train.eval_period=10 --gin.train.eval_steps=2 --gin.utils.SaveCheckpointConfig.period=20 \
  > train.log 2>&1 || { tail -40 train.log; exit 1; }
python - "$OUT/model" <<'PY'
import glob, sys
import tensorflow as tf
for run in ("train", "training_eval/t5x_tiny_names"):
  for path in sorted(glob.glob(f"{sys.argv[1]}/{run}/events*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag in ("loss_per_nonpadding_target_token", "accuracy"):
          print(f"{run} step {event.step}: {v.tag} {float(tf.make_ndarray(v.tensor)):.4f}")
PY
CKPT=$(ls -d "$OUT"/model/checkpoint_* | tail -1)
echo "== t5x.eval ($CKPT)"
python -m t5x.eval --gin_file=t5x/examples/t5/t5_1_1/tiny.gin --gin_file=t5x/configs/runs/eval.gin \
  --gin_file=$REPO/gin/t5x/gqa_t5_network.gin "${COMMON[@]}" --gin.CHECKPOINT_PATH="'$CKPT'" \
  --gin.EVAL_OUTPUT_DIR="'$OUT/eval'" --gin.DatasetConfig.split="'validation'" --gin.DatasetConfig.batch_size=16 \
  --gin.utils.DatasetConfig.use_cached=False \
  > eval.log 2>&1 || { tail -40 eval.log; exit 1; }
grep -o "t5x_tiny_names/exact_match at step.*" eval.log || true
echo "== t5x.infer"
python -m t5x.infer --gin_file=t5x/examples/t5/t5_1_1/tiny.gin --gin_file=t5x/configs/runs/infer.gin \
  --gin_file=$REPO/gin/t5x/gqa_t5_network.gin "${COMMON[@]}" --gin.CHECKPOINT_PATH="'$CKPT'" \
  --gin.INFER_OUTPUT_DIR="'$OUT/infer'" --gin.DatasetConfig.split="'validation'" --gin.DatasetConfig.batch_size=16 \
  --gin.utils.DatasetConfig.use_cached=False \
  > infer.log 2>&1 || { tail -40 infer.log; exit 1; }
head -n 3 "$OUT"/infer/t5x_tiny_names-predict.jsonl-00000-of-00001
