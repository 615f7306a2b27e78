"""Our Flax variables <-> the official PyTorch ``state_dict`` (keys, order, shapes, layouts).

Names map mechanically: Flax module ``model_3/cv2_0/m_0/cv1/conv1/bn`` is the official
``model.3.cv2.0.m.0.cv1.conv1.bn``. Conv kernels are (kh, kw, in/groups, out) here and
(out, in/groups, kh, kw) there; BatchNorm ``scale/bias`` and ``mean/var`` are ``weight/bias`` and
``running_mean/running_var``. The DFL convs (fixed bin values 0..15) and BatchNorm's
``num_batches_tracked`` have no counterpart here: they are written on export and checked or ignored
on import.
"""
import jax
import numpy as np
from flax import traverse_util

from yolov9_jax import models
from yolov9_jax.models import heads
from yolov9_jax.models.heads import REG_MAX

# Order of names inside one official module where it is not alphabetical: a Conv block registers
# its conv before its bn, a conv its weight before its bias, a BatchNorm its five entries thus.
_REGISTRATION_RANK = {"conv": 0, "bn": 1, "weight": 0, "bias": 1, "running_mean": 2,
                      "running_var": 3, "num_batches_tracked": 4}
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "bias"): "bias",
               ("params", "scale"): "weight", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}


def _official_order(key):
  """Sort key reproducing PyTorch's module-registration order of the official state_dict."""
  return tuple((0, int(s), "") if s.isdigit() else (1, _REGISTRATION_RANK.get(s, 99), s)
               for s in key.split("."))


def _head_index(architecture):
  return len(models.ARCHITECTURES[architecture]) - 1


def _dfl_keys(architecture):
  names = ("dfl", "dfl2") if len(models.head_branches(architecture)) == 2 else ("dfl",)
  return [f"model.{_head_index(architecture)}.{n}.conv.weight" for n in names]


def _torch_entries(variables):
  """(official key, collection, flax path, array) for every array of ``variables``."""
  entries = []
  for collection in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(dict(variables.get(collection, {})))
    for path, array in flat.items():
      modules = ".".join(name.replace("_", ".") for name in path[:-1])
      entries.append((f"{modules}.{_LEAF_NAMES[(collection, path[-1])]}", collection, path, array))
  return entries


def _to_torch_layout(array):
  array = np.asarray(array)
  return array.transpose(3, 2, 0, 1) if array.ndim == 4 else array


def _from_torch_layout(array):
  return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array


def _dfl_weight():
  return np.arange(REG_MAX, dtype=np.float32).reshape(1, REG_MAX, 1, 1)


def to_torch_state_dict(architecture: str, variables) -> dict:
  """``{official key: numpy array}`` with every key of the official state_dict, in its order.

  Arrays keep their dtype (float32 by default); ``num_batches_tracked`` is written as int64 0,
  which the official code never reads (its BatchNorm momentum is fixed).
  """
  state_dict = {}
  for key, _, _, array in _torch_entries(variables):
    if isinstance(array, jax.ShapeDtypeStruct):  # from jax.eval_shape: a zero-size stand-in
      array = np.broadcast_to(np.zeros((), array.dtype), array.shape)
    state_dict[key] = _to_torch_layout(array)
    if key.endswith(".running_var"):
      state_dict[key[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  for key in _dfl_keys(architecture):
    state_dict[key] = _dfl_weight()
  return {key: state_dict[key] for key in sorted(state_dict, key=_official_order)}


def _state_dict_shapes(architecture, abstract_variables):
  return {key: np.shape(value)
          for key, value in to_torch_state_dict(architecture, abstract_variables).items()}


def expected_state_dict_shapes(architecture: str, num_classes: int) -> dict:
  """``{official key: shape}`` of the state_dict of ``architecture`` with ``num_classes``."""
  return _state_dict_shapes(architecture, models.abstract_variables(architecture, num_classes))


def class_layer_key(architecture: str) -> str:
  """The official key of the head's class-layer bias, whose length is the number of classes."""
  return f"model.{_head_index(architecture)}.{heads.CLASS_LAYER.replace('_', '.')}.bias"


def _class_count(architecture, state_dict):
  key = class_layer_key(architecture)
  if key not in state_dict:
    raise ValueError(f"state_dict has no key {key} (the class layer of {architecture}'s head): "
                     f"it is not a {architecture} checkpoint")
  return int(np.shape(state_dict[key])[0])


def from_torch_state_dict(architecture: str, state_dict, num_classes=None):
  """Flax ``{"params", "batch_stats"}`` (float32) from an official-layout state_dict.

  ``num_classes`` is read from the class layer's shape when None. Raises ValueError naming every
  missing, unexpected and mis-shaped key. ``num_batches_tracked`` entries are optional and ignored.
  """
  if architecture not in models.ARCHITECTURES:
    raise ValueError(f"unknown architecture {architecture!r}; expected one of "
                     f"{sorted(models.ARCHITECTURES)}")
  checkpoint_classes = _class_count(architecture, state_dict)
  num_classes = checkpoint_classes if num_classes is None else num_classes
  abstract = models.abstract_variables(architecture, num_classes)
  expected = _state_dict_shapes(architecture, abstract)
  problems = []
  if checkpoint_classes != num_classes:
    problems.append(f"the checkpoint has {checkpoint_classes} classes, the model {num_classes}")
  missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
  unexpected = [k for k in state_dict if k not in expected]
  misshaped = [f"{k} has shape {tuple(np.shape(state_dict[k]))}, expected {tuple(expected[k])}"
               for k in expected if k in state_dict and tuple(np.shape(state_dict[k])) != tuple(expected[k])]
  for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                       ("mis-shaped keys", misshaped)):
    if items:
      problems.append(f"{len(items)} {title}: " + "; ".join(items[:20]) +
                      (f"; ... ({len(items) - 20} more)" if len(items) > 20 else ""))
  if problems:
    raise ValueError(f"state_dict does not fit {architecture} with {num_classes} classes: " +
                     " | ".join(problems))
  for key in _dfl_keys(architecture):
    if not np.array_equal(np.asarray(state_dict[key], np.float32), _dfl_weight()):
      raise ValueError(f"state_dict key {key} must hold the fixed DFL bins 0..{REG_MAX - 1}")

  flat = {"params": {}, "batch_stats": {}}
  for key, collection, path, _ in _torch_entries(abstract):
    flat[collection][path] = _from_torch_layout(np.asarray(state_dict[key], dtype=np.float32))
  return {collection: traverse_util.unflatten_dict(arrays) for collection, arrays in flat.items()}
