"""Expected failures of the entry points (train, convert, prepare-demo-data, reproduce, and any
command through the `gqa-t5` dispatcher), as a table: each is one line on stderr naming the
setting or path and the cause, a non-zero exit status and no traceback (that needs --verbose),
and a run refused by its checks leaves nothing in MODEL_DIR."""

import errno
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("seqio")
gin = pytest.importorskip("gin")

import trainer_fixtures as fx  # noqa: E402
from gqa_t5 import cli as gqa_cli  # noqa: E402
from gqa_t5 import command_errors  # noqa: E402
from gqa_t5 import train  # noqa: E402
from gqa_t5.checkpoints import atomic, orbax_format, synthetic  # noqa: E402
from gqa_t5.checkpoints import model_dir as model_dir_lib  # noqa: E402
from gqa_t5.convert import cli as convert_cli  # noqa: E402
from gqa_t5.demo_data import prepare  # noqa: E402
from gqa_t5.reproduce import cli as reproduce_cli  # noqa: E402
from gqa_t5.reproduce.pipeline import run as reproduce_run  # noqa: E402
from tiny_configs import tiny_config  # noqa: E402


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _toy_task():
  fx.register_toy_task()


_train_flags = fx.toy_train_flags


def _one_line(capsys, prog, words):
  """stderr's error is one line holding every word, and no traceback was printed."""
  err = capsys.readouterr().err
  assert "Traceback" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if line.startswith(prog)]
  assert len(lines) == 1, err[-3000:]
  for word in words:
    assert word in lines[0], (word, lines[0])
  return lines[0]


# ------------------------------------------------------------------ train: before anything runs

def wrong_type_train_steps(tmp_path):
  return _train_flags(tmp_path / "run", "'ten'"), ["TRAIN_STEPS", "'ten'", "integer"]


def wrong_type_batch_size(tmp_path):
  return (_train_flags(tmp_path / "run", 2, "--gin.BATCH_SIZE='8'"),
          ["BATCH_SIZE", "'8'", "integer"])


def zero_train_steps(tmp_path):
  return _train_flags(tmp_path / "run", 0), ["TRAIN_STEPS", "at least 1", "got 0"]


def wrong_type_checkpoint_period(tmp_path):
  return (_train_flags(tmp_path / "run", 2, "--gin.CHECKPOINT_PERIOD=2.5"),
          ["CHECKPOINT_PERIOD", "2.5"])


def model_dir_under_a_file(tmp_path):
  (tmp_path / "a_file").write_text("")
  run = tmp_path / "a_file" / "run"
  return _train_flags(run), [str(run), "Not a directory"]


@pytest.mark.parametrize("case", [wrong_type_train_steps, wrong_type_batch_size,
                                  zero_train_steps, wrong_type_checkpoint_period,
                                  model_dir_under_a_file], ids=lambda f: f.__name__)
def test_train_refuses_in_one_line_and_writes_nothing(tmp_path, capsys, case):
  flags, words = case(tmp_path)
  assert train.main(flags) == 2
  _one_line(capsys, "gqa_t5.train: error:", words)
  assert not os.path.exists(tmp_path / "run")  # no model_config.json, no lock, no checkpoints


