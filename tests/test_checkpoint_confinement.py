"""A checkpoint may not make a reader open files outside its own folder, and its metadata may not
make a reader allocate or enumerate without bound (gqa_t5/checkpoints/confine.py).

One table per format: an absolute path, a `../` path and a symlink, each leading to a readable
array outside the checkpoint, must be refused with CheckpointError naming the entry. Every
crafted checkpoint starts from one the project writes (or t5x's fixture, copied first).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fixture_paths
from checkpoint_fixtures import write_hf, write_safetensors
from tiny_configs import tiny_config
from gqa_t5.checkpoints import confine, detect, hf, hf_files, msgpack_codec, orbax_format
from gqa_t5.checkpoints import synthetic
from gqa_t5.checkpoints import t5x_legacy
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.errors import CheckpointError
from gqa_t5.convert import cli

FIXTURE_CKPT = os.path.join(fixture_paths.T5X_TINY, "checkpoint_f32", "checkpoint_20")
WO = "encoder/layers_0/mlp/wo/kernel"
WO_DIR = "target.encoder.layers_0.mlp.wo.kernel"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ T5X legacy

def _t5x_copy(tmp_path):
  """The t5x fixture copied, and one of its zarr arrays copied outside it ('the secret')."""
  ckpt = str(tmp_path / "ckpt")
  shutil.copytree(FIXTURE_CKPT, ckpt)
  secret = str(tmp_path / "elsewhere" / "secret_array")
  shutil.copytree(os.path.join(ckpt, WO_DIR), secret)
  return ckpt, secret


def _set_spec_path(ckpt, name, path):
  file = os.path.join(ckpt, t5x_legacy.CHECKPOINT_FILE)
  state = msgpack_codec.decode(open(file, "rb").read())
  node = state["optimizer"]["target"]
  for part in name.split("/"):
    node = node[part]
  node["kvstore"]["path"] = path
  with open(file, "wb") as f:
    f.write(msgpack_codec.encode(state))


def t5x_absolute(ckpt, secret):
  _set_spec_path(ckpt, WO, secret + "/")
  return [repr(WO), repr(secret), "absolute"]


def t5x_dotdot(ckpt, secret):
  relative = os.path.relpath(secret, ckpt)
  assert relative.startswith("..")
  _set_spec_path(ckpt, WO, relative + "/")
  return [repr(WO), repr(relative), "'..'"]


def t5x_symlinked_array(ckpt, secret):
  shutil.rmtree(os.path.join(ckpt, WO_DIR))
  os.symlink(secret, os.path.join(ckpt, WO_DIR))
  return [repr(WO), os.path.join(ckpt, WO_DIR), "outside the checkpoint folder"]


def t5x_symlinked_chunk(ckpt, secret):
  chunk = os.path.join(ckpt, WO_DIR, "0.0")
  os.remove(chunk)
  os.symlink(os.path.join(secret, "0.0"), chunk)
  return [repr(WO), "'0.0'", "outside the checkpoint folder"]


def t5x_symlinked_msgpack(ckpt, secret):
  del secret
  moved = ckpt + "_msgpack"
  os.rename(os.path.join(ckpt, "checkpoint"), moved)
  os.symlink(moved, os.path.join(ckpt, "checkpoint"))
  return ["checkpoint file", "outside the checkpoint folder"]


@pytest.mark.parametrize("craft", [t5x_absolute, t5x_dotdot, t5x_symlinked_array,
                                   t5x_symlinked_chunk, t5x_symlinked_msgpack],
                         ids=lambda f: f.__name__)
def test_t5x_references_outside_the_checkpoint_are_refused(tmp_path, craft):
  ckpt, secret = _t5x_copy(tmp_path)
  words = craft(ckpt, secret)
  with pytest.raises(CheckpointError) as info:
    detect.open_checkpoint(ckpt)
  for word in words:
    assert word in str(info.value), (word, str(info.value))


def test_t5x_absolute_path_never_reaches_the_converter_output(tmp_path, capsys):
  """The probe's case: the converter copied any zarr array the user could read."""
  ckpt, secret = _t5x_copy(tmp_path)
  t5x_absolute(ckpt, secret)
  out = str(tmp_path / "out")
  assert cli.main(["--input", ckpt, "--output", out, "--num-kv-heads", "4", "--quiet"]) == 1
  err = capsys.readouterr().err
  assert secret in err and "absolute" in err and "Traceback" not in err
  assert not os.path.exists(out)


