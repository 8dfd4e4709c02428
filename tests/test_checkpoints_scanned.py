"""Lazy stacked <-> unrolled views of a checkpoint's tensors (checkpoints/scanned.py)."""

import numpy as np
import pytest

from gqa_t5.checkpoints import lazy, scanned
from gqa_t5.checkpoints.errors import CheckpointError
from gqa_t5.model import scanning


def _unrolled(num_layers=3):
  rng = np.random.RandomState(0)
  flat = {"encoder/relpos_bias/rel_embedding": rng.randn(4, 8)}
  for i in range(num_layers):
    flat[f"encoder/layers_{i}/mlp/wi_0/kernel"] = rng.randn(6, 10)
    flat[f"encoder/layers_{i}/pre_mlp_layer_norm/scale"] = rng.randn(6)
  return flat


def test_stack_matches_the_models_scanned_layout_and_unstack_inverts_it():
  flat = _unrolled()
  stacked = scanned.stack({n: lazy.from_array(n, v) for n, v in flat.items()})
  assert stacked["encoder/layers/mlp/wi_0/kernel"].shape == (6, 3, 10)
  assert stacked["encoder/layers/pre_mlp_layer_norm/scale"].shape == (6, 3)
  # The same layout as the network's own scanned parameters (model/scanning.py).
  tree = {"encoder": {f"layers_{i}": {"mlp": {"wi_0": {"kernel": flat[
      f"encoder/layers_{i}/mlp/wi_0/kernel"]}}} for i in range(3)}}
  np.testing.assert_array_equal(
      stacked["encoder/layers/mlp/wi_0/kernel"].read(),
      scanning.stack_layers(tree)["encoder"]["layers"]["mlp"]["wi_0"]["kernel"])
  assert scanned.is_scanned(stacked) and not scanned.is_scanned(flat)
  back = scanned.unstack(stacked)
  assert set(back) == set(flat)
  for name, value in flat.items():
    np.testing.assert_array_equal(back[name].read(), value)


def test_unstack_reads_each_stacked_tensor_once():
  reads = []
  value = np.arange(24.0).reshape(2, 3, 4)

  def reader():
    reads.append(1)
    return value
  views = scanned.unstack({"decoder/layers/mlp/wo/kernel":
                           lazy.LazyTensor("k", value.shape, value.dtype, reader)})
  slices = [views[f"decoder/layers_{i}/mlp/wo/kernel"].read() for i in range(3)]
  assert len(reads) == 1
  np.testing.assert_array_equal(slices[1], value[:, 1])


def test_mixed_or_ragged_layouts_are_refused():
  a = lazy.from_array("a", np.zeros((2, 3, 4)))
  with pytest.raises(CheckpointError, match="both stacked 'layers' and unrolled"):
    scanned.unstack({"encoder/layers/mlp/wo/kernel": a,
                     "encoder/layers_0/mlp/wo/kernel": lazy.from_array("b", np.zeros((2, 4)))})
  flat = {n: lazy.from_array(n, v) for n, v in _unrolled().items()}
  del flat["encoder/layers_1/mlp/wi_0/kernel"]
  with pytest.raises(CheckpointError, match=r"encoder/layers/mlp/wi_0/kernel: layers \[0, 2\]"):
    scanned.stack(flat)
