"""Weights to and from the official PyTorch state_dict layout."""
import jax
import numpy as np
import pytest
import testweights
from flax import traverse_util

from yolov9_jax import interop


@pytest.fixture(scope="module")
def yolov9_t_state_dict():
  """Official-layout yolov9-t weights with 5 classes: deterministic values, non-trivial BN stats."""
  shapes = interop.expected_state_dict_shapes("yolov9-t", 5)
  return testweights.state_dict(list(shapes.items()), seed=3)


@pytest.fixture(scope="module")
def yolov9_t_variables(yolov9_t_state_dict):
  return interop.from_torch_state_dict("yolov9-t", yolov9_t_state_dict)


def test_round_trip_is_bit_exact_both_ways(yolov9_t_state_dict, yolov9_t_variables):
  state_dict = interop.to_torch_state_dict("yolov9-t", yolov9_t_variables)
  assert list(state_dict) == list(yolov9_t_state_dict)
  for key, value in yolov9_t_state_dict.items():
    assert state_dict[key].dtype == value.dtype and state_dict[key].shape == value.shape, key
    np.testing.assert_array_equal(state_dict[key], value, err_msg=key)

  restored = interop.from_torch_state_dict("yolov9-t", state_dict)
  ours = traverse_util.flatten_dict(yolov9_t_variables)
  back = traverse_util.flatten_dict(restored)
  assert ours.keys() == back.keys()
  for path, value in ours.items():
    assert back[path].dtype == value.dtype == np.float32, path
    np.testing.assert_array_equal(back[path], value, err_msg=str(path))


def test_round_trip_of_initialised_jax_variables_is_bit_exact(gelan_t_20_classes):
  _, variables = gelan_t_20_classes
  restored = interop.from_torch_state_dict("gelan-t", interop.to_torch_state_dict("gelan-t", variables))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables), restored)


def test_export_uses_torch_layouts_and_writes_fixed_entries(yolov9_t_variables):
  state_dict = interop.to_torch_state_dict("yolov9-t", yolov9_t_variables)
  kernel = np.asarray(yolov9_t_variables["params"]["model_0"]["conv"]["kernel"])  # (3, 3, 3, 16)
  np.testing.assert_array_equal(state_dict["model.0.conv.weight"], kernel.transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(state_dict["model.0.bn.running_var"],
                                yolov9_t_variables["batch_stats"]["model_0"]["bn"]["var"])
  assert state_dict["model.0.bn.num_batches_tracked"].dtype == np.int64
  for key in ("model.29.dfl.conv.weight", "model.29.dfl2.conv.weight"):
    np.testing.assert_array_equal(state_dict[key].ravel(), np.arange(16))
  assert state_dict["model.29.cv5.0.2.bias"].shape == (5,)


def test_class_count_is_inferred_from_the_state_dict(yolov9_t_variables):
  state_dict = interop.to_torch_state_dict("yolov9-t", yolov9_t_variables)
  variables = interop.from_torch_state_dict("yolov9-t", state_dict)
  assert variables["params"]["model_29"]["cv5_0_2"]["kernel"].shape == (1, 1, 64, 5)


def test_num_batches_tracked_may_be_absent(yolov9_t_variables):
  state_dict = interop.to_torch_state_dict("yolov9-t", yolov9_t_variables)
  state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  interop.from_torch_state_dict("yolov9-t", state_dict)


def test_wrong_class_count_names_the_mis_shaped_keys(yolov9_t_variables):
  state_dict = interop.to_torch_state_dict("yolov9-t", yolov9_t_variables)
  with pytest.raises(ValueError) as error:
    interop.from_torch_state_dict("yolov9-t", state_dict, num_classes=80)
  message = str(error.value)
  assert "the checkpoint has 5 classes, the model 80" in message
  # The class branch is max(P3 width, min(2 * classes, 128)) wide: 64 for 5 classes, 128 for 80.
  assert "model.29.cv3.0.0.conv.weight has shape (64, 64, 3, 3), expected (128, 64, 3, 3)" in message


def test_other_architecture_names_unexpected_missing_and_mis_shaped_keys(yolov9_t_variables):
  state_dict = interop.to_torch_state_dict("yolov9-t", yolov9_t_variables)
  with pytest.raises(ValueError) as error:
    interop.from_torch_state_dict("gelan-t", state_dict)
  assert "no key model.22.cv3.0.2.bias" in str(error.value)

  gelan_s = {k: np.zeros(s, np.float32) for k, s in interop.expected_state_dict_shapes("gelan-s", 5).items()}
  gelan_s["model.22.dfl.conv.weight"] = np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1)
  with pytest.raises(ValueError) as error:
    interop.from_torch_state_dict("gelan-t", gelan_s)
  assert "model.0.conv.weight has shape (32, 3, 3, 3), expected (16, 3, 3, 3)" in str(error.value)

  gelan_s.pop("model.0.bn.weight")
  gelan_s["model.99.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(ValueError) as error:
    interop.from_torch_state_dict("gelan-s", gelan_s)
  assert "1 missing keys: model.0.bn.weight" in str(error.value)
  assert "1 unexpected keys: model.99.conv.weight" in str(error.value)


def test_dfl_weights_other_than_the_fixed_bins_are_rejected(yolov9_t_variables):
  state_dict = interop.to_torch_state_dict("yolov9-t", yolov9_t_variables)
  state_dict["model.29.dfl2.conv.weight"] = np.ones((1, 16, 1, 1), np.float32)
  with pytest.raises(ValueError, match="model.29.dfl2.conv.weight must hold the fixed DFL bins"):
    interop.from_torch_state_dict("yolov9-t", state_dict)


def test_float16_checkpoints_import_as_float32(yolov9_t_variables):
  state_dict = interop.to_torch_state_dict("yolov9-t", yolov9_t_variables)
  half = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in state_dict.items()}
  variables = interop.from_torch_state_dict("yolov9-t", half)
  assert all(v.dtype == np.float32 for v in jax.tree.leaves(variables))
  restored = interop.to_torch_state_dict("yolov9-t", variables)
  for key, value in half.items():  # float16 -> float32 is exact
    np.testing.assert_array_equal(restored[key], value.astype(restored[key].dtype), err_msg=key)