def test_t5x_relative_paths_inside_the_checkpoint_still_read(tmp_path):
  """A nested relative path (gcs-style) and a symlink that stays inside are fine."""
  ckpt, _ = _t5x_copy(tmp_path)
  original = t5x_legacy.open_t5x(FIXTURE_CKPT).tensors[WO].read()
  os.rename(os.path.join(ckpt, WO_DIR), os.path.join(ckpt, "moved"))
  os.symlink("moved", os.path.join(ckpt, WO_DIR))
  assert np.array_equal(t5x_legacy.open_t5x(ckpt).tensors[WO].read(), original)


def _zarray(ckpt, edit):
  path = os.path.join(ckpt, WO_DIR, ".zarray")
  meta = json.load(open(path))
  edit(meta)
  json.dump(meta, open(path, "w"))


def _drop_spec_shape(ckpt):
  file = os.path.join(ckpt, t5x_legacy.CHECKPOINT_FILE)
  state = msgpack_codec.decode(open(file, "rb").read())
  node = state["optimizer"]["target"]
  for part in WO.split("/"):
    node = node[part]
  node.pop("metadata", None)
  with open(file, "wb") as f:
    f.write(msgpack_codec.encode(state))


@pytest.mark.parametrize("shape,chunks,words", [
    # 2**40 chunk keys: refused by counting, before a key is listed (a hang guard below).
    ([2**16, 2**16], [1, 1], ["4294967296 chunk files", "holds 1"]),
    ([2**20, 2**20], [1, 1], ["4398046511104 bytes", "refusing"]),
    ([256, -1], [1, 1], ["non-negative integers"]),
    ([256, 128], [0, 1], ["positive integers"]),
], ids=["huge-grid", "huge-tensor", "negative", "zero-chunk"])
def test_crafted_zarr_metadata_is_bounded_before_enumeration(tmp_path, shape, chunks, words):
  ckpt, _ = _t5x_copy(tmp_path)
  _drop_spec_shape(ckpt)
  _zarray(ckpt, lambda meta: meta.update(shape=shape, chunks=chunks))
  script = ("import sys\nfrom gqa_t5.checkpoints import t5x_legacy\n"
            "from gqa_t5.checkpoints.errors import CheckpointError\n"
            "try:\n  t5x_legacy.open_t5x(sys.argv[1])\n"
            "except CheckpointError as e:\n  print(e)\n")
  # A child process with a hang guard: enumerating 2**32 keys would take hours and all memory.
  done = subprocess.run([sys.executable, "-c", script, ckpt], capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, PYTHONPATH=REPO))
  assert repr(WO) in done.stdout, done.stdout + done.stderr[-2000:]
  for word in words:
    assert word in done.stdout, (word, done.stdout)


def test_uncompressed_chunk_size_is_checked_against_the_metadata(tmp_path):
  path = str(tmp_path / "ckpt")
  t5x_legacy.save_t5x(path, synthetic.random_params(tiny_config("checkpoint")), compression="none")
  chunk = os.path.join(path, WO_DIR, "0.0")
  with open(chunk, "ab") as f:
    f.write(b"\0" * 4)
  with pytest.raises(CheckpointError, match=r"uncompressed chunk file .*0\.0 holds"):
    t5x_legacy.open_t5x(path)


# ------------------------------------------------------------------ Orbax

@pytest.fixture(scope="module")
def orbax_ckpt(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("orbax") / "ckpt")
  orbax_format.save_orbax(path, synthetic.random_params(tiny_config("checkpoint")))
  return path


def _orbax_copy(orbax_ckpt, tmp_path):
  ckpt = str(tmp_path / "ckpt")
  shutil.copytree(orbax_ckpt, ckpt)
  outside = str(tmp_path / "elsewhere")
  shutil.copytree(orbax_ckpt, outside)
  return ckpt, outside


