"""Model weights from anything a user names, local or on cloud storage: a train.py workdir or
checkpoint directory (its EMA weights, or the raw ones), an official PyTorch checkpoint (``.pt``,
``.safetensors``: ``interop.load_torch_checkpoint``), our ``.msgpack``
(``flax.serialization.to_bytes`` of the variables) or ``.npz`` (the variables flattened with
"/"-joined keys). train.py (``model.init_from``), eval.py, detect.py and export.py all load here.
"""
import io

import flax
import numpy as np

from yolov9_jax import interop, models, paths
from yolov9_jax.training import checkpoint

TORCH_SUFFIXES = (".pt", ".pth", ".safetensors")


def load(path, model_name, num_classes=None, ema=True):
  """(variables ``{"params", "batch_stats"}`` as float32 NumPy, info) of ``model_name`` from
  ``path``, checked against the model's layout; ``num_classes`` is read from the file when None,
  else checked. ``ema``: a training checkpoint's EMA weights (as the official code saves them)
  rather than its raw training weights. ``info["meta"]``: a training checkpoint's saved config
  and class names (None for files); ``info["class_names"]`` where the file has them."""
  path = paths.user_path(path)
  if model_name not in models.ARCHITECTURES:
    raise ValueError(f"unknown model {model_name!r}; expected one of {sorted(models.ARCHITECTURES)}")
  info = {"meta": None, "class_names": None}
  if path.is_dir():  # a train.py workdir or checkpoint
    saved_name, variables, meta = checkpoint.load_model_variables(path, ema=ema)
    if saved_name != model_name:
      raise ValueError(f"{path} is a checkpoint of {saved_name}, not {model_name}")
    info.update(meta=meta, class_names=meta.get("class_names"))
  elif not path.is_file():
    raise FileNotFoundError(f"weights file or checkpoint directory {path} does not exist")
  elif path.suffix.lower() in TORCH_SUFFIXES:
    # It checks the file against model_name and names the architecture the file fits otherwise
    # (a "-converted" yolov9 file is a gelan one).
    _, variables, torch_info = interop.load_torch_checkpoint(path, config=model_name,
                                                             num_classes=num_classes)
    info.update(torch_info, meta=None)
  elif path.suffix.lower() == ".npz":
    with np.load(io.BytesIO(path.read_bytes())) as arrays:
      variables = flax.traverse_util.unflatten_dict({k: arrays[k] for k in arrays.files}, sep="/")
  elif path.suffix.lower() == ".msgpack":
    variables = flax.serialization.msgpack_restore(path.read_bytes())
  else:
    raise ValueError(f"weights file {path}: unknown format {path.suffix!r}; expected .msgpack, "
                     ".npz, .pt or .safetensors, or a train.py workdir or checkpoint directory")
  return _checked_variables(variables, model_name, num_classes, path), info


def _expected_shapes(model_name, num_classes):
  """{"params/model_0/conv/kernel"-style key: ShapeDtypeStruct} of the model's variables."""
  return flax.traverse_util.flatten_dict(models.abstract_variables(model_name, num_classes), sep="/")


def _checked_variables(variables, model_name, num_classes, path):
  """``variables`` as float32 numpy, after checking them against ``model_name``'s layout."""
  if not isinstance(variables, dict) or not {"params", "batch_stats"} <= set(variables):
    raise ValueError(f"weights file {path} does not hold model variables ('params' and "
                     f"'batch_stats'); its top-level keys are {sorted(variables)}")
  try:
    found_classes = models.num_classes_of(model_name, variables)
  except KeyError as error:
    raise ValueError(f"weights file {path} is not a {model_name} checkpoint: no {error} in its "
                     "head") from None
  if num_classes is not None and found_classes != num_classes:
    raise ValueError(f"weights file {path} has {found_classes} classes, expected {num_classes}")
  expected = _expected_shapes(model_name, found_classes)
  found = flax.traverse_util.flatten_dict(
      {k: variables[k] for k in ("params", "batch_stats")}, sep="/")
  problems = [f"missing {k}" for k in expected if k not in found]
  problems += [f"unexpected {k}" for k in found if k not in expected]
  problems += [f"{k} has shape {np.shape(found[k])}, expected {expected[k].shape}"
               for k in expected if k in found and np.shape(found[k]) != expected[k].shape]
  if problems:
    raise ValueError(f"weights file {path} does not fit {model_name} with {found_classes} classes "
                     f"({len(problems)} problems): " + "; ".join(problems[:10]))
  return flax.traverse_util.unflatten_dict(
      {k: np.asarray(v, np.float32) for k, v in found.items()}, sep="/")
