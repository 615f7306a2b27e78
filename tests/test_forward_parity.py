"""Forward parity with the official PyTorch models (shared/spec/golden/forward).

The official outputs were computed in float64 from weights that ``testweights`` rebuilds from key
names. The input-dependent part of the outputs is small next to the head biases, so float32 at
1e-4 cannot see a subtly wrong layer: float64 at 1e-8 of each array's largest magnitude can.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testweights

from yolov9_jax import interop, models

LEVELS = ("p3", "p4", "p5")
IMAGES_NHWC = (2, 64, 96, 3)  # non-square on purpose: catches H/W mix-ups
PER_LAYER_GOLDENS = ("yolov9-t", "yolov9-c", "gelan-t")


@functools.lru_cache(maxsize=None)  # the float64 and float32 tests share each config's weights
def _official_test_variables(spec_dir, name):
  manifest = json.loads((spec_dir / "keys" / f"{name}.json").read_text())["state_dict"]
  return interop.from_torch_state_dict(name, testweights.state_dict(manifest, seed=0))


@pytest.fixture(scope="module", autouse=True)
def _drop_the_ten_models_weights():
  """The cache above holds every model's weights (about 1 GB): gone with this file."""
  yield
  _official_test_variables.cache_clear()


def _forward_eval_and_train(name, variables, images, dtype):
  """Eval outputs with every layer's output, and train-mode raw maps, in one compiled call."""
  model = models.build(name, dtype=dtype)

  @jax.jit
  def forward(variables, images):
    predictions, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    train_maps, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return predictions, state["intermediates"], train_maps

  return forward(variables, images)


def _relative_error(ours, official):
  return float(np.max(np.abs(np.asarray(ours, np.float64) - official)) / np.max(np.abs(official)))


def _layer_output(intermediates, golden_key):
  """The output of official layer ``layer_<iii>[_<j>]`` (``_j``: element j of a CBLinear tuple)."""
  parts = golden_key.split("_")
  output = intermediates[f"layer_{int(parts[1]):03d}"][0]
  if isinstance(output, tuple):
    output = output[int(parts[2]) if len(parts) > 2 else 0]
  return output


@pytest.mark.parametrize("name", list(models.ARCHITECTURES))
def test_float64_outputs_match_official_within_1e_8(spec_dir, name):
  golden = np.load(spec_dir / "golden" / "forward" / f"{name}.npz")
  variables = _official_test_variables(spec_dir, name)
  with jax.enable_x64(True):
    images = jnp.asarray(testweights.images(IMAGES_NHWC, seed=0), jnp.float64)
    predictions, intermediates, train_maps = _forward_eval_and_train(
        name, variables, images, jnp.float64)
    head_index = len(models.ARCHITECTURES[name]) - 1
    eval_maps = intermediates[f"layer_{head_index:03d}"][0]
    errors = {}
    for branch_index, branch in enumerate(models.head_branches(name)):
      assert predictions[branch].dtype == jnp.float64
      errors[f"pred_{branch}"] = _relative_error(predictions[branch], golden[f"pred_{branch}"])
      for level_index, level in enumerate(LEVELS):
        errors[f"raw_{branch}_{level}"] = _relative_error(
            eval_maps[branch_index][level_index], golden[f"raw_{branch}_{level}"])
        errors[f"train_raw_{branch}_{level}"] = _relative_error(
            train_maps[branch][level_index], golden[f"train_raw_{branch}_{level}"])
    if name in PER_LAYER_GOLDENS:
      layer_keys = [k for k in golden.files if k.startswith("layer_")]
      assert len(layer_keys) >= len(models.ARCHITECTURES[name]) - 1
      for key in layer_keys:
        errors[key] = _relative_error(_layer_output(intermediates, key), golden[key])
  expected_outputs = {"pred_main", "pred_aux"} & set(golden.files)
  assert {k for k in errors if k.startswith("pred_")} == expected_outputs
  too_far = {k: e for k, e in errors.items() if not e <= 1e-8}
  assert not too_far, f"{name}: outputs differ from the official ones (relative): {too_far}"


# Train-mode BatchNorm normalises with statistics of tiny batches (12 values per channel at P5),
# which amplifies rounding about a thousandfold: float64 run on the float32-rounded image alone
# already moves gelan-t's train-mode maps by 5e-5, and float32 arithmetic reaches 9e-3 in the
# deepest model (gelan-e). No float32 implementation can hold 1e-4 there; train mode is pinned
# down by the float64 test above, and this bound only catches gross float32-only faults.
FLOAT32_TRAIN_MODE_ATOL = 2e-2


@pytest.mark.parametrize("name", list(models.ARCHITECTURES))
def test_float32_raw_maps_match_official(spec_dir, name):
  golden = np.load(spec_dir / "golden" / "forward" / f"{name}.npz")
  variables = _official_test_variables(spec_dir, name)
  images = jnp.asarray(testweights.images(IMAGES_NHWC, seed=0), jnp.float32)
  predictions, intermediates, train_maps = _forward_eval_and_train(
      name, variables, images, jnp.float32)
  head_index = len(models.ARCHITECTURES[name]) - 1
  eval_maps = intermediates[f"layer_{head_index:03d}"][0]
  for branch_index, branch in enumerate(models.head_branches(name)):
    assert predictions[branch].dtype == jnp.float32
    for level_index, level in enumerate(LEVELS):
      key = f"raw_{branch}_{level}"
      np.testing.assert_allclose(np.asarray(eval_maps[branch_index][level_index]), golden[key],
                                 rtol=0, atol=1e-4, err_msg=key)
      key = f"train_raw_{branch}_{level}"
      np.testing.assert_allclose(np.asarray(train_maps[branch][level_index]), golden[key],
                                 rtol=0, atol=FLOAT32_TRAIN_MODE_ATOL, err_msg=key)
