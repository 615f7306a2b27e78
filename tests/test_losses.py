"""The PGI loss and its assigner against the official ones (shared/spec/golden/loss)."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yolov9_jax import losses, sharding
from yolov9_jax.models import heads

LEVELS = ("p3", "p4", "p5")
CASES = [f"loss_{config}_{case}" for config in ("yolov9-t", "gelan-t")
         for case in ("typical", "some_empty", "no_boxes", "crowded", "edges_tiny_huge")]
NUM_CLASSES = 8


def _load(spec_dir, case):
  golden = np.load(spec_dir / "golden" / "loss" / f"{case}.npz")
  result = json.loads(str(golden["result_json"]))
  branches = ("aux", "main") if "raw_aux_p3" in golden.files else ("main",)
  outs = {b: [jnp.asarray(golden[f"raw_{b}_{level}"]) for level in LEVELS] for b in branches}
  targets = {"boxes": jnp.asarray(golden["targets_boxes_xyxy"]),
             "classes": jnp.asarray(golden["targets_classes"]),
             "valid": jnp.asarray(golden["targets_valid"])}
  return golden, result, outs, targets


def _loss_fn(image_hw, config=None):
  return jax.jit(lambda outs, targets: losses.compute_loss(
      outs, targets, num_classes=NUM_CLASSES, image_size=tuple(image_hw), config=config))


@functools.lru_cache(maxsize=None)
def _ours(spec_dir, case):
  """Loss, its gradient and each branch's assignment for a golden case, in one compiled call."""
  _, result, outs, targets = _load(spec_dir, case)
  config = losses.default_config()

  @jax.jit
  def everything(outs, targets):
    loss = lambda o: losses.compute_loss(o, targets, num_classes=NUM_CLASSES,
                                         image_size=tuple(result["image_hw"]))
    (total, parts), grads = jax.value_and_grad(loss, has_aux=True)(outs)
    assignments = {b: losses.branch_loss(m, targets, targets["valid"], config)[1]
                   for b, m in outs.items()}
    return total, parts, grads, assignments

  return everything(outs, targets)


