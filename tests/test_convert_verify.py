"""Per-tensor checksums in the conversion provenance, and `gqa-t5 verify` finding bit rot."""

import json
import os

import numpy as np
import pytest

from tiny_configs import tiny_config
from gqa_t5 import cli as gqa_cli
from gqa_t5.checkpoints import checksums, detect, synthetic, t5x_legacy
from gqa_t5.convert import cli, converter, verify

WO = "encoder/layers_1/mlp/wo/kernel"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("src") / "ckpt")
  synthetic.write_t5x(path, tiny_config("checkpoint"), compression="none")
  return path


def _convert(source, out, *extra):
  assert cli.main(["--input", source, "--output", str(out), "--num-kv-heads", "2",
                   "--compression", "none", "--quiet", *extra]) == 0
  return json.load(open(os.path.join(out, converter.PROVENANCE_FILE)))


@pytest.mark.parametrize("output_format", ["t5x", "orbax"])
def test_every_written_tensor_has_its_checksum_and_verifies(source, tmp_path, output_format,
                                                            capsys):
  out = tmp_path / "out"
  record = _convert(source, out, "--output-format", output_format)
  written = detect.open_checkpoint(str(out)).tensors
  assert sorted(record["checksums"]) == sorted(written)
  for name, tensor in written.items():
    assert record["checksums"][name] == checksums.tensor_checksum(tensor.read()), name
  # A tensor copied bit for bit has the source's checksum; a pooled one does not.
  original = detect.open_checkpoint(source).tensors
  assert record["checksums"][WO] == checksums.tensor_checksum(original[WO].read())
  key = "decoder/layers_0/self_attention/key/kernel"
  assert record["checksums"][key] != checksums.tensor_checksum(original[key].read())
  assert gqa_cli.main(["verify", str(out)]) == 0
  assert "every tensor matches" in capsys.readouterr().out


def test_verify_names_the_tensor_whose_bytes_changed(source, tmp_path, capsys):
  out = tmp_path / "out"
  _convert(source, out)
  chunk = os.path.join(out, "target." + WO.replace("/", "."), "0.0")
  data = bytearray(open(chunk, "rb").read())
  data[len(data) // 2] ^= 0x01  # one flipped bit: an uncompressed zarr chunk reads as usual
  open(chunk, "wb").write(bytes(data))
  assert np.isfinite(t5x_legacy.open_t5x(str(out)).tensors[WO].read()).all()
  problems = verify.verify(str(out))
  assert len(problems) == 1 and problems[0].startswith(f"{WO}: checksum crc32:")
  assert gqa_cli.main(["verify", str(out)]) == 1
  err = capsys.readouterr().err
  assert f"MISMATCH {WO}" in err and "1 problem(s)" in err


def test_verify_without_recorded_checksums_is_status_2(source, tmp_path, capsys):
  out = tmp_path / "out"
  record = _convert(source, out, "--no-checksums")
  assert "checksums" not in record
  assert verify.main([str(out)]) == 2
  assert "records no checksums" in capsys.readouterr().err
  assert verify.main([source]) == 2  # not written by the converter
  assert converter.PROVENANCE_FILE in capsys.readouterr().err


def test_checksum_is_of_the_values_not_the_byte_order():
  value = np.arange(12, dtype=np.float32).reshape(3, 4)
  assert checksums.tensor_checksum(value) == checksums.tensor_checksum(value.astype(">f4"))
  assert checksums.tensor_checksum(value) == checksums.tensor_checksum(np.asfortranarray(value))
  assert checksums.tensor_checksum(value) != checksums.tensor_checksum(value.T.copy())
