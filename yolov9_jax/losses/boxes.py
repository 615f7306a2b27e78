"""Box geometry for the loss: CIoU and box <-> distance conversions (all boxes x1, y1, x2, y2)."""
import math

import jax
import jax.numpy as jnp

CIOU_EPS = 1e-7


def ciou(boxes1_xyxy, boxes2_xyxy, eps=CIOU_EPS):
  """Complete IoU of broadcastable box arrays (..., 4), as the official ``bbox_iou(CIoU=True)``.

  Not symmetric, as there: eps is added to the heights (not the widths), and the aspect-ratio
  weight alpha is a constant for the gradient.
  """
  b1x1, b1y1, b1x2, b1y2 = jnp.moveaxis(boxes1_xyxy, -1, 0)
  b2x1, b2y1, b2x2, b2y2 = jnp.moveaxis(boxes2_xyxy, -1, 0)
  w1, h1 = b1x2 - b1x1, b1y2 - b1y1 + eps
  w2, h2 = b2x2 - b2x1, b2y2 - b2y1 + eps
  inter = (jnp.clip(jnp.minimum(b1x2, b2x2) - jnp.maximum(b1x1, b2x1), 0) *
           jnp.clip(jnp.minimum(b1y2, b2y2) - jnp.maximum(b1y1, b2y1), 0))
  union = w1 * h1 + w2 * h2 - inter + eps
  iou = inter / union
  enclosing_w = jnp.maximum(b1x2, b2x2) - jnp.minimum(b1x1, b2x1)
  enclosing_h = jnp.maximum(b1y2, b2y2) - jnp.minimum(b1y1, b2y1)
  diagonal_sq = enclosing_w ** 2 + enclosing_h ** 2 + eps
  centre_distance_sq = ((b2x1 + b2x2 - b1x1 - b1x2) ** 2 + (b2y1 + b2y2 - b1y1 - b1y2) ** 2) / 4
  v = (4 / math.pi ** 2) * (jnp.arctan(w2 / h2) - jnp.arctan(w1 / h1)) ** 2
  alpha = jax.lax.stop_gradient(v / (v - iou + (1 + eps)))
  return iou - (centre_distance_sq / diagonal_sq + v * alpha)


def distances_to_boxes(anchor_points, distances_ltrb):
  """Distances (left, top, right, bottom) around anchor points -> x1, y1, x2, y2 (same units)."""
  return jnp.concatenate([anchor_points - distances_ltrb[..., :2],
                          anchor_points + distances_ltrb[..., 2:]], axis=-1)


def boxes_to_distances(anchor_points, boxes_xyxy):
  """x1, y1, x2, y2 -> distances (left, top, right, bottom) from anchor points (same units)."""
  return jnp.concatenate([anchor_points - boxes_xyxy[..., :2],
                          boxes_xyxy[..., 2:] - anchor_points], axis=-1)