# ------------------------------------------------------------------ train: MODEL_DIR on disk

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A MODEL_DIR with the checkpoints of steps 1 and 2."""
  run = tmp_path_factory.mktemp("trained") / "run"
  assert train.main(_train_flags(run, 2, "--gin.CHECKPOINT_PERIOD=1")) == 0
  assert model_dir_lib.checkpoint_steps(str(run)) == [1, 2]
  return run


def _truncate_data_files(orbax_dir) -> None:
  """Cuts every data file of an Orbax checkpoint (its `d/` folders) to half its length."""
  for data in glob.glob(os.path.join(str(orbax_dir), "**", "d", "*"), recursive=True):
    with open(data, "r+b") as f:
      f.truncate(os.path.getsize(data) // 2)


def _copy(trained, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(trained, run)
  return run


def test_truncated_latest_checkpoint_names_it_and_offers_the_previous(trained, tmp_path,
                                                                      capsys):
  run = _copy(trained, tmp_path)
  _truncate_data_files(run / "checkpoints" / "2" / "state")
  assert train.main(_train_flags(run, 3)) == 2
  line = _one_line(capsys, "gqa_t5.train: error:",
                   ["cannot restore the checkpoint of step 2", str(run / "checkpoints"),
                    "previous checkpoint is step 1"])
  assert len(line) < 1500
  assert not os.path.exists(run / model_dir_lib.LOCK_FILE)  # released on the error path


def test_truncated_checkpoint_in_a_real_process_prints_the_one_line_only(trained, tmp_path):
  """The same refusal as a user meets it, in a process of its own: the reads Orbax left in
  flight when the first one failed complete after its event loop closed, and each used to print
  an "Event loop is closed" traceback (600 lines around the error). Only the error line now."""
  run = _copy(trained, tmp_path)
  _truncate_data_files(run / "checkpoints" / "2" / "state")
  program = ("import sys; sys.path.insert(0, 'tests'); import trainer_fixtures as fx; "
             "from gqa_t5 import train; fx.register_toy_task(); "
             f"sys.exit(train.main(fx.toy_train_flags({str(run)!r}, 3)))")
  result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "Event loop is closed" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("gqa_t5.train: error:")]
  assert len(errors) == 1 and "cannot restore the checkpoint of step 2" in errors[0]


def test_resume_with_another_batch_size_is_one_line_and_closes_everything(trained, tmp_path,
                                                                           capsys):
  run = _copy(trained, tmp_path)
  assert train.main(_train_flags(run, 3, "--gin.BATCH_SIZE=4")) == 2
  _one_line(capsys, "gqa_t5.train: error:", ["batch_size=8", "4", "new MODEL_DIR"])
  assert not os.path.exists(run / model_dir_lib.LOCK_FILE)
  assert model_dir_lib.checkpoint_steps(str(run)) == [1, 2]


def test_a_full_disk_during_a_save_is_one_line(trained, tmp_path, capsys, monkeypatch):
  run = _copy(trained, tmp_path)

  def no_space(self, *args, **kwargs):
    raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/x/d/abc\": "
                     "No space left on device [OS error: No space left on device]\n"
                     "=== Source Location Trace: ===\ntensorstore/internal/os/file_util.cc:99")

  monkeypatch.setattr(model_dir_lib.ocp.CheckpointManager, "save", no_space)
  assert train.main(_train_flags(run, 3)) == 2
  _one_line(capsys, "gqa_t5.train: error:",
            ["cannot save the checkpoint of step 3", str(run / "checkpoints"),
             "No space left on device"])
  assert not glob.glob(str(run / "checkpoints" / "*tmp*"))


# The child's files may not grow past this once step 8's save starts: step 8's data files (0.8-1.2
# MB for this model) cannot be written, while metrics.jsonl and the small JSON items can.
_FILE_SIZE_LIMIT = 300_000
_FAILING_BACKGROUND_SAVE = """
import resource, signal, sys, time
sys.path.insert(0, 'tests')
import trainer_fixtures as fx
from gqa_t5 import train
from gqa_t5.checkpoints import model_dir as model_dir_lib
start_save = model_dir_lib.Checkpointer.save

def save_then_fail_to_write(self, state, data_state, force=False):
  if int(state.step) != 8:
    return start_save(self, state, data_state, force)
  self.wait()  # step 4's save completes first, with no limit
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
  resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
  started = start_save(self, state, data_state, force)
  while self.manager.is_saving_in_progress():  # its failure is known before step 9 runs
    time.sleep(0.05)
  return started

