"""A training run's checkpoints seen from outside: each records a CRC-32 per train-state
tensor, `gqa-t5 verify` checks them, a resume refuses a checkpoint whose data changed (naming it
and the previous verified one) and names the checkpoint it restored, and `gqa-t5 convert` takes
a MODEL_DIR as its latest checkpoint."""

import glob
import json
import logging
import os
import re
import shutil

import pytest

pytest.importorskip("seqio")
pytest.importorskip("gin")

import trainer_fixtures as fx  # noqa: E402
from gqa_t5 import cli as gqa_cli  # noqa: E402
from gqa_t5 import train  # noqa: E402
from gqa_t5.checkpoints import checksums, orbax_format, run_layout  # noqa: E402
from gqa_t5.checkpoints import model_dir as model_dir_lib  # noqa: E402
from gqa_t5.convert import cli as convert_cli  # noqa: E402
from gqa_t5.convert import converter  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _toy_task():
  fx.register_toy_task()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A MODEL_DIR with the checkpoints of steps 1 and 2."""
  run = tmp_path_factory.mktemp("trained") / "run"
  assert train.main(fx.toy_train_flags(run, 2, "--gin.CHECKPOINT_PERIOD=1")) == 0
  assert model_dir_lib.checkpoint_steps(str(run)) == [1, 2]
  return run


def _copy(trained, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  return run


def _step_dir(run, step):
  return os.path.join(run_layout.checkpoints_dir(str(run)), str(step))


def _flip(path, offset):
  data = bytearray(open(path, "rb").read())
  data[offset] ^= 0x01
  open(path, "wb").write(bytes(data))


def _flip_a_bit_silently(step_dir):
  """Flips one bit of the state's data files where OCDBT still reads it back, one value
  changed (a bit in a zstd-compressed block fails decompression instead: that is the restore's
  'truncated or corrupt' error); returns the verify problem it causes."""
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  for path in sorted(files, key=os.path.getsize, reverse=True):
    for fraction in (0.5, 0.25, 0.75):
      offset = int(os.path.getsize(path) * fraction)
      _flip(path, offset)
      problems = model_dir_lib.verify_checkpoint(step_dir)
      if len(problems) == 1 and "checksum crc32:" in problems[0]:
        return problems[0]
      _flip(path, offset)  # back as it was
  raise AssertionError(f"no bit of {step_dir} flips silently")


def test_every_checkpoint_records_a_checksum_per_state_tensor(trained, capsys):
  for step in (1, 2):
    step_dir = _step_dir(trained, step)
    recorded = model_dir_lib.recorded_checksums(step_dir)
    tensors = orbax_format.open_item_tensors(os.path.join(step_dir, "state"))
    assert sorted(recorded) == sorted(tensors)
    assert any(name.startswith("params/") for name in recorded)
    assert any(name.startswith("opt_state/") for name in recorded)
    name = sorted(recorded)[0]
    assert recorded[name] == checksums.tensor_checksum(tensors[name].read())
  assert gqa_cli.main(["verify", str(trained)]) == 0
  out = capsys.readouterr().out
  for step in (1, 2):
    assert f"{_step_dir(trained, step)}: every tensor matches" in out


def test_a_flipped_bit_is_named_by_verify(trained, tmp_path, capsys):
  run = _copy(trained, tmp_path)
  problem = _flip_a_bit_silently(_step_dir(run, 2))
  assert gqa_cli.main(["verify", str(run)]) == 1
  err = capsys.readouterr().err
  mismatches = [line for line in err.splitlines() if "MISMATCH" in line]
  assert len(mismatches) == 1, err
  assert re.search(rf"MISMATCH {re.escape(_step_dir(run, 2))}: (params|opt_state)/\S+: "
                   r"checksum crc32:\w+, recorded crc32:\w+", mismatches[0]), mismatches[0]
  assert mismatches[0].endswith(problem)
  assert gqa_cli.main(["verify", _step_dir(run, 1)]) == 0


def test_resume_refuses_a_checkpoint_whose_data_changed(trained, tmp_path, capsys):
  run = _copy(trained, tmp_path)
  problem = _flip_a_bit_silently(_step_dir(run, 2))
  assert train.main(fx.toy_train_flags(run, 3)) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if line.startswith("gqa_t5.train: error:")]
  assert len(lines) == 1, err[-3000:]
  for words in (f"the checkpoint of step 2 in {run_layout.checkpoints_dir(str(run))} fails its "
                "checksums", problem.split(" (the data")[0],
                "The previous checkpoint is step 1 (its checksums verified)",
                f"move {_step_dir(run, 2)} out of"):
    assert words in lines[0], (words, lines[0])
  assert not os.path.exists(run / model_dir_lib.LOCK_FILE)
  assert model_dir_lib.checkpoint_steps(str(run)) == [1, 2]  # nothing written or removed


def test_resume_names_the_checkpoint_it_restored(trained, tmp_path, caplog):
  run = _copy(trained, tmp_path)
  with caplog.at_level(logging.INFO):
    assert train.main(fx.toy_train_flags(run, 3)) == 0
  assert f"resumed from the checkpoint {_step_dir(run, 2)} (step 2)" in caplog.text
  assert model_dir_lib.checkpoint_steps(str(run)) == [1, 2, 3]


def test_convert_takes_a_model_dir_as_its_latest_checkpoint(trained, tmp_path, capsys):
  out = tmp_path / "converted"
  assert convert_cli.main(["--input", str(trained), "--output", str(out), "--num-kv-heads", "1",
                           "--compression", "none"]) == 0
  err = capsys.readouterr().err
  assert f"converting its latest checkpoint {_step_dir(trained, 2)} (step 2)" in err
  record = json.load(open(out / converter.PROVENANCE_FILE))
  assert record["source"] == _step_dir(trained, 2) and record["source_step"] == 2


def test_convert_refuses_a_model_dir_without_checkpoints(tmp_path, capsys):
  run = tmp_path / "run"
  os.makedirs(run / "checkpoints")
  assert convert_cli.main(["--input", str(run), "--output", str(tmp_path / "out"),
                           "--num-kv-heads", "1", "--quiet"]) == 1
  err = capsys.readouterr().err
  assert "Traceback" not in err
  assert f"--input {run}: {run} has a checkpoints/ directory but no checkpoint" in err
  assert not (tmp_path / "out").exists()


def test_checkpoints_without_checksums_resume_and_verify_as_unchecked(tmp_path, capsys):
  run = tmp_path / "run"
  assert train.main(fx.toy_train_flags(run, 1, "--gin.CHECKPOINT_PERIOD=1",
                                       "--gin.model_dir.CheckpointConfig.checksums=False")) == 0
  assert model_dir_lib.recorded_checksums(_step_dir(run, 1)) is None
  assert gqa_cli.main(["verify", str(run)]) == 2
  assert "records no checksums" in capsys.readouterr().err
  # Resumed with checksums on: step 1 is restored unchecked, step 2 records them.
  assert train.main(fx.toy_train_flags(run, 2, "--gin.CHECKPOINT_PERIOD=1")) == 0
  assert model_dir_lib.recorded_checksums(_step_dir(run, 2))
  assert gqa_cli.main(["verify", str(run)]) == 0
  captured = capsys.readouterr()
  assert f"{_step_dir(run, 1)}: records no checksums" in captured.err
  assert f"{_step_dir(run, 2)}: every tensor matches" in captured.out
