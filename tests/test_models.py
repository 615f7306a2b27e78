"""The architectures: official key lists and parameter counts, head init, input checks, dtypes."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from yolov9_jax import interop, models

_BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _manifest(spec_dir, name):
  return json.loads((spec_dir / "keys" / f"{name}.json").read_text())


@pytest.mark.parametrize("name", list(models.ARCHITECTURES))
def test_state_dict_has_official_keys_in_official_order_and_shapes(spec_dir, name):
  official = [(e["key"], tuple(e["shape"])) for e in _manifest(spec_dir, name)["state_dict"]]
  ours = [(k, tuple(s)) for k, s in interop.expected_state_dict_shapes(name, 80).items()]
  assert ours == official


def _is_main_branch_key(name, key):
  layer = int(key.split(".")[1])
  head_index = len(models.ARCHITECTURES[name]) - 1
  if layer == head_index:
    aux_head_parts = ("cv2", "cv3", "dfl") if len(models.head_branches(name)) == 2 else ()
    return key.split(".")[2] not in aux_head_parts
  return layer in models.main_branch_layers(name)


@pytest.mark.parametrize("name", list(models.ARCHITECTURES))
def test_parameter_counts_equal_official(spec_dir, name):
  manifest = _manifest(spec_dir, name)
  shapes = interop.expected_state_dict_shapes(name, 80)
  parameters = {k: math.prod(s) for k, s in shapes.items() if not k.endswith(_BN_STATISTICS)}
  assert sum(parameters.values()) == manifest["num_parameters"]
  main_branch = sum(n for k, n in parameters.items() if _is_main_branch_key(name, k))
  assert main_branch == (manifest["num_parameters_main_branch"] or manifest["num_parameters"])


def test_main_branch_of_yolov9_c_is_gelan_c_layout():
  # FACTS §1.5: gelan-c layer i is yolov9-c layer i + 1 for i = 0..21; layer 0 is the input.
  assert models.main_branch_layers("yolov9-c") == list(range(0, 23))
  assert models.main_branch_layers("yolov9-e") == list(range(0, 29)) + list(range(36, 49))
  assert models.main_branch_layers("gelan-t") == list(range(0, 22))


def test_gelan_counterpart_is_found_in_the_tables(monkeypatch):
  # Found by comparing layer rows, not by the name: each yolov9 model's main branch is the
  # same-size gelan table; a gelan is its own counterpart.
  for size in "tsmce":
    assert models.gelan_counterpart(f"yolov9-{size}") == f"gelan-{size}"
    assert models.gelan_counterpart(f"gelan-{size}") == f"gelan-{size}"
  # A dual-head table whose main branch matches no gelan table is named in the error.
  rows = models.ARCHITECTURES["yolov9-t"]
  widened = [(rows[i][0], rows[i][1], (rows[i][2][0] + 8,) + tuple(rows[i][2][1:]))
             if rows[i][1] == "Conv" and i in models.main_branch_layers("yolov9-t") else rows[i]
             for i in range(len(rows))]
  monkeypatch.setitem(models.ARCHITECTURES, "yolov9-wide", tuple(widened))
  with pytest.raises(ValueError, match="yolov9-wide's main branch"):
    models.gelan_counterpart("yolov9-wide")


def test_number_of_classes_is_read_off_the_class_layer():
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                           models.abstract_variables("yolov9-t", 7))
  assert models.num_classes_of("yolov9-t", variables) == 7
  assert interop.class_layer_key("yolov9-t") in interop.to_torch_state_dict("yolov9-t", variables)


def test_yolov9_m_aconv_180_has_184_channels():
  shapes = interop.expected_state_dict_shapes("yolov9-m", 80)
  assert shapes["model.17.cv1.conv.weight"] == (184, 240, 3, 3)


def test_init_follows_official_head_biases_and_bn_defaults(gelan_t_20_classes):
  model, variables = gelan_t_20_classes
  head = variables["params"]["model_22"]
  for level, stride in enumerate((8, 16, 32)):
    np.testing.assert_array_equal(head[f"cv2_{level}_2"]["bias"], np.ones(64, np.float32))
    class_prior = math.log(5 / 20 / (640 / stride) ** 2)
    np.testing.assert_allclose(head[f"cv3_{level}_2"]["bias"], np.full(20, class_prior), rtol=1e-6)
  stats = traverse_util.flatten_dict(variables["batch_stats"])
  assert all(np.all(v == (0 if path[-1] == "mean" else 1)) for path, v in stats.items())
  # PyTorch's default conv init: U(-b, b) with b = 1/sqrt(fan_in).
  kernel = np.asarray(variables["params"]["model_1"]["conv"]["kernel"])  # (3, 3, 16, 32)
  bound = 1 / math.sqrt(3 * 3 * 16)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.9 * bound
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))


def test_outputs_have_documented_shapes_under_jit_for_non_square_input(gelan_t_20_classes):
  model, variables = gelan_t_20_classes
  images = jnp.full((2, 64, 128, 3), 0.5)
  eval_out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  anchors = 8 * 16 + 4 * 8 + 2 * 4
  assert set(eval_out) == {"main"} and eval_out["main"].shape == (2, anchors, 4 + 20)
  train_out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, images)
  assert [m.shape for m in train_out["main"]] == [(2, 8, 16, 84), (2, 4, 8, 84), (2, 2, 4, 84)]
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_dual_head_model_returns_aux_and_main():
  model = models.build("yolov9-t", num_classes=3)
  images = jnp.zeros((1, 32, 64, 3))
  out = jax.eval_shape(lambda: model.apply(
      model.init(jax.random.PRNGKey(0), images, train=False), images, train=False))
  anchors = 4 * 8 + 2 * 4 + 1 * 2
  assert set(out) == {"aux", "main"}
  assert out["main"].shape == out["aux"].shape == (1, anchors, 4 + 3)


@pytest.mark.parametrize("shape", [(1, 64, 80, 3), (1, 48, 64, 3)])
def test_sides_not_multiple_of_32_are_rejected_clearly(gelan_t_20_classes, shape):
  model, variables = gelan_t_20_classes
  with pytest.raises(ValueError, match="multiples of 32"):
    model.apply(variables, jnp.zeros(shape), train=False)


def test_wrong_channel_count_is_rejected(gelan_t_20_classes):
  model, variables = gelan_t_20_classes
  with pytest.raises(ValueError, match="3 channels"):
    model.apply(variables, jnp.zeros((1, 64, 64, 1)), train=False)


def test_build_rejects_unknown_names_and_bad_arguments():
  with pytest.raises(ValueError, match="unknown architecture 'yolov9-x'"):
    models.build("yolov9-x")
  with pytest.raises(ValueError, match="num_classes"):
    models.build("gelan-t", num_classes=0)
  with pytest.raises(ValueError, match="compute dtype"):
    models.build("gelan-t", dtype="float16")


def test_bfloat16_compute_keeps_float32_params_and_statistics(gelan_t_20_classes):
  float32_model, variables = gelan_t_20_classes
  model = models.build("gelan-t", num_classes=20, dtype="bfloat16")
  images = jnp.linspace(0, 1, 64 * 64 * 3).reshape(1, 64, 64, 3)

  @jax.jit
  def forward(variables, images):
    maps, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return (maps, updates, model.apply(variables, images, train=False)["main"],
            float32_model.apply(variables, images, train=False)["main"])

  maps, updates, ours, reference = forward(variables, images)
  assert all(m.dtype == jnp.bfloat16 for m in maps["main"]) and ours.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(updates))
  np.testing.assert_allclose(ours[..., 4:].astype(jnp.float32), reference[..., 4:], atol=2e-2)