model_dir_lib.Checkpointer.save = save_then_fail_to_write
fx.register_toy_task()
sys.exit(train.main(fx.toy_train_flags({run!r}, 12, "--gin.CHECKPOINT_PERIOD=4")))
"""


def test_a_background_save_that_fails_stops_the_run_at_once_in_one_line(tmp_path):
  """A real failed write of a background save, in a process of its own: the run stops at the
  first step after the save ended (not at the next save, a checkpoint period later; the child
  waits for the save to end, so that step is 9), one line names the failed step,
  the system's cause and the checkpoint a resume starts from, nothing else is printed (Orbax's
  threads used to print 136 "Event loop is closed" tracebacks and log five more), the partial
  folder is gone, and the run resumes from the complete checkpoint."""
  run = tmp_path / "run"
  program = _FAILING_BACKGROUND_SAVE.format(limit=_FILE_SIZE_LIMIT, run=str(run))
  result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  for noise in ("Traceback", "Event loop is closed", "ERROR"):
    assert noise not in result.stderr, (noise, result.stderr[-3000:])
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("gqa_t5.train: error:")]
  assert len(errors) == 1, result.stderr[-3000:]
  for words in ("cannot save the checkpoint of step 8", str(run / "checkpoints"),
                "File too large (writing ", "latest complete checkpoint is step 4"):
    assert words in errors[0], (words, errors[0])
  assert "configurable" not in errors[0]  # gin's note on the call is not the user's business
  # Found by the first step after the save ended, not by the next save (step 12).
  assert "its write in the background failed, found at step 9." in errors[0]
  assert model_dir_lib.checkpoint_steps(str(run)) == [4]
  assert os.listdir(run / "checkpoints") == ["4"]  # the partial step 8 removed
  assert train.main(_train_flags(run, 12, "--gin.CHECKPOINT_PERIOD=4")) == 0
  assert model_dir_lib.checkpoint_steps(str(run)) == [4, 8, 12]


@gin.configurable
def _writes_to_a_full_disk(path="/x/predictions.jsonl"):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


@gin.configurable
def _calls_another_configurable():
  _writes_to_a_full_disk()


def test_an_os_error_inside_configured_functions_names_its_path(capsys):
  """gin re-raises an error of a configured function as a proxy whose OSError fields are unset
  and whose message grows a line per configured call: the report still says 'PATH: cause'."""
  with pytest.raises(OSError) as raised:
    _calls_another_configurable()
  assert "In call to configurable" in str(raised.value)  # what gin hands the entry point
  command_errors.report("gqa_t5.infer", raised.value)
  assert capsys.readouterr().err == ("gqa_t5.infer: error: /x/predictions.jsonl: No space left "
                                     "on device\n")


def test_verbose_keeps_the_traceback(tmp_path):
  with pytest.raises(ValueError, match="TRAIN_STEPS"):
    train.main(_train_flags(tmp_path / "run", "'ten'", "--verbose"))


# ------------------------------------------------------------------ convert, prepare-demo-data

@pytest.fixture(scope="module")
def source(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("src") / "ckpt")
  synthetic.write_t5x(path, tiny_config("checkpoint"))
  return path


def test_convert_of_a_truncated_orbax_checkpoint_in_a_real_process_is_one_line(tmp_path):
  """As the trainer's resume above: the reads Orbax left in flight print nothing."""
  source = str(tmp_path / "orbax")
  orbax_format.save_orbax(source, synthetic.random_params(tiny_config("checkpoint")))
  _truncate_data_files(source)
  out = tmp_path / "out"
  result = subprocess.run([sys.executable, "-m", "gqa_t5.cli", "convert", "--input", source,
                           "--output", str(out), "--num-kv-heads", "2", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("gqa-t5 convert: error:")]
  assert len(errors) == 1 and source in errors[0], result.stderr[-3000:]
  assert not out.exists()


def test_convert_to_a_read_only_output_is_one_line(source, tmp_path, capsys, monkeypatch):
  def read_only(*args, **kwargs):
    raise OSError(30, "Read-only file system", kwargs.get("dir") or str(tmp_path))

  monkeypatch.setattr(atomic.tempfile, "mkdtemp", read_only)
  out = tmp_path / "out"
  assert convert_cli.main(["--input", source, "--output", str(out), "--num-kv-heads", "2",
                           "--quiet"]) == 1
  _one_line(capsys, "gqa-t5 convert: error:", [str(tmp_path), "Read-only file system"])
  assert not out.exists()


def test_convert_to_an_output_under_a_file_is_one_line(source, tmp_path, capsys):
  (tmp_path / "a_file").write_text("")
  out = tmp_path / "a_file" / "out"
  assert convert_cli.main(["--input", source, "--output", str(out), "--num-kv-heads", "2",
                           "--quiet"]) == 1
  _one_line(capsys, "gqa-t5 convert: error:", [str(out), "is a file, not a folder"])
  assert (tmp_path / "a_file").is_file()


def test_prepare_demo_data_into_an_unwritable_dir_is_one_line(tmp_path, capsys):
  (tmp_path / "a_file").write_text("")
  target = tmp_path / "a_file" / "demo"
  assert prepare.main(["--dir", str(target)]) == 1
  _one_line(capsys, "gqa-t5 prepare-demo-data: error:", [str(target), "Not a directory"])


# ------------------------------------------------------------------ reproduce

def _no_demo_data_needed(monkeypatch, tmp_path):
  """The demo data counts as prepared: a row that gets past the early checks reaches the run."""
  monkeypatch.setattr(reproduce_cli, "_prepare_data", lambda args: tmp_path / "data")


def _failing_run(error):
  def run(self):
    raise error
  return run


def reproduce_out_under_a_file(tmp_path, monkeypatch):
  (tmp_path / "a_file").write_text("")
  out = tmp_path / "a_file" / "out"
  return ["--out", str(out)], [str(out), "Not a directory"]


def reproduce_missing_initial_checkpoint(tmp_path, monkeypatch):
  missing = tmp_path / "no_such_ckpt"
  return (["--out", str(tmp_path / "out"), "--initial-checkpoint", str(missing)],
          ["--initial-checkpoint", str(missing), "does not exist"])


def reproduce_read_only_out(tmp_path, monkeypatch):
  _no_demo_data_needed(monkeypatch, tmp_path)
  work = tmp_path / "out" / "work"
  monkeypatch.setattr(reproduce_run.Pipeline, "run",
                      _failing_run(OSError(30, "Read-only file system", str(work))))
  return ["--out", str(tmp_path / "out")], [str(work), "Read-only file system"]


def reproduce_full_disk(tmp_path, monkeypatch):
  _no_demo_data_needed(monkeypatch, tmp_path)
  stage = tmp_path / "out" / "work" / "stages" / "pretrain.work"
  monkeypatch.setattr(reproduce_run.Pipeline, "run",
                      _failing_run(OSError(28, "No space left on device", str(stage))))
  return ["--out", str(tmp_path / "out")], [str(stage), "No space left on device"]


def reproduce_missing_demo_data(tmp_path, monkeypatch):
  data = tmp_path / "empty_data"
  return (["--out", str(tmp_path / "out"), "--data-dir", str(data), "--no-prepare"],
          ["No complete demo data", str(data), "gqa-t5 prepare-demo-data"])


def reproduce_redraw_without_results(tmp_path, monkeypatch):
  return ["--redraw", str(tmp_path / "nothing")], [str(tmp_path / "nothing")]


@pytest.mark.parametrize("case", [reproduce_out_under_a_file,
                                  reproduce_missing_initial_checkpoint,
                                  reproduce_read_only_out, reproduce_full_disk,
                                  reproduce_missing_demo_data,
                                  reproduce_redraw_without_results], ids=lambda f: f.__name__)
def test_reproduce_refuses_in_one_line(tmp_path, capsys, monkeypatch, case):
  flags, words = case(tmp_path, monkeypatch)
  assert reproduce_cli.main(["--preset", "quick", "--smoke", "--no-progress", *flags]) == 2
  _one_line(capsys, "gqa-t5 reproduce: error:", words)


def test_reproduce_bad_preset_is_one_line(capsys):
  with pytest.raises(SystemExit) as exit_:
    reproduce_cli.main(["--preset", "huge"])
  assert exit_.value.code == 2
  _one_line(capsys, "gqa-t5 reproduce: error:", ["--preset", "'huge'", "quick"])


def test_reproduce_verbose_keeps_the_traceback(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    reproduce_cli.main(["--preset", "quick", "--out", str(tmp_path / "out"), "--verbose",
                        "--initial-checkpoint", str(tmp_path / "no_such_ckpt")])


# ------------------------------------------------------------------ any command: the dispatcher

def test_an_error_escaping_a_command_is_one_line_with_its_traceback_logged(tmp_path, capsys,
                                                                           monkeypatch):
  monkeypatch.setenv(command_errors.LOG_DIR_ENV_VAR, str(tmp_path / "logs"))
  (tmp_path / "a_file").write_text("")
  workdir = tmp_path / "a_file" / "work"
  assert gqa_cli.main(["benchmark-convert", "--smoke", "--workdir", str(workdir)]) == 2
  line = _one_line(capsys, "gqa-t5 benchmark-convert: error:", [str(workdir), "Not a directory",
                                                                "traceback in"])
  log = line.split("traceback in ")[1].rstrip(")")
  assert os.path.dirname(log) == str(tmp_path / "logs")
  assert "Traceback" in open(log).read()
  with pytest.raises(NotADirectoryError):
    gqa_cli.main(["--verbose", "benchmark-convert", "--smoke", "--workdir", str(workdir)])
