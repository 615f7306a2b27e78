"""The inference form (main branch only, BatchNorm folded) computes what the full model does."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import testweights

from yolov9_jax import interop, models
from yolov9_jax.evaluation import inference

IMAGES_NHWC = (2, 64, 96, 3)


def _variables(spec_dir, name):
  manifest = json.loads((spec_dir / "keys" / f"{name}.json").read_text())["state_dict"]
  return interop.from_torch_state_dict(name, testweights.state_dict(manifest, seed=0))


def _main_outputs(name, variables, images, dtype):
  full = models.build(name, dtype=dtype)
  fused, fused_variables = inference.inference_model(name, variables, dtype)

  @jax.jit
  def both(variables, fused_variables, images):
    return (full.apply(variables, images, train=False)["main"],
            fused.apply(fused_variables, images, train=False)["main"])

  return both(variables, fused_variables, images)


def test_folded_gelan_equals_the_full_model_in_float32(spec_dir):
  variables = _variables(spec_dir, "gelan-c")
  images = jnp.asarray(testweights.images(IMAGES_NHWC, seed=0), jnp.float32)
  full, fused = _main_outputs("gelan-c", variables, images, jnp.float32)
  np.testing.assert_allclose(fused[..., 4:], full[..., 4:], atol=1e-4)       # class scores
  np.testing.assert_allclose(fused[..., :4], full[..., :4], atol=1e-4 * 96)  # pixels, up to 96


def test_folded_and_pruned_yolov9_equals_the_full_model_in_float64(spec_dir):
  variables = _variables(spec_dir, "yolov9-t")
  with jax.enable_x64(True):
    images = jnp.asarray(testweights.images(IMAGES_NHWC, seed=0), jnp.float64)
    full, fused = _main_outputs("yolov9-t", variables, images, jnp.float64)
    assert fused.dtype == jnp.float64
    assert float(jnp.max(jnp.abs(fused - full)) / jnp.max(jnp.abs(full))) < 1e-12


@pytest.fixture(scope="module")
def yolov9_c_variables(spec_dir):
  return _variables(spec_dir, "yolov9-c")


def test_pruning_keeps_exactly_the_gelan_layout(yolov9_c_variables):
  variables = yolov9_c_variables
  target, pruned = inference.prune_to_main_branch("yolov9-c", variables)
  assert target == "gelan-c"
  gelan_shapes = interop.expected_state_dict_shapes("gelan-c", 80)
  pruned_shapes = {k: np.shape(v) for k, v in interop.to_torch_state_dict("gelan-c", pruned).items()}
  assert pruned_shapes == gelan_shapes
  # yolov9-c layer 5 is gelan-c layer 4; the main head (cv4) becomes cv2.
  np.testing.assert_array_equal(pruned["params"]["model_4"]["cv1"]["conv"]["kernel"],
                                variables["params"]["model_5"]["cv1"]["conv"]["kernel"])
  np.testing.assert_array_equal(pruned["params"]["model_22"]["cv2_0_2"]["bias"],
                                variables["params"]["model_38"]["cv4_0_2"]["bias"])


def test_fused_model_has_the_official_fused_parameter_count(spec_dir, yolov9_c_variables):
  _, fused_variables = inference.inference_model("yolov9-c", yolov9_c_variables)
  count = sum(x.size for x in jax.tree.leaves(fused_variables)) + 16  # + the fixed DFL bins
  manifest = json.loads((spec_dir / "keys" / "yolov9-c.json").read_text())
  assert count == manifest["num_parameters_main_branch_fused"]