def orbax_symlinked_item(ckpt, outside):
  """The `state` item itself a symlink to another checkpoint's (Orbax names no paths in its
  metadata, and tensorstore refuses '..' in keys: a link is the way out)."""
  shutil.rmtree(os.path.join(ckpt, "state"))
  os.symlink(os.path.join(outside, "state"), os.path.join(ckpt, "state"))
  return ["Orbax checkpoint item", "outside the checkpoint folder"]


def orbax_absolute_link(ckpt, outside):
  """A data file replaced by a symlink with an absolute target outside."""
  data = os.path.join(ckpt, "state", "ocdbt.process_0", "d")
  name = sorted(os.listdir(data))[0]
  os.remove(os.path.join(data, name))
  os.symlink(os.path.join(outside, "state", "ocdbt.process_0", "d", name),
             os.path.join(data, name))
  return [f"'ocdbt.process_0/d/{name}'", "outside the checkpoint folder"]


def orbax_dotdot_link(ckpt, outside):
  """The OCDBT database directory a relative `../` symlink out of the checkpoint."""
  db = os.path.join(ckpt, "state", "ocdbt.process_0")
  shutil.rmtree(db)
  os.symlink(os.path.relpath(os.path.join(outside, "state", "ocdbt.process_0"),
                             os.path.dirname(db)), db)
  return ["'ocdbt.process_0'", "outside the checkpoint folder"]


@pytest.mark.parametrize("craft", [orbax_symlinked_item, orbax_absolute_link, orbax_dotdot_link],
                         ids=lambda f: f.__name__)
def test_orbax_references_outside_the_checkpoint_are_refused(orbax_ckpt, tmp_path, craft):
  ckpt, outside = _orbax_copy(orbax_ckpt, tmp_path)
  words = craft(ckpt, outside)
  for opener in (orbax_format.open_orbax, orbax_format.load_orbax):
    with pytest.raises(CheckpointError) as info:
      opener(ckpt)
    for word in words:
      assert word in str(info.value), (word, str(info.value))


# ------------------------------------------------------------------ Hugging Face

@pytest.fixture(scope="module")
def hf_params():
  return synthetic.random_params(tiny_config("checkpoint"))


def _hf_sharded(tmp_path, hf_params):
  """An HF directory whose tensors are split over two shards named by an index."""
  ckpt = str(tmp_path / "hf")
  write_hf(ckpt, tiny_config("checkpoint"), hf_params)
  single = os.path.join(ckpt, hf.SAFETENSORS)
  raw = {name: read() for name, (_, _, read) in hf_files.raw_tensors(ckpt).items()}
  os.remove(single)
  names = sorted(raw)
  halves = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  weight_map = {}
  for shard, members in halves.items():
    write_safetensors(os.path.join(ckpt, shard), {n: np.ascontiguousarray(raw[n]) for n in members})
    weight_map.update({n: shard for n in members})
  with open(os.path.join(ckpt, hf.SAFETENSORS_INDEX), "w") as f:
    json.dump({"weight_map": weight_map}, f)
  outside = str(tmp_path / "elsewhere")
  os.makedirs(outside)
  shutil.copy(os.path.join(ckpt, "model-00002-of-00002.safetensors"), outside)
  return ckpt, os.path.join(outside, "model-00002-of-00002.safetensors")


def _point_shard(ckpt, target):
  index = os.path.join(ckpt, hf.SAFETENSORS_INDEX)
  data = json.load(open(index))
  data["weight_map"] = {k: (target if v.startswith("model-00002") else v)
                        for k, v in data["weight_map"].items()}
  json.dump(data, open(index, "w"))


def hf_absolute_shard(ckpt, secret):
  _point_shard(ckpt, secret)
  return [repr(secret), "absolute"]


def hf_dotdot_shard(ckpt, secret):
  relative = os.path.relpath(secret, ckpt)
  _point_shard(ckpt, relative)
  return [repr(relative), "'..'"]


