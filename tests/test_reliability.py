"""Corrupt and malformed checkpoints and conversion requests, as a table.

Each case builds a bad input, runs `gqa-t5 convert` on it and asserts exit status 1, a message
that names the problem (file, tensor, count or value), no traceback, and nothing left behind in
the output's parent directory. Cases marked `read` also go through `load_params`, which must
raise CheckpointError with the same words.
"""

import dataclasses
import os
from typing import Callable, Sequence

import numpy as np
import pytest

from checkpoint_fixtures import entries, write_hf
from tiny_configs import tiny_config
from gqa_t5.checkpoints import detect, msgpack_codec, orbax_format, synthetic, t5x_legacy
from gqa_t5.checkpoints import tree as tree_lib
from gqa_t5.checkpoints.errors import CheckpointError
from gqa_t5.convert import cli, converter

KEY = "decoder/layers_0/self_attention/key/kernel"
WO = "encoder/layers_1/mlp/wo/kernel"


def _params(**changes):
  """Random parameters; `changes` maps a tensor name to a function editing it in place."""
  flat = tree_lib.flatten(synthetic.random_params(tiny_config("checkpoint")))
  for name, change in changes.items():
    change(flat[name.replace("__", "/")])
  return flat


def _t5x(root, flat=None, compression="none"):
  path = os.path.join(root, "src")
  t5x_legacy.save_t5x(path, tree_lib.unflatten(flat or _params()), compression=compression)
  return path


def _edit_file(path, edit):
  with open(path, "rb") as f:
    data = bytearray(f.read())
  with open(path, "wb") as f:
    f.write(bytes(edit(data)))


def _flip(data, at):
  data[at] ^= 0x40
  return data


def _ckpt_file(path):
  return os.path.join(path, t5x_legacy.CHECKPOINT_FILE)


