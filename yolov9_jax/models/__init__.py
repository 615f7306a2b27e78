"""GELAN / YOLOv9 detectors in Flax: ``build(name, num_classes)`` returns a ``flax.linen.Module``."""
import jax.numpy as jnp

from yolov9_jax.models.architectures import ARCHITECTURES
from yolov9_jax.models.yolo import (INPUT_MULTIPLE, YOLO, check_image_size, head_branches,
                                    main_branch_layers)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def build(name: str, num_classes: int = 80, dtype=jnp.float32, fused: bool = False) -> YOLO:
  """The detector ``name`` (one of ``ARCHITECTURES``) with ``num_classes`` classes.

  ``dtype`` is the compute dtype (float32, bfloat16 or float64, or their names); parameters and
  BatchNorm statistics stay float32. ``fused`` builds the inference form, whose variables come
  from ``evaluation.inference.fold_batchnorm``.
  """
  if name not in ARCHITECTURES:
    raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int; got {num_classes!r}")
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"unknown compute dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    dtype = _DTYPES[dtype]
  return YOLO(name, num_classes=num_classes, dtype=dtype, fused=fused)


__all__ = ["ARCHITECTURES", "INPUT_MULTIPLE", "YOLO", "build", "check_image_size", "head_branches",
           "main_branch_layers"]