def hf_symlinked_shard(ckpt, secret):
  shard = os.path.join(ckpt, "model-00002-of-00002.safetensors")
  os.remove(shard)
  os.symlink(secret, shard)
  return ["model-00002-of-00002.safetensors", "outside the checkpoint folder"]


def hf_symlinked_single_file(ckpt, secret):
  os.remove(os.path.join(ckpt, hf.SAFETENSORS_INDEX))
  os.symlink(secret, os.path.join(ckpt, hf.SAFETENSORS))
  return ["HF weight file", "outside the checkpoint folder"]


def hf_symlinked_config(ckpt, secret):
  del secret
  config = os.path.join(ckpt, hf.CONFIG_FILE)
  os.rename(config, ckpt + "_config.json")
  os.symlink(ckpt + "_config.json", config)
  return ["config.json", "outside the checkpoint folder"]


@pytest.mark.parametrize("craft", [hf_absolute_shard, hf_dotdot_shard, hf_symlinked_shard,
                                   hf_symlinked_single_file, hf_symlinked_config],
                         ids=lambda f: f.__name__)
def test_hf_references_outside_the_checkpoint_are_refused(tmp_path, hf_params, craft):
  ckpt, secret = _hf_sharded(tmp_path, hf_params)
  tree_lib.flatten(hf.open_hf(ckpt).read_all())  # the untouched copy reads
  words = craft(ckpt, secret)
  with pytest.raises(CheckpointError) as info:
    hf.open_hf(ckpt)
  for word in words:
    assert word in str(info.value), (word, str(info.value))


def test_hf_hub_cache_snapshot_links_into_its_blobs(tmp_path, hf_params):
  """The hub cache's layout (snapshots/<rev>/file -> ../../blobs/<sha>) is the one allowance."""
  repo = tmp_path / "models--t5"
  write_hf(str(tmp_path / "plain"), tiny_config("checkpoint"), hf_params)
  (repo / "blobs").mkdir(parents=True)
  snapshot = repo / "snapshots" / "abc123"
  snapshot.mkdir(parents=True)
  for i, name in enumerate((hf.CONFIG_FILE, hf.SAFETENSORS)):
    shutil.copy(tmp_path / "plain" / name, repo / "blobs" / f"blob{i}")
    os.symlink(f"../../blobs/blob{i}", snapshot / name)
  flat = tree_lib.flatten(hf.open_hf(str(snapshot)).read_all())
  assert np.array_equal(flat[WO], tree_lib.flatten(hf_params)[WO])
  # ... but a snapshot link out of the repository is refused.
  os.remove(snapshot / hf.SAFETENSORS)
  os.symlink(tmp_path / "plain" / hf.SAFETENSORS, snapshot / hf.SAFETENSORS)
  with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
    hf.open_hf(str(snapshot))


def test_crafted_safetensors_header_is_bounded(tmp_path, hf_params):
  ckpt = str(tmp_path / "hf")
  write_hf(ckpt, tiny_config("checkpoint"), hf_params)
  path = os.path.join(ckpt, hf.SAFETENSORS)
  data = open(path, "rb").read()
  header_len = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + header_len])
  name = sorted(k for k in header if k != "__metadata__")[0]
  for bad, words in (({"shape": [2**31, 2**31, 2**31]}, "refusing"),
                     ({"shape": [-4]}, "non-negative integers"),
                     ({"data_offsets": [8, 4]}, "invalid data_offsets")):
    edited = dict(header, **{name: dict(header[name], **bad)})
    raw = json.dumps(edited).encode()
    with open(path, "wb") as f:
      f.write(len(raw).to_bytes(8, "little") + raw + data[8 + header_len:])
    with pytest.raises(CheckpointError, match=words):
      hf.open_hf(ckpt)


