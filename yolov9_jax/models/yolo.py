"""One builder for every architecture table: a Flax module that runs the rows in order."""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from yolov9_jax.models import heads, layers
from yolov9_jax.models.architectures import ARCHITECTURES

# The official parse_model rounds these modules' output widths up to a multiple of 8 (it matters
# once: yolov9-m / gelan-m's AConv(180) has 184 channels).
_ROUNDED_WIDTH_MODULES = ("Conv", "AConv", "ADown", "ELAN1", "RepNCSPELAN4", "SPPELAN")
HEAD_MODULES = ("DDetect", "DualDDetect")
INPUT_MULTIPLE = 32  # the largest stride: every level's grid must tile the input exactly
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


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


def head_layer(architecture: str) -> str:
  """The head's module name in the variables (``model_{i}``, i its official layer index)."""
  return f"model_{len(ARCHITECTURES[architecture]) - 1}"


def num_classes_of(architecture: str, variables) -> int:
  """The number of classes of ``variables`` (``{"params", ...}`` in ``architecture``'s layout),
  read off the head's class layer. KeyError where that layer is missing."""
  head = variables["params"][head_layer(architecture)]
  return int(np.shape(head[heads.CLASS_LAYER]["bias"])[0])


def gelan_counterpart(architecture: str) -> str:
  """The architecture whose layout the main branch of ``architecture`` has: itself for a
  single-branch (gelan) table, else the single-branch table whose layers are, row for row, the
  modules and arguments of ``architecture``'s main branch (Silence rows aside)."""
  if len(head_branches(architecture)) == 1:
    return architecture
  rows = ARCHITECTURES[architecture]
  main = [rows[i][1:] for i in main_branch_layers(architecture) if rows[i][1] != "Silence"]
  for name, candidate in ARCHITECTURES.items():
    if len(head_branches(name)) == 1 and [
        row[1:] for row in candidate[:-1] if row[1] != "Silence"] == main:
      return name
  raise ValueError(f"no single-branch architecture has the layout of {architecture}'s main "
                   "branch: add its gelan table to models/architectures.py")


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


def build(name: str, num_classes: int = 80, dtype=jnp.float32, fused: bool = False,
          remat: bool = False) -> "YOLO":
  """The detector ``name`` (one of ``ARCHITECTURES``) with ``num_classes`` classes.

  ``dtype`` is the compute dtype (float32, bfloat16 or float64, or their names); parameters and
  BatchNorm statistics stay float32. ``fused`` builds the inference form, whose variables come
  from ``evaluation.inference.fold_batchnorm``. ``remat`` recomputes each layer's insides in the
  backward pass instead of keeping them (less memory in training, the same variables).
  """
  if name not in ARCHITECTURES:
    raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"unknown compute dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    dtype = _DTYPES[dtype]
  return YOLO(name, num_classes=num_classes, dtype=dtype, fused=fused, remat=remat)


def init_variables(architecture: str, num_classes: int, seed: int, image_size: int = 64,
                   dtype="float32"):
  """Fresh training variables ({"params", "batch_stats"}) drawn from ``seed``."""
  model = build(architecture, num_classes=num_classes, dtype=dtype)
  key = jax.random.key(seed)
  return jax.jit(lambda: model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32),
                                    train=False))()


@functools.lru_cache(maxsize=32)
def abstract_variables(architecture: str, num_classes: int = 80, fused: bool = False):
  """The training variables' (or with ``fused`` the inference form's) shapes and dtypes as
  ``jax.ShapeDtypeStruct`` leaves, traced without computing anything. A trace takes seconds, so
  each setting is traced once per process; callers only read the result."""
  model = build(architecture, num_classes=num_classes, fused=fused)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                           train=False))


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
  # Rematerialisation: each layer keeps only its output for the backward pass and recomputes
  # what is inside it, trading compute for activation memory (same variables, same numbers).
  remat: bool = False

  def _block(self, module_class):
    """``module_class``, rematerialised in the backward pass when ``remat`` is set (``train``,
    the call's second argument after ``self`` and the input, is static)."""
    return nn.remat(module_class, static_argnums=(2,)) if self.remat else module_class

  def _layer(self, index, module, args, inputs, train):
    name = f"model_{index}"
    kw = dict(dtype=self.dtype, fused=self.fused, name=name)
    if module in _ROUNDED_WIDTH_MODULES:
      args = (_round_width(args[0]),) + tuple(args[1:])
    if module == "Silence":
      return inputs[0]
    if module == "Conv":
      features, kernel_size, stride = args
      return self._block(layers.Conv)(features, kernel_size, stride, **kw)(inputs[0], train)
    if module in ("ELAN1", "RepNCSPELAN4", "AConv", "ADown", "SPPELAN"):
      return self._block(getattr(layers, module))(*args, **kw)(inputs[0], train)
    if module == "CBLinear":
      return self._block(layers.CBLinear)(tuple(args[0]), dtype=self.dtype, name=name)(
          inputs[0], train)
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
