"""The task-aligned assigner of YOLOv9 (TOOD-style), static-shaped and jittable.

Memory: the assigner holds a handful of (B, M, A) arrays (CIoU, alignment metric, masks), with B
images, M padded ground-truth slots and A anchors: at 640x640 (A = 8400) and M = 300, each float32
array is 10 MB per image. Keep M (a data config value) as small as the data allows.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

from yolov9_jax.losses import boxes


class Assignment(NamedTuple):
  """What the assigner decides for each anchor (B images, A anchors, C classes).

  positives: (B, A) bool, the anchor is a positive (foreground).
  target_scores: (B, A, C) float, one-hot of the assigned class times the normalised alignment
    (0 for negatives): the class targets, and summed over C the box-loss weights.
  target_boxes_xyxy_px: (B, A, 4) the assigned ground-truth box in input pixels (for negatives
    the image's first box slot, as the official code returns; unused).
  target_gt_index: (B, A) int32 index of the assigned ground-truth slot (0 for negatives).
  """
  positives: jax.Array
  target_scores: jax.Array
  target_boxes_xyxy_px: jax.Array
  target_gt_index: jax.Array


def assign(class_scores, pred_boxes_xyxy_px, anchor_points_px, gt_classes, gt_boxes_xyxy_px,
           gt_valid, *, top_k=10, alpha=0.5, beta=6.0, eps=1e-9) -> Assignment:
  """Task-aligned assignment (official ``TaskAlignedAssigner``, FACTS.md §5.2).

  class_scores: (B, A, C) predicted probabilities; pred_boxes_xyxy_px: (B, A, 4);
  anchor_points_px: (A, 2) anchor centres; gt_classes: (B, M) int; gt_boxes_xyxy_px: (B, M, 4);
  gt_valid: (B, M) bool. No gradient flows through the assignment.
  """
  class_scores, pred_boxes_xyxy_px = jax.lax.stop_gradient((class_scores, pred_boxes_xyxy_px))
  num_anchors, num_classes = class_scores.shape[1:]
  gt_classes = jnp.clip(gt_classes, 0, num_classes - 1)

  # (B, M, A): CIoU of every ground truth (first argument, as officially) with every prediction.
  overlaps = boxes.ciou(gt_boxes_xyxy_px[:, :, None, :], pred_boxes_xyxy_px[:, None, :, :])
  overlaps = jnp.where(gt_valid[:, :, None], jnp.clip(overlaps, 0), 0)
  gt_class_scores = jnp.take_along_axis(
      jnp.swapaxes(class_scores, 1, 2), gt_classes[:, :, None], axis=1)  # (B, M, A)
  metric = gt_class_scores ** alpha * overlaps ** beta

  # Candidates: anchor centre strictly inside the box, among the box's top-k by metric.
  # (The official min of the four centre-to-side distances > eps, without a (B, M, A, 4) array.)
  anchor_x, anchor_y = anchor_points_px[:, 0], anchor_points_px[:, 1]
  x1, y1, x2, y2 = (gt_boxes_xyxy_px[:, :, i, None] for i in range(4))
  inside = ((anchor_x - x1 > eps) & (anchor_y - y1 > eps) & (x2 - anchor_x > eps) &
            (y2 - anchor_y > eps))
  # Ties (equal metrics, typically exact zeros: CIoU clamped at 0, or anchors outside the box) are
  # broken towards lower anchor indices; torch.topk breaks them in an unspecified order. A tied
  # in-box anchor becomes a positive with target score 0, which weighs nothing in any loss term.
  _, top_indices = jax.lax.top_k(metric * inside, top_k)  # (B, M, k)
  batch_index = jnp.arange(metric.shape[0])[:, None, None]
  gt_index = jnp.arange(metric.shape[1])[None, :, None]
  in_top_k = jnp.zeros(metric.shape, bool).at[batch_index, gt_index, top_indices].set(True)
  candidates = in_top_k & inside & gt_valid[:, :, None]

  # An anchor claimed by several boxes goes to the box it overlaps most, among all boxes.
  claimed_by_many = jnp.sum(candidates, axis=1, keepdims=True) > 1
  best_overlap = jax.nn.one_hot(jnp.argmax(overlaps, axis=1), overlaps.shape[1], axis=1, dtype=bool)
  mask = jnp.where(claimed_by_many, best_overlap, candidates)  # (B, M, A)
  positives = jnp.any(mask, axis=1)
  target_gt_index = jnp.argmax(mask, axis=1).astype(jnp.int32)  # (B, A)

  target_classes = jnp.take_along_axis(gt_classes, target_gt_index, axis=1)
  target_boxes = jnp.take_along_axis(gt_boxes_xyxy_px, target_gt_index[..., None], axis=1)
  one_hot = jax.nn.one_hot(target_classes, num_classes, dtype=class_scores.dtype)

  # Soft targets: each box's best positive gets that box's best CIoU, the others proportionally.
  metric = metric * mask
  best_metric_per_gt = jnp.max(metric, axis=-1, keepdims=True)
  best_overlap_per_gt = jnp.max(overlaps * mask, axis=-1, keepdims=True)
  normalised = jnp.max(metric * best_overlap_per_gt / (best_metric_per_gt + eps), axis=1)  # (B, A)
  target_scores = jnp.where(positives[..., None], one_hot, 0) * normalised[..., None]
  return Assignment(positives, target_scores, target_boxes, target_gt_index)
