"""The YOLOv9 / GELAN training objective (official ``utils/loss_tal_dual.py`` / ``loss_tal.py``).

Per branch: a task-aligned assignment from the branch's own predictions, then BCE on the class
logits against the soft targets, (1 - CIoU) and DFL on the positives, each divided by the batch's
sum of target scores. Branches combine as aux_weight * aux + main, then the gains apply.

``total`` is (box + cls + dfl) x batch_size: exactly what the official script backpropagates for
the same batch on one device (there, under DDP with W ranks, each rank's loss is also multiplied
by W and gradients are averaged, which amounts to the same x global-batch scaling). The official
recipe's learning rate (lr0 = 0.01, SGD) is tuned for gradients of this size: use the same
optimizer settings with this total and nothing needs rescaling.
"""
import jax
import jax.numpy as jnp
import ml_collections
import optax

from yolov9_jax.losses import boxes
from yolov9_jax.losses.assigner import assign
from yolov9_jax.models import heads

# Distance targets are clamped just below the last bin so that its right neighbour stays in range.
_DFL_TARGET_MARGIN = 0.01


def default_config() -> ml_collections.ConfigDict:
  """The official loss settings (hard-coded there; hyp.scratch-high.yaml repeats the gains)."""
  return ml_collections.ConfigDict(dict(
      box_gain=7.5, cls_gain=0.5, dfl_gain=1.5,
      aux_weight=0.25,         # PGI: the auxiliary branch's share of each term
      top_k=10, alpha=0.5, beta=6.0,  # assigner: metric = score**alpha * CIoU**beta, top-k per box
  ))


def _usable_boxes(targets):
  """Valid slots whose boxes are finite and have positive width and height."""
  boxes_px = targets["boxes"]
  width = boxes_px[..., 2] - boxes_px[..., 0]
  height = boxes_px[..., 3] - boxes_px[..., 1]
  return (targets["valid"] & jnp.all(jnp.isfinite(boxes_px), axis=-1) & (width > 0) & (height > 0))


def _dfl(bin_logits, target_distances):
  """Distribution focal loss per anchor: CE to the two bins around each side's target, mean over
  sides. bin_logits (..., 4, reg_max); target_distances (..., 4) in bins, already clamped."""
  left = jnp.floor(target_distances)
  weight_left = left + 1 - target_distances
  log_probs = jax.nn.log_softmax(bin_logits, axis=-1)
  # The two bins' cross-entropies as a weighted sum over all bins (weights 0 elsewhere) rather
  # than a gather: the same two products, added exactly; on TPU the gather version of this term
  # was most of the train step's memory traffic (9 GB per image and branch at 640, XLA's count).
  left_index = left.astype(jnp.int32)
  bins = jnp.arange(bin_logits.shape[-1])
  bin_weights = (jnp.where(bins == left_index[..., None], weight_left[..., None], 0) +
                 jnp.where(bins == left_index[..., None] + 1, 1 - weight_left[..., None], 0))
  return jnp.mean(-jnp.sum(log_probs * bin_weights, axis=-1), axis=-1)


def branch_loss(maps, targets, gt_valid, config):
  """Unweighted (box, cls, dfl) of one branch's raw maps, and its assignment."""
  reg_max = heads.REG_MAX
  flat = heads.flatten_maps(maps).astype(jnp.float32)  # (B, A, 4 * reg_max + C)
  bin_logits = flat[..., :4 * reg_max].reshape(*flat.shape[:2], 4, reg_max)
  class_logits = flat[..., 4 * reg_max:]
  points, strides = heads.anchor_points_and_strides([m.shape[1:3] for m in maps])
  strides = strides[:, None]
  distances = heads.dfl_expectation(flat[..., :4 * reg_max])
  pred_boxes_grid = boxes.distances_to_boxes(points, distances)  # x1, y1, x2, y2 in grid units

  assignment = assign(
      jax.nn.sigmoid(class_logits), pred_boxes_grid * strides, points * strides,
      targets["classes"], targets["boxes"].astype(jnp.float32), gt_valid,
      top_k=config.top_k, alpha=config.alpha, beta=config.beta)
  target_scores_sum = jnp.maximum(jnp.sum(assignment.target_scores), 1.0)

  cls = jnp.sum(optax.sigmoid_binary_cross_entropy(class_logits, assignment.target_scores))
  weight = jnp.sum(assignment.target_scores, axis=-1) * assignment.positives  # (B, A)
  target_boxes_grid = assignment.target_boxes_xyxy_px / strides
  box = jnp.sum((1 - boxes.ciou(pred_boxes_grid, target_boxes_grid)) * weight)
  target_distances = jnp.clip(boxes.boxes_to_distances(points, target_boxes_grid),
                              0, reg_max - 1 - _DFL_TARGET_MARGIN)
  dfl = jnp.sum(_dfl(bin_logits, target_distances) * weight)
  return (box / target_scores_sum, cls / target_scores_sum, dfl / target_scores_sum), assignment


def compute_loss(outs, targets, *, num_classes, image_size, config=None):
  """The total loss and its parts for the train-mode model output ``outs``.

  outs: {"main": [p3, p4, p5], "aux": [...]} raw maps (B, H_l, W_l, 4 * reg_max + num_classes);
    "aux" only for yolov9-*.
  targets: {"boxes": (B, M, 4) x1, y1, x2, y2 in input pixels, "classes": (B, M) int,
    "valid": (B, M) bool}. Slots whose box is not finite or has no area count as padding.
  image_size: (H, W) of the input in pixels, checked against the maps.
  Returns (total, parts): total = (box + cls + dfl) x batch_size (see the module docstring);
  parts: "box", "cls", "dfl" after gains (the official logged items); "<branch>/box" etc., one
  branch's terms after gains but before the aux weight (the official aux-only / main-only values);
  "<branch>/positives", the assigner's number of positive anchors.
  """
  config = config or default_config()
  height, width = image_size
  for branch, maps in outs.items():
    if [m.shape[1:3] for m in maps] != [(height // s, width // s) for s in heads.STRIDES]:
      raise ValueError(f"{branch} maps {[m.shape for m in maps]} do not fit an image of {image_size}")
    if maps[0].shape[-1] != 4 * heads.REG_MAX + num_classes:
      raise ValueError(f"{branch} maps have {maps[0].shape[-1]} channels, expected "
                       f"{4 * heads.REG_MAX} box bins + {num_classes} classes")
  gt_valid = _usable_boxes(targets)
  batch_size = outs["main"][0].shape[0]
  parts, weighted = {}, {"box": 0.0, "cls": 0.0, "dfl": 0.0}
  for branch in ("aux", "main"):
    if branch not in outs:
      continue
    (box, cls, dfl), assignment = branch_loss(outs[branch], targets, gt_valid, config)
    share = config.aux_weight if branch == "aux" else 1.0
    for name, value in (("box", box), ("cls", cls), ("dfl", dfl)):
      parts[f"{branch}/{name}"] = config[f"{name}_gain"] * value
      weighted[name] = weighted[name] + share * parts[f"{branch}/{name}"]
    parts[f"{branch}/positives"] = jnp.sum(assignment.positives)
  parts.update(weighted)
  total = (parts["box"] + parts["cls"] + parts["dfl"]) * batch_size
  return total, parts