def truncated_msgpack(root):
  path = _t5x(root)
  _edit_file(_ckpt_file(path), lambda d: d[:len(d) // 2])
  return [path], ["damaged T5X checkpoint", _ckpt_file(path), "not readable msgpack"]


def flipped_first_byte(root):
  path = _t5x(root)
  _edit_file(_ckpt_file(path), lambda d: _flip(d, 0))
  return [path], ["damaged T5X checkpoint", _ckpt_file(path), "is not msgpack"]


def flipped_byte_in_spec(root):
  path = _t5x(root)
  spec_path = b"target.decoder.layers_0.self_attention.key.kernel"
  _edit_file(_ckpt_file(path), lambda d: _flip(d, d.index(spec_path) + 10))
  return [path], [repr(KEY), "zarr directory", "is missing"]


def garbage_msgpack_forced_format(root):
  path = _t5x(root)
  _edit_file(_ckpt_file(path), lambda d: b"\xc1" + d[1:])
  return [path, "--input-format", "t5x"], [_ckpt_file(path), "FormatError"]


def empty_checkpoint_file(root):
  path = _t5x(root)
  open(_ckpt_file(path), "wb").close()
  return [path], ["damaged T5X checkpoint", _ckpt_file(path), "is empty"]


def truncated_zarr_chunk(root):
  path = _t5x(root)
  _edit_file(os.path.join(path, "target." + WO.replace("/", "."), "0.0"), lambda d: d[:10])
  return [path], [repr(WO)]


def flipped_byte_in_gzip_chunk(root):
  path = _t5x(root, compression="gzip")
  _edit_file(os.path.join(path, "target." + WO.replace("/", "."), "0.0"),
             lambda d: _flip(d, len(d) // 2))
  return [path], [repr(WO), "cannot read zarr array"]


def nan_in_pooled_tensor(root):
  path = _t5x(root, _params(**{KEY: lambda a: a.__setitem__((0, 0), np.nan)}))
  return [path], [repr(KEY), "1 non-finite value(s)", "--allow-nonfinite"]


def inf_in_copied_tensor(root):
  def two_infs(a):
    a[0, :2] = [np.inf, -np.inf]
  path = _t5x(root, _params(**{WO: two_infs}))
  return [path], [repr(WO), "2 non-finite value(s)"]


def _hf(root, flat):
  path = os.path.join(root, "src")
  write_hf(path, tiny_config("checkpoint"), tree_lib.unflatten(flat))
  return path


def nan_in_safetensors(root):
  path = _hf(root, _params(**{WO: lambda a: a.__setitem__(slice(None), np.nan)}))
  return [path], [repr(WO), f"{24 * 16} non-finite value(s)"]


def truncated_safetensors(root):
  path = _hf(root, _params())
  _edit_file(os.path.join(path, "model.safetensors"), lambda d: d[:len(d) - 100])
  return [path], ["model.safetensors", "truncated"]


def flipped_byte_in_safetensors_header(root):
  path = _hf(root, _params())
  _edit_file(os.path.join(path, "model.safetensors"), lambda d: _flip(d, 8))  # the JSON's '{'
  return [path], ["model.safetensors", "corrupt"]


def damaged_orbax_metadata(root):
  path = os.path.join(root, "src")
  orbax_format.save_orbax(path, tree_lib.unflatten(_params()))
  with open(os.path.join(path, "state", "_METADATA"), "w") as f:
    f.write("{not json")
  return [path], ["Orbax", os.path.join(path, "state")]


def wrong_shape(root):
  flat = _params()
  flat[WO] = flat[WO][:, :-1]
  return [_t5x(root, flat)], [repr(WO), "has shape (24, 15)", "expected (24, 16)"]


def missing_tensor(root):
  flat = _params()
  del flat[KEY]
  return [_t5x(root, flat)], ["missing tensor", repr(KEY)]


def undetectable(root):
  path = os.path.join(root, "src")
  os.makedirs(path)
  with open(os.path.join(path, "weights.npz"), "wb") as f:
    f.write(b"nothing")
  return [path], ["cannot detect the checkpoint format", path]


@dataclasses.dataclass
class Case:
  name: str
  build: Callable  # root -> (input args, words the message must hold)
  args: Sequence = ("--num-kv-heads", 2)
  read: bool = False  # load_params must refuse it too


CORRUPT = [
    Case("truncated msgpack file", truncated_msgpack, read=True),
    Case("flipped first byte of the msgpack file", flipped_first_byte, read=True),
    Case("flipped byte inside a tensor spec", flipped_byte_in_spec, read=True),
    Case("garbage msgpack, --input-format t5x", garbage_msgpack_forced_format),
    Case("empty checkpoint file", empty_checkpoint_file, read=True),
    Case("truncated zarr chunk", truncated_zarr_chunk, read=True),
    Case("flipped byte in a gzip zarr chunk", flipped_byte_in_gzip_chunk, read=True),
    Case("NaN in a pooled key kernel", nan_in_pooled_tensor),
    Case("inf in a copied tensor", inf_in_copied_tensor),
    Case("NaN in a safetensors file", nan_in_safetensors),
    Case("truncated safetensors file", truncated_safetensors, read=True),
    Case("flipped byte in the safetensors header", flipped_byte_in_safetensors_header, read=True),
    Case("damaged Orbax _METADATA", damaged_orbax_metadata, read=True),
    Case("wrongly shaped tensor", wrong_shape, read=True),
    Case("missing tensor", missing_tensor, read=True),
    Case("undetectable format", undetectable, read=True),
    Case("--num-kv-heads 3 of 4 heads", lambda root: ([_t5x(root)], [
        "num_kv_heads=3 does not divide the 4 query heads", "[1, 2, 4]"]), ("--num-kv-heads", 3)),
    Case("--num-kv-heads 0", lambda root: ([_t5x(root)], ["num_kv_heads=0"]),
         ("--num-kv-heads", 0)),
    Case("--num-kv-heads -2", lambda root: ([_t5x(root)], ["num_kv_heads=-2"]),
         ("--num-kv-heads", -2)),
    Case("--num-cross-kv-heads 8 of 4 heads", lambda root: ([_t5x(root)], [
        "num_cross_kv_heads=8 does not divide"]), ("--num-kv-heads", 2, "--num-cross-kv-heads", 8)),
]


@pytest.mark.parametrize("case", CORRUPT, ids=[c.name for c in CORRUPT])
def test_bad_input_names_the_problem_and_leaves_nothing(tmp_path, capsys, case):
  (tmp_path / "in").mkdir()
  inputs, words = case.build(str(tmp_path / "in"))
  before = entries(tmp_path / "in")
  out_parent = tmp_path / "out"
  out_parent.mkdir()
  assert cli.main([str(a) for a in ["--input", *inputs, "--output", out_parent / "gqa",
                                    *case.args]]) == 1
  err = capsys.readouterr().err
  assert err.startswith("gqa-t5 convert: error: ") and "Traceback" not in err, err
  for word in words:
    assert word in err, (word, err)
  assert entries(out_parent) == [] and entries(tmp_path / "in") == before
  if case.read:
    with pytest.raises(CheckpointError) as error:
      detect.load_params(inputs[0])
    assert words[0] in str(error.value) or words[-1] in str(error.value), str(error.value)


@pytest.fixture
def source(tmp_path):
  return _t5x(str(tmp_path))


def _convert(*argv):
  return cli.main([str(a) for a in argv])


def test_output_inside_the_input_is_refused(tmp_path, source, capsys):
  before = entries(source)
  assert _convert("--input", source, "--output", os.path.join(source, "gqa"),
                  "--num-kv-heads", 2) == 1
  assert "is inside the input checkpoint" in capsys.readouterr().err
  assert entries(source) == before


def test_input_inside_the_output_is_refused_even_with_overwrite(tmp_path, source, capsys):
  assert _convert("--input", source, "--output", tmp_path, "--num-kv-heads", 2,
                  "--overwrite") == 1
  assert "is inside the output path" in capsys.readouterr().err
  assert t5x_legacy.load_t5x(source)[0]  # the source is intact


def test_output_is_the_input_and_output_parent_missing(tmp_path, source, capsys):
  assert _convert("--input", source, "--output", source, "--num-kv-heads", 2,
                  "--overwrite") == 1
  assert "is the input path" in capsys.readouterr().err
  assert entries(tmp_path) == ["src"]
  # A missing parent folder is created (and nothing is left when the conversion fails).
  assert _convert("--input", source, "--output", tmp_path / "no" / "gqa", "--num-kv-heads",
                  3) == 1
  assert entries(tmp_path) == ["src"]
  assert _convert("--input", source, "--output", tmp_path / "no" / "gqa", "--num-kv-heads",
                  2) == 0
  assert t5x_legacy.load_t5x(str(tmp_path / "no" / "gqa"))[0]


def test_existing_output_is_kept(tmp_path, source, capsys):
  out = tmp_path / "gqa"
  out.mkdir()
  (out / "keep").write_text("precious")
  assert _convert("--input", source, "--output", out, "--num-kv-heads", 2) == 1
  assert "already exists" in capsys.readouterr().err
  assert (out / "keep").read_text() == "precious" and entries(tmp_path) == ["gqa", "src"]


def test_allow_nonfinite_lets_them_through(tmp_path):
  flat = _params(**{WO: lambda a: a.__setitem__((0, 0), np.nan)})
  source = _t5x(str(tmp_path), flat)
  out = tmp_path / "gqa"
  assert _convert("--input", source, "--output", out, "--num-kv-heads", 2, "--quiet",
                  "--allow-nonfinite") == 0
  converted = tree_lib.flatten(t5x_legacy.load_t5x(str(out))[0])
  assert np.isnan(converted[WO][0, 0]) and np.isfinite(converted[KEY]).all()
  record = converter.convert(source, str(tmp_path / "again"), converter.ConversionSpec(1),
                             allow_nonfinite=True)
  assert record["allow_nonfinite"] is True


def test_in_memory_conversion_checks_finiteness_too():
  flat = _params(**{KEY: lambda a: a.__setitem__((1, 1), np.inf)})
  params = tree_lib.unflatten(flat)
  with pytest.raises(CheckpointError, match=f"tensor '{KEY}' of the parameters has 1 non-finite"):
    converter.convert_params(params, tiny_config("checkpoint"), converter.ConversionSpec(2))
  out, _ = converter.convert_params(params, tiny_config("checkpoint"), converter.ConversionSpec(2),
                                    allow_nonfinite=True)
  assert np.isinf(out["decoder"]["layers_0"]["self_attention"]["key"]["kernel"]).any()


def test_bfloat16_nonfinite_values_are_counted(tmp_path):
  bfloat16 = msgpack_codec.dtype_from_name("bfloat16")
  flat = _params(**{WO: lambda a: a.__setitem__((0, slice(0, 3)), np.nan)})
  source = _t5x(str(tmp_path), {name: value.astype(bfloat16) for name, value in flat.items()})
  with pytest.raises(CheckpointError, match="3 non-finite value"):
    converter.convert(source, str(tmp_path / "gqa"), converter.ConversionSpec(2))
  assert entries(tmp_path) == ["src"]
