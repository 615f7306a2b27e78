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
# The official cap on candidates per image that enter NMS.
MAX_CANDIDATES = 30000


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
  """IoU of each image's one box (B, 1, 4) with its many (B, K, 4) (x1, y1, x2, y2), as
  torchvision computes it (no epsilon): (B, K)."""
  top_left = jnp.maximum(box[..., :2], boxes[..., :2])
  bottom_right = jnp.minimum(box[..., 2:], boxes[..., 2:])
  inter = jnp.prod(jnp.clip(bottom_right - top_left, 0), axis=-1)
  area = jnp.prod(box[..., 2:] - box[..., :2], axis=-1)
  areas = jnp.prod(boxes[..., 2:] - boxes[..., :2], axis=-1)
  return inter / (area + areas - inter)


def boxes_xyxy(predictions):
  """(x1, y1, x2, y2) boxes (B, A, 4) of decoded predictions (B, A, 4 + C) (cx, cy, w, h first)."""
  centre, size = predictions[..., :2], predictions[..., 2:4]
  return jnp.concatenate([centre - size / 2, centre + size / 2], axis=-1)


def _rows(array, index):
  """array[b, index[b, k]] for every image b: (B, N, ...) taken at (B, K) -> (B, K, ...)."""
  index = index.reshape(index.shape + (1,) * (array.ndim - 2))
  # Every index here is in range: no out-of-range fill (a select that onnxruntime 1.31 cannot run
  # on booleans).
  return jnp.take_along_axis(array, index, axis=1, mode="promise_in_bounds")


def non_max_suppression(predictions, conf_threshold=0.001, iou_threshold=0.7, max_det=300,
                        max_candidates=MAX_CANDIDATES, multi_label=True):
  """Detections of a batch of decoded predictions (B, A, 4 + C): cx, cy, w, h in pixels, then
  class scores (the model's eval output). Defaults are the official evaluation settings; the
  official detection settings are conf 0.25, IoU 0.45, multi_label False.

  Written on the batch axis rather than vmapped over images, and with static shapes only, so that
  exporters that convert loops but not batched loops (jax2onnx) take the same graph."""
  batch, num_anchors, num_classes = (predictions.shape[0], predictions.shape[1],
                                     predictions.shape[2] - 4)
  boxes = boxes_xyxy(predictions)
  class_scores = predictions[..., 4:]
  if multi_label:
    scores = class_scores.reshape(batch, num_anchors * num_classes)  # k = anchor k // C, class k % C
    anchor_of = jnp.arange(num_anchors * num_classes) // num_classes
    class_of = jnp.broadcast_to(jnp.arange(num_anchors * num_classes) % num_classes, scores.shape)
  else:
    scores = jnp.max(class_scores, axis=-1)
    anchor_of = jnp.arange(num_anchors)
    class_of = jnp.argmax(class_scores, axis=-1)
  above = scores > conf_threshold
  cap = min(max_candidates, scores.shape[1])
  if cap < scores.shape[1]:
    top_scores, top = jax.lax.top_k(jnp.where(above, scores, -jnp.inf), cap)
  else:
    # Nothing to cut: the rounds below take the best remaining candidate by argmax (the lowest
    # index among equal scores, as top_k's stable order would), so sorting first changes nothing.
    # Without the sort, the graph also converts to TFLite, which has no general sort.
    top_scores = scores
    top = jnp.broadcast_to(jnp.arange(scores.shape[1]), scores.shape)
  alive = _rows(above, top)
  candidate_boxes = _rows(boxes, anchor_of[top])
  candidate_classes = _rows(class_of, top).astype(jnp.int32)
  shifted = candidate_boxes + (candidate_classes * _CLASS_OFFSET_PX)[..., None]

  def take_best(i, state):
    # Everything the rounds read travels in the loop state: jax2onnx's Loop takes no traced
    # values from outside its body.
    alive, kept, top_scores, shifted = state
    best = jnp.argmax(jnp.where(alive, top_scores, -jnp.inf), axis=-1)[:, None]  # (B, 1)
    found = _rows(alive, best)
    overlaps = _box_iou(_rows(shifted, best), shifted) > iou_threshold
    alive = alive & ~(found & (overlaps | (jnp.arange(cap) == best)))
    kept = jax.lax.dynamic_update_slice_in_dim(kept, jnp.where(found, best, -1).astype(jnp.int32),
                                               i, axis=1)
    return alive, kept, top_scores, shifted

  kept = jax.lax.fori_loop(0, max_det, take_best, (
      alive, jnp.broadcast_to(jnp.int32(-1), (batch, max_det)), top_scores, shifted))[1]
  real = kept >= 0
  index = jnp.maximum(kept, 0)
  return Detections(
      boxes_xyxy_px=jnp.where(real[..., None], _rows(candidate_boxes, index), 0),
      scores=jnp.where(real, _rows(top_scores, index), 0),
      classes=jnp.where(real, _rows(candidate_classes, index), 0),
      count=jnp.sum(real, axis=-1).astype(jnp.int32),
      candidates_dropped=jnp.maximum(jnp.sum(above, axis=-1) - cap, 0).astype(jnp.int32))
