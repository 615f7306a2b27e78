"""Anchor-free detection heads (DDetect, DualDDetect) and the decoding of their raw maps.

A raw head map per level is (B, H_l, W_l, 4 * REG_MAX + num_classes): box-distribution logits
first (channel = side * 16 + bin, sides left, top, right, bottom), then class logits.
"""
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from yolov9_jax.models import layers

REG_MAX = 16
STRIDES = (8, 16, 32)
# The first branch's level-0 class conv (cv3.0.2 in the official state_dict): its bias has one
# entry per class, so it tells a set of weights' number of classes.
CLASS_LAYER = "cv3_0_2"
# The official heads initialise class biases for an object prior of 5 per 640x640 image per level.
_BIAS_INIT_IMAGE_SIZE = 640


def head_widths(p3_channels: int, num_classes: int):
  """Hidden widths of the box and class branches, computed once from the P3 input width."""
  box_width = max(p3_channels // 4, 4 * REG_MAX, 16)
  box_width = int(math.ceil(box_width / 4) * 4)
  class_width = max(p3_channels, min(2 * num_classes, 128))
  return box_width, class_width


def _constant_init(value):
  return lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype)


class DetectHead(nn.Module):
  """DDetect (one branch: cv2/cv3) or DualDDetect (aux cv2/cv3 on inputs 0-2, main cv4/cv5 on 3-5).

  Returns one list of raw maps per branch, in the official order (aux first for the dual head).
  """
  num_classes: int
  dual: bool = False
  dtype: layers.Dtype = jnp.float32
  fused: bool = False

  def _branch(self, features, box_name, class_name, train):
    box_width, class_width = head_widths(features[0].shape[-1], self.num_classes)
    maps = []
    for level, (x, stride) in enumerate(zip(features, STRIDES)):
      box = layers.Conv(box_width, 3, **layers.form(self), name=f"{box_name}_{level}_0")(x, train)
      box = layers.Conv(box_width, 3, groups=4, **layers.form(self),
                        name=f"{box_name}_{level}_1")(box, train)
      box = layers.biased_conv_1x1(4 * REG_MAX, box_width, groups=4, bias_init=_constant_init(1.0),
                                   dtype=self.dtype, name=f"{box_name}_{level}_2")(box)
      cls = layers.Conv(class_width, 3, **layers.form(self),
                        name=f"{class_name}_{level}_0")(x, train)
      cls = layers.Conv(class_width, 3, **layers.form(self),
                        name=f"{class_name}_{level}_1")(cls, train)
      class_prior = math.log(5 / self.num_classes / (_BIAS_INIT_IMAGE_SIZE / stride) ** 2)
      cls = layers.biased_conv_1x1(self.num_classes, class_width, bias_init=_constant_init(class_prior),
                                   dtype=self.dtype, name=f"{class_name}_{level}_2")(cls)
      maps.append(jnp.concatenate([box, cls], axis=-1))
    return maps

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], train: bool):
    if self.dual:
      return [self._branch(features[:3], "cv2", "cv3", train),
              self._branch(features[3:], "cv4", "cv5", train)]
    return [self._branch(features, "cv2", "cv3", train)]


def anchor_points_and_strides(level_shapes):
  """Anchor centres in grid units ((x + 0.5, y + 0.5), row-major per level, levels in order) and
  the stride of each anchor in input pixels. Returns numpy (A, 2) and (A,) float32 arrays."""
  points, strides = [], []
  for (height, width), stride in zip(level_shapes, STRIDES):
    ys, xs = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    points.append(np.stack([xs.ravel(), ys.ravel()], axis=-1))
    strides.append(np.full(height * width, stride))
  return np.concatenate(points).astype(np.float32), np.concatenate(strides).astype(np.float32)


def flatten_maps(maps):
  """Per-level maps (B, H_l, W_l, C) -> (B, A, C), anchors in the official order."""
  return jnp.concatenate([m.reshape(m.shape[0], -1, m.shape[-1]) for m in maps], axis=1)


def dfl_expectation(box_logits):
  """(..., 4 * REG_MAX) side-major bin logits -> (..., 4) expected distances l, t, r, b (bins)."""
  probs = jax.nn.softmax(box_logits.reshape(*box_logits.shape[:-1], 4, REG_MAX), axis=-1)
  return probs @ jnp.arange(REG_MAX, dtype=probs.dtype)


def decode(maps):
  """Raw maps of one branch -> (B, A, 4 + num_classes): cx, cy, w, h in input pixels, then
  sigmoid class scores (the official eval output, transposed to anchors-first)."""
  flat = flatten_maps(maps)
  points, strides = anchor_points_and_strides([m.shape[1:3] for m in maps])
  points = jnp.asarray(points, flat.dtype)
  strides = jnp.asarray(strides, flat.dtype)[:, None]
  distances = dfl_expectation(flat[..., :4 * REG_MAX])
  top_left = points - distances[..., :2]
  bottom_right = points + distances[..., 2:]
  boxes_cxcywh_px = jnp.concatenate([(top_left + bottom_right) / 2, bottom_right - top_left], -1) * strides
  return jnp.concatenate([boxes_cxcywh_px, jax.nn.sigmoid(flat[..., 4 * REG_MAX:])], axis=-1)
