"""One builder for every architecture table: a Flax module that runs the rows in order."""
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from yolov9_jax.models import heads, layers
from yolov9_jax.models.architectures import ARCHITECTURES

# The official parse_model rounds these modules' output widths up to a multiple of 8 (it matters
# once: yolov9-m / gelan-m's AConv(180) has 184 channels).
_ROUNDED_WIDTH_MODULES = ("Conv", "AConv", "ADown", "ELAN1", "RepNCSPELAN4", "SPPELAN")
HEAD_MODULES = ("DDetect", "DualDDetect")
INPUT_MULTIPLE = 32  # the largest stride: every level's grid must tile the input exactly


def check_image_size(size, name="image_size"):
  """Raises ValueError (naming ``name``) unless ``size`` is a positive multiple of INPUT_MULTIPLE."""
  if not isinstance(size, int) or size <= 0 or size % INPUT_MULTIPLE:
    raise ValueError(f"{name}={size!r} is not a multiple of {INPUT_MULTIPLE} (the largest "
                     f"stride) of at least {INPUT_MULTIPLE}")


def _round_width(width):
  return int(math.ceil(width / 8) * 8)


def _sources(source, index):
  """A row's ``from`` as a tuple of absolute layer indices (-1 is the previous layer; the first
  layer's -1 is the input image, index -1 here)."""
  source = source if isinstance(source, tuple) else (source,)
  return tuple(index - 1 if s == -1 else s for s in source)


def head_branches(architecture: str):
  """Branch names of the head outputs in their official order: ('aux', 'main') or ('main',)."""
  return ("aux", "main") if ARCHITECTURES[architecture][-1][1] == "DualDDetect" else ("main",)


def main_branch_layers(architecture: str):
  """Indices of the layers the main head depends on (kept at inference); the rest are PGI's
  auxiliary branch (training only) plus the head itself."""
  rows = ARCHITECTURES[architecture]
  head_index = len(rows) - 1
  head_inputs = _sources(rows[-1][0], head_index)
  pending = list(head_inputs[-3:])  # the main head reads the last three inputs
  kept = set()
  while pending:
    i = pending.pop()
    if i < 0 or i in kept:
      continue
    kept.add(i)
    pending.extend(_sources(rows[i][0], i))
  return sorted(kept)


class YOLO(nn.Module):
  """A GELAN or YOLOv9 detector built from ``ARCHITECTURES[architecture]``.

  ``__call__(images, train)``: images are float NHWC in [0, 1] (RGB), sides multiples of 32.
    train=False: {"main": (B, A, 4 + num_classes), "aux": same (yolov9-* only)}: boxes cx, cy, w, h
      in input pixels, then class probabilities; anchors stride 8, 16, 32, each row-major.
    train=True: {"main": [3 raw maps], "aux": [3 raw maps]}, each (B, H_l, W_l, 64 + num_classes).
  Every layer's output is sown into the ``intermediates`` collection as ``layer_{iii}`` (the head's
  is the per-branch raw maps), which is free unless that collection is made mutable.
  """
  architecture: str
  num_classes: int = 80
  dtype: Any = jnp.float32
  fused: bool = False  # the inference form (evaluation.inference.fold_batchnorm's variables)

  def _layer(self, index, module, args, inputs, train):
    name = f"model_{index}"
    kw = dict(dtype=self.dtype, fused=self.fused, name=name)
    if module in _ROUNDED_WIDTH_MODULES:
      args = (_round_width(args[0]),) + tuple(args[1:])
    if module == "Silence":
      return inputs[0]
    if module == "Conv":
      features, kernel_size, stride = args
      return layers.Conv(features, kernel_size, stride, **kw)(inputs[0], train)
    if module == "ELAN1":
      return layers.ELAN1(*args, **kw)(inputs[0], train)
    if module == "RepNCSPELAN4":
      return layers.RepNCSPELAN4(*args, **kw)(inputs[0], train)
    if module == "AConv":
      return layers.AConv(*args, **kw)(inputs[0], train)
    if module == "ADown":
      return layers.ADown(*args, **kw)(inputs[0], train)
    if module == "SPPELAN":
      return layers.SPPELAN(*args, **kw)(inputs[0], train)
    if module == "CBLinear":
      return layers.CBLinear(tuple(args[0]), dtype=self.dtype, name=name)(inputs[0], train)
    if module == "CBFuse":
      slices = [cb_outputs[j] for cb_outputs, j in zip(inputs[:-1], args[0])]
      return layers.cb_fuse(slices, inputs[-1])
    if module == "Upsample":
      return layers.upsample_nearest_2x(inputs[0])
    if module == "Concat":
      return jnp.concatenate(inputs, axis=-1)
    if module in HEAD_MODULES:
      return heads.DetectHead(self.num_classes, dual=module == "DualDDetect", **kw)(inputs, train)
    raise ValueError(f"layer {index} of {self.architecture}: unknown module {module!r}")

  @nn.compact
  def __call__(self, images, train: bool = False):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be NHWC with 3 channels (RGB); got shape {images.shape}")
    height, width = images.shape[1:3]
    if height % INPUT_MULTIPLE or width % INPUT_MULTIPLE:
      raise ValueError(
          f"image sides must be multiples of {INPUT_MULTIPLE}; got {height}x{width} (HxW). "
          f"Letterbox or resize, e.g. to {math.ceil(height / 32) * 32}x{math.ceil(width / 32) * 32}.")
    x = images.astype(self.dtype)
    outputs = []
    for index, (source, module, args) in enumerate(ARCHITECTURES[self.architecture]):
      inputs = [x if s == -1 else outputs[s] for s in _sources(source, index)]
      y = self._layer(index, module, args, inputs, train)
      self.sow("intermediates", f"layer_{index:03d}", y)
      outputs.append(y)
    branch_maps = dict(zip(head_branches(self.architecture), outputs[-1]))
    if train:
      return branch_maps
    return {branch: heads.decode(maps) for branch, maps in branch_maps.items()}
