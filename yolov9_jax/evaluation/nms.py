"""Class-aware non-maximum suppression on the device, static shapes, batched over images.

Semantics of the official ``non_max_suppression`` (FACTS.md §8.3): candidates are (box, class)
pairs scoring above ``conf_threshold`` (every such class per box when ``multi_label``, else the
best class only), at most ``max_candidates`` of them by score; greedy suppression of IoU >
``iou_threshold`` within a class; the first ``max_det`` kept in score order.

Rather than a K x K IoU matrix (K candidates: 3.6 GB per image at the official cap of 30,000),
``max_det`` rounds each take the best remaining candidate and suppress what overlaps it, which
yields exactly greedy NMS's first ``max_det`` outputs with O(max_det K) work and O(K) memory.
The official code also stops after a wall-clock limit; this never drops work silently: candidates
beyond the cap are counted in ``candidates_dropped``.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

# The official class offset: boxes of different classes never overlap once shifted this far.
_CLASS_OFFSET_PX = 7680.0


class Detections(NamedTuple):
  """boxes_xyxy_px (B, max_det, 4), scores (B, max_det), classes (B, max_det) int32, in score
  order; count (B,) how many rows are real (the rest are zeros); candidates_dropped (B,) how many
  candidates above the threshold the cap cut off."""
  boxes_xyxy_px: jax.Array
  scores: jax.Array
  classes: jax.Array
  count: jax.Array
  candidates_dropped: jax.Array


def _box_iou(box, boxes):
  """IoU of one box with many (x1, y1, x2, y2), as torchvision computes it (no epsilon)."""
  top_left = jnp.maximum(box[:2], boxes[:, :2])
  bottom_right = jnp.minimum(box[2:], boxes[:, 2:])
  inter = jnp.prod(jnp.clip(bottom_right - top_left, 0), axis=-1)
  area = jnp.prod(box[2:] - box[:2])
  areas = jnp.prod(boxes[:, 2:] - boxes[:, :2], axis=-1)
  return inter / (area + areas - inter)


def _one_image(predictions, conf_threshold, iou_threshold, max_det, max_candidates, multi_label):
  num_anchors, num_classes = predictions.shape[0], predictions.shape[1] - 4
  centre, size = predictions[:, :2], predictions[:, 2:4]
  boxes = jnp.concatenate([centre - size / 2, centre + size / 2], axis=-1)
  class_scores = predictions[:, 4:]
  if multi_label:
    scores = class_scores.reshape(-1)  # candidate k = anchor k // C, class k % C
    anchor_of = jnp.arange(num_anchors * num_classes) // num_classes
    class_of = jnp.arange(num_anchors * num_classes) % num_classes
  else:
    scores = jnp.max(class_scores, axis=-1)
    anchor_of = jnp.arange(num_anchors)
    class_of = jnp.argmax(class_scores, axis=-1)
  above = scores > conf_threshold
  cap = min(max_candidates, scores.shape[0])
  top_scores, top = jax.lax.top_k(jnp.where(above, scores, -jnp.inf), cap)
  candidate_boxes = boxes[anchor_of[top]]
  candidate_classes = class_of[top].astype(jnp.int32)
  shifted = candidate_boxes + (candidate_classes * _CLASS_OFFSET_PX)[:, None]
  alive = jnp.isfinite(top_scores)

  def take_best(i, state):
    alive, kept = state
    best = jnp.argmax(jnp.where(alive, top_scores, -jnp.inf))
    found = alive[best]
    overlaps = _box_iou(shifted[best], shifted) > iou_threshold
    alive = alive & ~(found & (overlaps | (jnp.arange(cap) == best)))
    kept = kept.at[i].set(jnp.where(found, best, -1))
    return alive, kept

  _, kept = jax.lax.fori_loop(0, max_det, take_best, (alive, jnp.full(max_det, -1, jnp.int32)))
  real = kept >= 0
  index = jnp.maximum(kept, 0)
  return Detections(
      boxes_xyxy_px=jnp.where(real[:, None], candidate_boxes[index], 0),
      scores=jnp.where(real, top_scores[index], 0),
      classes=jnp.where(real, candidate_classes[index], 0),
      count=jnp.sum(real).astype(jnp.int32),
      candidates_dropped=jnp.maximum(jnp.sum(above) - cap, 0).astype(jnp.int32))


def non_max_suppression(predictions, conf_threshold=0.001, iou_threshold=0.7, max_det=300,
                        max_candidates=30000, multi_label=True):
  """Detections of a batch of decoded predictions (B, A, 4 + C): cx, cy, w, h in pixels, then
  class scores (the model's eval output). Defaults are the official evaluation settings; the
  official detection settings are conf 0.25, IoU 0.45, multi_label False."""
  return jax.vmap(lambda p: _one_image(p, conf_threshold, iou_threshold, max_det, max_candidates,
                                       multi_label))(predictions)
