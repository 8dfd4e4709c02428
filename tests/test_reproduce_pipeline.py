"""`gqa-t5 reproduce` end to end at toy scale, on a tiny demo-data directory the test writes:
every kind of stage runs for real (pretraining, conversion, fine-tuning, greedy evaluation,
timing, outputs; uptraining is the trainer's resume path, covered by its own tests); a rerun
skips every stage; uptraining to a larger alpha continues the smaller alpha's run. The
--initial-checkpoint path and the CLI's errors are checked too.

Registers the demo tasks over the tiny directory in this process (seqio's global registry).
"""

import dataclasses
import json
import random

import pytest

from gqa_t5.reproduce import presets

WORDS = ("river mountain city old king bread water green small house light stone road "
         "night winter music garden people story learn write island forest bridge").split()
GERMAN = ("fluss berg stadt alt konig brot wasser grun klein haus licht stein weg nacht "
          "winter musik garten leute geschichte lernen schreiben insel wald brucke").split()


def _sentence(rng, words, n):
  return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."


def write_tiny_demo_data(root):
  """A complete demo-data directory (layout.MARKER last) with a 150-piece vocabulary."""
  from gqa_t5.demo_data import layout, spm_training
  rng = random.Random(0)
  sizes = {"train": 48, "validation": 8, "test": 8}
  records = {}
  for dataset, splits in layout.DATASETS.items():
    for split in splits:
      rows = []
      for i in range(sizes[split]):
        text = " ".join(_sentence(rng, WORDS, 8) for _ in range(3))
        if dataset == "pretrain":
          rows.append({"id": f"p{i}", "source": "tiny", "text": text})
        elif dataset == "summarize":
          rows.append({"id": f"s{i}", "document": text, "summary": _sentence(rng, WORDS, 3)})
        elif dataset == "translate_en_de":
          en = _sentence(rng, WORDS, 5)
          de = " ".join(GERMAN[WORDS.index(w.strip(".").lower())] for w in en.split()) + "."
          rows.append({"id": f"t{i}", "en": en, "de": de})
        else:
          answer = rng.choice(WORDS)
          rows.append({"id": f"q{i}", "title": "tiny", "context": f"{text} The answer is "
                       f"{answer}.", "question": "What is the answer?", "answers": [answer]})
      records[(dataset, split)] = rows
  for (dataset, split), rows in records.items():
    path = layout.split_path(root, dataset, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  texts = [r["text"] for r in records[("pretrain", "train")]]
  texts += [r["de"] for r in records[("translate_en_de", "train")]]
  (root / layout.VOCAB_DIR).mkdir()
  spm_training.train_vocabulary(texts, root / "vocab" / "spm", vocab_size=150, num_threads=1)
  files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
  marker = {"format_version": layout.FORMAT_VERSION,
            "counts": {d: {s: sizes[s] for s in splits} for d, splits in layout.DATASETS.items()},
            "files": {f: {"sha256": layout.sha256_file(root / f),
                          "size": (root / f).stat().st_size} for f in files}}
  (root / layout.MARKER).write_text(json.dumps(marker))
  assert layout.is_complete(root)
  return root


# MHA, MQA and GQA-2 straight after conversion: every kind of stage, as few as possible.
TOY = dataclasses.replace(
    presets.PRESETS["test"], name="toy", alphas=(0.0,), method_alpha=0.0, methods=("mean",),
    noise_seeds=(), extra_kv_heads=(), pretrain_steps=4, finetune_steps=2, eval_examples=2,
    eval_batch=2, timing_repeats=1, checkpoint_period=2)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_tiny_demo_data(tmp_path_factory.mktemp("tiny_demo_data"))


def make_pipeline(preset, out, data_dir, **kwargs):
  from gqa_t5.reproduce import pipeline
  return pipeline.Pipeline(pipeline.Options(preset=preset, out_dir=out, data_dir=str(data_dir),
                                            progress=False, log=lambda line: None, **kwargs))


@pytest.fixture(scope="module")
def toy_run(data_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("toy_out")
  pipe = make_pipeline(TOY, out, data_dir)
  return out, pipe.run(), pipe


def test_every_stage_runs(toy_run):
  out, results, pipe = toy_run
  n = TOY.num_heads
  assert sorted(v["key"] for v in results["variants"]) == sorted(
      v.key(n) for v in TOY.quality_variants())
  for name in ("results.json", "table1.md", "fig3.png", "fig4.png", "fig5.png", "fig6.png",
               "REPORT.md"):
    assert (out / name).is_file(), name
  assert set(pipe.store.executed) == {
      "pretrain", "convert-mqa-mean", "convert-gqa2-mean", "finetune-mha-s0",
      "finetune-mqa-mean-a0-s0", "finetune-gqa2-mean-a0-s0", "eval-mha-s0",
      "eval-mqa-mean-a0-s0", "eval-gqa2-mean-a0-s0", "timing", "probe-pretrain",
      "probe-convert-mqa-mean", "probe-convert-gqa2-mean"}
  for v in results["variants"]:
    assert set(v["scores"]) == set(presets.TASKS)
    assert 0.0 <= v["average"] <= 100.0
    assert v["loss"] > 0.0 and v["start_loss"] > 0.0
    assert v["time_per_sample"] > 0.0
  assert sorted(int(k) for k in results["timing"]["kv_heads"]) == [1, 2, 4]
  # Fine-tuning continues from the converted checkpoint's step (the pretraining's).
  stage = json.loads((out / "work" / "stages" / "finetune-mqa-mean-a0-s0" /
                      "STAGE.json").read_text())
  assert stage["result"]["step"] == TOY.pretrain_steps + TOY.finetune_steps
  verdicts = {c["id"]: c["verdict"] for c in results["claims"]}
  assert verdicts["a"] == verdicts["b"] == "not run"  # no uptraining at this toy scale
  assert (out / "table1.md").read_text().startswith("# Table 1, reproduced at `toy` scale")


def test_a_rerun_skips_every_stage(toy_run, data_dir):
  out, results, _ = toy_run
  pipe = make_pipeline(TOY, out, data_dir)
  again = pipe.run()
  assert pipe.store.executed == []
  assert all(info["cached"] for info in again["stages"].values())
  assert [v["average"] for v in again["variants"]] == [v["average"] for v in
                                                      results["variants"]]


def test_uptraining_continues_the_smaller_alphas_run(toy_run, data_dir):
  out, _, _ = toy_run
  preset = dataclasses.replace(TOY, alphas=(0.0, 0.5, 1.0), method_alpha=0.5)
  pipe = make_pipeline(preset, out, data_dir)
  pipe._setup()  # pylint: disable=protected-access
  pre, pre_path = pipe.pretrain()
  conv = pipe.convert(pre, pre_path, 1, "mean")
  assert pipe.store.executed == []  # both cached from the toy run
  conv_path = conv.directory / conv.result["checkpoint"]
  half = pipe.uptrain(pre, conv, conv_path, 1, "mean", 0.5, None)
  full = pipe.uptrain(pre, conv, conv_path, 1, "mean", 1.0, half)
  assert half.result["step"] == 4 + 2 and full.result["step"] == 4 + 4
  # The alpha 1.0 run is the alpha 0.5 run continued: its log starts with the earlier steps.
  steps = [json.loads(line)["step"] for line in
           (full.directory / "model" / "metrics.jsonl").read_text().splitlines()]
  assert steps[0] <= 6 < steps[-1] == 8
  assert pipe.store.executed == ["uptrain-mqa-mean-a0.5", "uptrain-mqa-mean-a1"]


def test_the_cli_lists_finished_stages(toy_run, capsys):
  from gqa_t5.reproduce import cli
  out, _, _ = toy_run
  assert cli.main(["--preset", "test", "--out", str(out), "--dry-run"]) == 0
  listing = capsys.readouterr().out
  assert "pretrain" in listing and "done" in listing


def test_initial_checkpoint_replaces_pretraining(toy_run, data_dir, tmp_path):
  out, _, _ = toy_run
  checkpoint = out / "work" / "stages" / "pretrain" / "model"
  pipe = make_pipeline(TOY, tmp_path / "from_checkpoint", data_dir,
                       initial_checkpoint=str(checkpoint))
  pipe._setup()  # pylint: disable=protected-access
  stage, path = pipe.pretrain()
  assert path == checkpoint and stage.result["step"] == TOY.pretrain_steps
  assert pipe.dims == TOY.model
  assert not (stage.directory / "model").exists()  # nothing was trained
  grouped = out / "work" / "stages" / "convert-mqa-mean" / "checkpoint"
  pipe = make_pipeline(TOY, tmp_path / "grouped", data_dir, initial_checkpoint=str(grouped))
  pipe._setup()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="starts from a multi-head checkpoint"):
    pipe.pretrain()


def test_cli_refuses_paper_without_dry_run(capsys):
  from gqa_t5.reproduce import cli
  with pytest.raises(SystemExit):
    cli.main(["--preset", "paper"])
  assert "--preset paper --dry-run" in capsys.readouterr().err


def test_missing_data_is_reported(tmp_path):
  from gqa_t5.demo_data import layout
  from gqa_t5.reproduce import cli
  with pytest.raises(layout.DemoDataMissingError, match="prepare-demo-data"):
    cli.main(["--preset", "test", "--out", str(tmp_path / "o"), "--data-dir",
              str(tmp_path / "none"), "--no-prepare"])