@pytest.mark.parametrize("case", CASES)
def test_loss_parts_and_total_equal_official(spec_dir, case):
  _, result, outs, _ = _load(spec_dir, case)
  total, parts, _, _ = _ours(spec_dir, case)
  for name in ("box", "cls", "dfl"):
    np.testing.assert_allclose(parts[name], result[name], rtol=1e-4, atol=1e-6, err_msg=name)
    for branch in outs:  # a single-head model's only branch is the whole loss
      official = result[f"{branch}_only"][name] if len(outs) == 2 else result[name]
      np.testing.assert_allclose(parts[f"{branch}/{name}"], official, rtol=1e-4, atol=1e-6,
                                 err_msg=f"{branch}/{name}")
  np.testing.assert_allclose(total, result["total"], rtol=1e-4)
  np.testing.assert_allclose(total, (parts["box"] + parts["cls"] + parts["dfl"]) * result["batch"],
                             rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_gradient_wrt_raw_maps_equals_official(spec_dir, case):
  golden, _, outs, _ = _load(spec_dir, case)
  grads = _ours(spec_dir, case)[2]
  for branch in outs:
    for level_index, level in enumerate(LEVELS):
      official = golden[f"grad_raw_{branch}_{level}"]
      error = np.max(np.abs(np.asarray(grads[branch][level_index]) - official))
      assert error <= 1e-4 * np.max(np.abs(official)), (branch, level, error)


@pytest.mark.parametrize("case", CASES)
def test_assigner_equals_official_up_to_zero_metric_ties(spec_dir, case):
  golden, _, outs, _ = _load(spec_dir, case)
  for branch in outs:
    ours = _ours(spec_dir, case)[3][branch]
    official_positives = golden[f"assign_{branch}_fg_mask"].astype(bool)
    official_scores = golden[f"assign_{branch}_target_scores"]
    np.testing.assert_allclose(ours.target_scores, official_scores, atol=1e-5)
    positives = np.asarray(ours.positives)
    # torch.topk breaks ties among exactly-zero metrics in an unspecified order, we towards lower
    # indices: such an anchor may be a positive on one side only, always with target score 0.
    tied = positives != official_positives
    assert tied.sum() <= 1, (branch, np.argwhere(tied))
    assert np.all(official_scores[tied] == 0) and np.all(np.asarray(ours.target_scores)[tied] == 0)
    both = positives & official_positives
    np.testing.assert_allclose(np.asarray(ours.target_boxes_xyxy_px)[both],
                               golden[f"assign_{branch}_target_boxes_px"][both], atol=1e-3)


def _random_maps(key, batch, image_hw, branches=("aux", "main")):
  keys = jax.random.split(key, len(branches) * 3)
  shapes = [(batch, image_hw[0] // s, image_hw[1] // s, 64 + NUM_CLASSES) for s in heads.STRIDES]
  return {b: [jax.random.normal(keys[i * 3 + j], shape) * 2 for j, shape in enumerate(shapes)]
          for i, b in enumerate(branches)}


def _degenerate_targets(max_boxes):
  """Boxes that break naive implementations, padded to max_boxes slots (image 128x160)."""
  rows = [
      [10, 10, 10, 40],        # zero width
      [50, 50, 40, 60],        # negative width
      [30, 30, 30, 30],        # a point
      [-40, -40, 20, 20],      # partly outside
      [200, 140, 260, 200],    # wholly outside
      [0, 0, 160, 128],        # the whole image
      [60, 60, 90, 100], [60, 60, 90, 100],  # exact duplicates
      [61, 61, 62, 62],        # smaller than the smallest stride
      [np.nan, 0, 10, 10],     # not a number
  ]
  boxes = np.zeros((2, max_boxes, 4), np.float32)
  valid = np.zeros((2, max_boxes), bool)
  boxes[0, :len(rows)] = rows
  valid[0, :len(rows)] = True
  rng = np.random.default_rng(0)  # image 1: max_boxes random boxes, many overlapping
  corners = rng.uniform(0, 128, (max_boxes, 2))
  boxes[1] = np.concatenate([corners, corners + rng.uniform(0.5, 60, (max_boxes, 2))], axis=1)
  valid[1] = True
  classes = (np.arange(2 * max_boxes) % NUM_CLASSES).reshape(2, max_boxes).astype(np.int32)
  return {"boxes": jnp.asarray(boxes), "classes": jnp.asarray(classes), "valid": jnp.asarray(valid)}


@pytest.mark.parametrize("max_boxes", [12, 300])
def test_degenerate_boxes_give_finite_loss_and_gradients(max_boxes):
  outs = _random_maps(jax.random.PRNGKey(0), 2, (128, 160))
  targets = _degenerate_targets(max_boxes)
  loss = _loss_fn((128, 160))
  (total, parts), grads = jax.jit(jax.value_and_grad(lambda o, t: loss(o, t), has_aux=True))(
      outs, targets)
  assert np.isfinite(float(total)) and total > 0
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  assert parts["main/positives"] > 0


def test_batch_without_boxes_has_class_loss_only_and_finite_gradients():
  outs = _random_maps(jax.random.PRNGKey(1), 2, (64, 96), branches=("main",))
  targets = {"boxes": jnp.zeros((2, 5, 4)), "classes": jnp.zeros((2, 5), jnp.int32),
             "valid": jnp.zeros((2, 5), bool)}
  loss = _loss_fn((64, 96))
  (total, parts), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(outs, targets)
  assert parts["box"] == 0 and parts["dfl"] == 0 and parts["main/positives"] == 0
  assert parts["cls"] > 0 and np.isfinite(float(total))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_batch_sharded_over_a_mesh_gives_the_unsharded_loss(spec_dir):
  assert jax.device_count() == 8
  _, result, outs, targets = _load(spec_dir, "loss_yolov9-t_typical")
  # Eight images: the golden four and the same four mirrored left-right.
  mirrored_boxes = targets["boxes"].at[..., 0].set(160 - targets["boxes"][..., 2]).at[..., 2].set(
      160 - targets["boxes"][..., 0])
  outs = jax.tree.map(lambda m: jnp.concatenate([m, m[:, :, ::-1]]), outs)
  targets = {"boxes": jnp.concatenate([targets["boxes"], mirrored_boxes]),
             "classes": jnp.concatenate([targets["classes"]] * 2),
             "valid": jnp.concatenate([targets["valid"]] * 2)}
  loss = _loss_fn(result["image_hw"])
  unsharded_total, _ = loss(outs, targets)
  mesh = sharding.make_mesh()
  batch_sharding = sharding.batch_sharding(mesh)
  sharded_outs, sharded_targets = jax.device_put((outs, targets), batch_sharding)
  assert len(sharded_outs["main"][0].sharding.device_set) == 8
  sharded_total, _ = loss(sharded_outs, sharded_targets)
  np.testing.assert_allclose(sharded_total, unsharded_total, rtol=1e-5)


def test_defaults_are_the_official_settings_and_shapes_are_checked():
  config = losses.default_config()
  assert (config.box_gain, config.cls_gain, config.dfl_gain, config.aux_weight) == (7.5, 0.5, 1.5, 0.25)
  assert (config.top_k, config.alpha, config.beta) == (10, 0.5, 6.0)
  outs = _random_maps(jax.random.PRNGKey(0), 1, (64, 64), branches=("main",))
  targets = {"boxes": jnp.zeros((1, 1, 4)), "classes": jnp.zeros((1, 1), jnp.int32),
             "valid": jnp.zeros((1, 1), bool)}
  with pytest.raises(ValueError, match="do not fit an image"):
    losses.compute_loss(outs, targets, num_classes=NUM_CLASSES, image_size=(64, 96))
  with pytest.raises(ValueError, match="channels"):
    losses.compute_loss(outs, targets, num_classes=80, image_size=(64, 64))


def test_ciou_equals_iou_for_identical_aspect_and_centre():
  box = jnp.array([10.0, 10.0, 30.0, 30.0])
  inner = jnp.array([15.0, 15.0, 25.0, 25.0])  # same centre and aspect: CIoU = IoU = 100/400
  np.testing.assert_allclose(losses.ciou(box, inner), 0.25, atol=1e-6)
  np.testing.assert_allclose(losses.ciou(box, box), 1.0, atol=1e-6)