def test_torch_pickles_load_with_weights_only(tmp_path):
  """A pickle that would run code is refused (torch.load(weights_only=True)), and its code
  never runs."""
  torch = pytest.importorskip("torch")
  marker = tmp_path / "pwned"

  class Payload:
    def __reduce__(self):
      return (os.mkdir, (str(marker),))

  ckpt = tmp_path / "hf"
  write_hf(str(ckpt), tiny_config("checkpoint"), synthetic.random_params(tiny_config("checkpoint")))
  os.remove(ckpt / hf.SAFETENSORS)
  torch.save({"shared.weight": torch.zeros(2), "evil": Payload()}, str(ckpt / hf.TORCH_BIN))
  with pytest.raises(CheckpointError, match="cannot read PyTorch checkpoint .*pytorch_model.bin"):
    hf.open_hf(str(ckpt))
  assert not marker.exists()


# ------------------------------------------------------------------ Mesh TensorFlow

@pytest.fixture(scope="module")
def mesh_tf_ckpt(tmp_path_factory):
  pytest.importorskip("tensorflow")
  import test_checkpoints_mesh_tf as mtf_tests  # its writer of the public variable names
  path = str(tmp_path_factory.mktemp("mesh_tf") / "ckpt")
  os.makedirs(path)
  params = tree_lib.flatten(synthetic.random_params(mtf_tests.CONFIG, seed=3))
  mtf_tests._write_tf_checkpoint(path, mtf_tests._variables(params, with_slots=False))
  return path


def _state_file(ckpt, prefix):
  with open(os.path.join(ckpt, "checkpoint"), "w") as f:
    f.write(f'model_checkpoint_path: "{prefix}"\nall_model_checkpoint_paths: "{prefix}"\n')


def mtf_absolute(ckpt, outside):
  prefix = os.path.join(outside, "model.ckpt-1000")
  _state_file(ckpt, prefix)
  return [repr(prefix), "outside the checkpoint folder"]


def mtf_dotdot(ckpt, outside):
  relative = os.path.relpath(os.path.join(outside, "model.ckpt-1000"), ckpt)
  _state_file(ckpt, relative)
  return [repr(relative), "'..'"]


def mtf_symlinked_data(ckpt, outside):
  data = [n for n in os.listdir(ckpt) if ".data-" in n][0]
  os.remove(os.path.join(ckpt, data))
  os.symlink(os.path.join(outside, data), os.path.join(ckpt, data))
  return [data, "outside the checkpoint folder"]


@pytest.mark.parametrize("craft", [mtf_absolute, mtf_dotdot, mtf_symlinked_data],
                         ids=lambda f: f.__name__)
def test_mesh_tf_references_outside_the_checkpoint_are_refused(mesh_tf_ckpt, tmp_path, craft):
  from gqa_t5.checkpoints import mesh_tf
  ckpt, outside = str(tmp_path / "ckpt"), str(tmp_path / "elsewhere")
  shutil.copytree(mesh_tf_ckpt, ckpt)
  shutil.copytree(mesh_tf_ckpt, outside)
  _state_file(ckpt, "model.ckpt-1000")
  mesh_tf.open_mesh_tf(ckpt)  # the untouched copy reads
  words = craft(ckpt, outside)
  with pytest.raises(CheckpointError) as info:
    detect.open_checkpoint(ckpt)
  for word in words:
    assert word in str(info.value), (word, str(info.value))


def test_mesh_tf_absolute_state_path_inside_is_accepted(mesh_tf_ckpt, tmp_path):
  """TF1's Saver writes absolute paths: one that stays inside the folder reads."""
  from gqa_t5.checkpoints import mesh_tf
  ckpt = str(tmp_path / "ckpt")
  shutil.copytree(mesh_tf_ckpt, ckpt)
  _state_file(ckpt, os.path.join(ckpt, "model.ckpt-1000"))
  assert mesh_tf.open_mesh_tf(ckpt).step == 1000


# ------------------------------------------------------------------ the helpers themselves

def test_join_inside_names_the_entry(tmp_path):
  root = str(tmp_path)
  assert confine.join_inside(root, "a/b", "x") == os.path.join(os.path.realpath(root), "a", "b")
  for entry, word in (("/etc/passwd", "absolute"), ("a/../../x", "'..'")):
    with pytest.raises(CheckpointError, match=word) as info:
      confine.join_inside(root, entry, "the entry")
    assert repr(entry) in str(info.value) and "the entry" in str(info.value)
