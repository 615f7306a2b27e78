"""PyTorch checkpoint files <-> our variables, without PyTorch and without running code from a file.

Reading. Official checkpoints are ``torch.save`` zip archives whose ``<prefix>/data.pkl`` pickles
whole module objects (``models.yolo.DetectionModel`` and the layers it holds, FACTS.md §10).
A plain ``pickle.load`` would import and call whatever the file names, so ``_RestrictedUnpickler``
resolves only the globals that rebuild tensors and plain containers; every ``models.*`` and
``torch.nn.modules.*`` class becomes an inert stub that keeps its pickled attributes, and any
other global stops the load with ``UnsafeCheckpointError`` before anything is called. Storages
are read from the archive with NumPy. Walking the stubs' ``_parameters``, ``_buffers`` and
``_modules`` gives the official state_dict keys, which ``from_torch_state_dict`` maps.

Writing. ``save_torch_state_dict`` writes the archive that ``torch.save(state_dict)`` writes (same
records, 64-byte aligned storages, a protocol-2 pickle referencing ``torch._utils._rebuild_tensor_v2``
and storages by persistent id), so ``torch.load(path, weights_only=True)`` reads it and the
official model's ``load_state_dict(..., strict=True)`` takes it.
"""
import collections
import functools
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from yolov9_jax import models, paths
from yolov9_jax.interop.state_dict import (class_layer_key, expected_state_dict_shapes,
                                           from_torch_state_dict, to_torch_state_dict)

# The two numpy functions a pickled array or scalar is rebuilt with, taken from numpy's own
# pickling (public API) rather than imported from its private module.
_NUMPY_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_NUMPY_SCALAR = np.float32(0).__reduce__()[0]

_STORAGE_DTYPES = {
    "HalfStorage": np.dtype(np.float16), "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_)}
_STORAGE_OF_DTYPE = {dtype: name for name, dtype in _STORAGE_DTYPES.items()}
_STUB_MODULE_PREFIXES = ("models.", "torch.nn.modules.")
_NUM_BATCHES_TRACKED = "num_batches_tracked"


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The file references something other than tensors, plain containers and module classes."""


# What ``torch.HalfStorage`` etc. resolve to: a name and a dtype, not callable, not mutable.
_StorageType = collections.namedtuple("_StorageType", ["name", "dtype"])


class ModuleStub:
  """Stands in for an official model class or a ``torch.nn`` module: keeps the pickled attributes
  (``pickled_state``) and does nothing else. ``official_class`` names the class it replaces."""
  official_class = ""

  def __init__(self, *unused_args, **unused_kwargs):
    self.pickled_state = {}

  def __setstate__(self, state):
    self.pickled_state = state

  def __repr__(self):
    return f"ModuleStub({self.official_class})"


def _torch_size(values=()):
  return tuple(int(v) for v in values)


def _refuse(message):
  raise UnsafeCheckpointError(message)


# A storage read from the archive: a flat array that only persistent ids produce, so a tensor is
# never rebuilt over an array made some other way. Immutable, so that no BUILD opcode can swap it.
_Storage = collections.namedtuple("_Storage", ["array"])


class _ZipStorages:
  """The raw storages ``<prefix>/data/<key>`` of a torch zip archive, read once each."""

  def __init__(self, archive, prefix, byteorder):
    self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
    self._arrays = {}

  def array(self, key, storage_type):
    if (key, storage_type.name) not in self._arrays:
      record = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(record)
      except KeyError:
        raise ValueError(f"the checkpoint references storage {key}, but has no record "
                         f"{record}") from None
      dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
      if len(raw) % dtype.itemsize:
        raise ValueError(f"storage record {record} has {len(raw)} bytes, not a multiple of "
                         f"{dtype.itemsize} ({storage_type.name})")
      self._arrays[(key, storage_type.name)] = _Storage(np.frombuffer(raw, dtype))
    return self._arrays[(key, storage_type.name)]


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds tensors (as NumPy arrays), plain containers and inert module stubs; refuses the rest."""

  def __init__(self, file, storages, source):
    super().__init__(file)
    self._storages, self._source = storages, source
    self._stub_classes = {}
    self._allowed = {
        ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
        ("torch", "Size"): self._torch_size,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("__builtin__", "set"): set, ("builtins", "set"): set,
        ("_codecs", "encode"): self._latin1_bytes,
        **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
        # NumPy arrays and scalars (per-epoch official checkpoints keep best_fitness as one): they
        # rebuild from a dtype and raw bytes, and their items come through this same unpickler.
        **{(module, name): value for module in ("numpy.core.multiarray", "numpy._core.multiarray")
           for name, value in (("_reconstruct", _NUMPY_RECONSTRUCT), ("scalar", _NUMPY_SCALAR))},
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}

  def find_class(self, module, name):
    if (module, name) in self._allowed:
      return self._allowed[(module, name)]
    if module.startswith(_STUB_MODULE_PREFIXES) or module == "models":
      if (module, name) not in self._stub_classes:
        self._stub_classes[(module, name)] = type(
            name, (ModuleStub,), {"official_class": f"{module}.{name}", "__module__": __name__})
      return self._stub_classes[(module, name)]
    _refuse(f"{self._source} references the global {module}.{name}, which is neither a tensor "
            "rebuilder, a torch storage, a plain container nor an official model or torch.nn "
            "module class: refused, nothing from the file was run")

  def persistent_load(self, persistent_id):
    if not (isinstance(persistent_id, tuple) and len(persistent_id) >= 3
            and persistent_id[0] == "storage" and isinstance(persistent_id[1], _StorageType)
            and isinstance(persistent_id[2], str)):
      _refuse(f"{self._source} has a persistent id {persistent_id!r} that is not a torch storage "
              "('storage', <torch.*Storage>, key, location, numel)")
    if self._storages is None:
      _refuse(f"{self._source} references a storage but is not a torch zip archive")
    return self._storages.array(persistent_id[2], persistent_id[1])

  # The callables above are bound methods, C functions and types, and the storage types tuples: a
  # BUILD opcode aimed at one of them cannot set attributes (e.g. a function's __defaults__).
  def _rebuild_parameter(self, data, *unused):
    return data  # requires_grad and hooks mean nothing to an array

  def _torch_size(self, values=()):
    return _torch_size(values)

  def _latin1_bytes(self, text, encoding="latin1"):
    # Protocol-2 pickles spell bytes objects (NumPy array payloads) as _codecs.encode(text,
    # "latin1"); any other codec would be a look-up by name of something we do not need.
    if encoding not in ("latin1", "latin-1"):
      _refuse(f"{self._source}: _codecs.encode with encoding {encoding!r}; only latin1 is allowed")
    return text.encode("latin1")

  def _rebuild_tensor(self, storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _Storage):
      _refuse(f"{self._source}: _rebuild_tensor_v2 got {type(storage).__name__}, not a storage")
    storage = storage.array
    shape, strides, offset = _torch_size(size), _torch_size(stride), int(storage_offset)
    if len(shape) != len(strides) or min(shape + strides + (offset,), default=0) < 0:
      raise ValueError(f"{self._source}: a tensor has size {shape}, stride {strides}, offset {offset}")
    if 0 in shape:
      return np.zeros(shape, storage.dtype)
    # as_strided reads whatever memory the strides reach: bound it by the storage first.
    last_element = offset + sum((n - 1) * s for n, s in zip(shape, strides))
    if last_element >= storage.size:
      raise ValueError(f"{self._source}: a tensor of size {shape}, stride {strides} at offset "
                       f"{offset} reaches element {last_element} of a storage of {storage.size}")
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape, [s * storage.itemsize for s in strides], writeable=False)
    return np.array(view, dtype=storage.dtype.newbyteorder("="))


def _unpickle(data, storages, source):
  try:
    return _RestrictedUnpickler(io.BytesIO(data), storages, source).load()
  except (UnsafeCheckpointError, ValueError):
    raise
  except Exception as error:  # a malformed stream: say which file, whatever the pickle step was
    raise ValueError(f"{source} is not a readable checkpoint: "
                     f"{type(error).__name__}: {error}") from error


def _read_torch_zip(path):
  """The object pickled in a torch zip archive, storages as NumPy arrays."""
  with zipfile.ZipFile(path) as archive:
    pickles = [name for name in archive.namelist()
               if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path} is a zip file but not a PyTorch checkpoint: expected one "
                       f"<prefix>/data.pkl record, found {pickles or 'none'}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
      byteorder = archive.read(f"{prefix}byteorder").decode().strip()
    storages = _ZipStorages(archive, prefix, byteorder)
    return _unpickle(archive.read(pickles[0]), storages, path)


def _attribute_dict(attributes, name, prefix):
  value = attributes.get(name, {})
  if not isinstance(value, dict):
    raise ValueError(f"module {prefix or '<root>'} has {name} of type {type(value).__name__}, "
                     "expected a dict")
  return value


def _module_state_dict(module, prefix, state_dict):
  """What ``module.state_dict()`` returns, from a stub's pickled attributes, into ``state_dict``."""
  attributes = module.pickled_state
  if not isinstance(attributes, dict):
    raise ValueError(f"module {prefix or '<root>'} ({module.official_class}) has pickled state of "
                     f"type {type(attributes).__name__}, expected the attribute dict of a "
                     "torch.nn.Module")
  parameters, buffers, modules = (_attribute_dict(attributes, name, prefix)
                                  for name in ("_parameters", "_buffers", "_modules"))
  non_persistent = attributes.get("_non_persistent_buffers_set") or set()
  named = [*parameters.items(), *((n, b) for n, b in buffers.items() if n not in non_persistent)]
  for name, array in named:
    if array is not None:
      if not isinstance(array, np.ndarray):
        raise ValueError(f"{prefix}{name} holds a {type(array).__name__}, expected a tensor")
      state_dict[prefix + name] = array
  for name, child in modules.items():
    if child is not None:
      if not isinstance(child, ModuleStub):
        raise ValueError(f"submodule {prefix}{name} is a {type(child).__name__}, expected a module")
      _module_state_dict(child, f"{prefix}{name}.", state_dict)
  return state_dict


def _is_state_dict(value):
  return isinstance(value, dict) and value and all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in value.items())


def _class_names(model):
  names = model.pickled_state.get("names") if isinstance(model, ModuleStub) else None
  if isinstance(names, dict):  # the official code keeps {index: name} or a list
    return [str(names[k]) for k in sorted(names)]
  return [str(n) for n in names] if isinstance(names, (list, tuple)) else None


def _unpack_checkpoint(content, path):
  """(state_dict, info) from what a torch file held: a training checkpoint dict, a pickled model
  or a plain state_dict."""
  info = {"kind": "state_dict", "entry": None, "epoch": None, "date": None, "class_names": None,
          "model_attributes": {}}
  if _is_state_dict(content):
    return dict(content), info
  model = content
  if isinstance(content, dict):
    # The official loader takes the EMA model when the checkpoint has a truthy one.
    info["entry"] = "ema" if content.get("ema") else "model"
    if info["entry"] not in content:
      raise ValueError(f"{path} holds a dict with keys {sorted(map(str, content))[:10]}: expected "
                       "a state_dict (names to tensors) or an official checkpoint ('model'/'ema')")
    model = content[info["entry"]]
    info.update(epoch=content.get("epoch"), date=content.get("date"))
    if _is_state_dict(model):
      return dict(model), info
  if not isinstance(model, ModuleStub):
    raise ValueError(f"{path}: expected a state_dict or a pickled model, found {type(model).__name__}")
  info.update(kind="official checkpoint", class_names=_class_names(model),
              model_attributes={name: model.pickled_state[name] for name in MODEL_ATTRIBUTES
                                if name in model.pickled_state})
  return _module_state_dict(model, "", {}), info


def read_state_dict(path):
  """(``{official key: numpy array}``, info) from a ``.pt`` (official checkpoint, pickled model or
  plain state_dict, zip format) or ``.safetensors`` file. Arrays keep the file's dtype.

  info: ``kind`` ("official checkpoint", "state_dict", "safetensors"), ``entry`` (which of
  ``ema``/``model`` was taken), ``epoch``, ``date``, ``class_names`` (when the file has them),
  ``model_attributes`` (the pickled model's ``MODEL_ATTRIBUTES`` it has; tensors as arrays),
  ``dtype`` (the float dtype(s) of the tensors). Raises ``UnsafeCheckpointError`` for a file that
  references anything else than tensors, containers and module classes.
  """
  with paths.local_file(path) as local:  # a file on cloud storage is read from a local copy
    return _read_local_state_dict(local)


def _read_local_state_dict(path):
  with path.open("rb") as file:
    magic = file.read(8)
  if path.suffix == ".safetensors":
    state_dict = safetensors.numpy.load_file(path)
    with safetensors.safe_open(path, framework="np") as file:
      metadata = file.metadata() or {}
    # Our exporter stores the class names as JSON in the metadata (safetensors keeps strings only).
    class_names = json.loads(metadata["class_names"]) if "class_names" in metadata else None
    info = {"kind": "safetensors", "entry": None, "epoch": None, "date": None,
            "class_names": class_names, "model_attributes": {}, "metadata": metadata}
  elif magic.startswith(b"PK\x03\x04"):
    state_dict, info = _unpack_checkpoint(_read_torch_zip(path), path)
  elif magic[:1] == pickle.PROTO:
    raise ValueError(f"{path} is in PyTorch's legacy (before 1.6) format, which is not supported: "
                     "re-save it with a trusted PyTorch >= 1.6 (torch.save writes the zip format)")
  else:
    raise ValueError(f"{path} is neither a PyTorch zip checkpoint nor a .safetensors file "
                     f"(it starts with {magic!r})")
  floats = sorted({str(a.dtype) for a in state_dict.values() if np.issubdtype(a.dtype, np.floating)
                   or a.dtype == ml_dtypes.bfloat16})
  info["dtype"] = ",".join(floats) or None
  return state_dict, info


@functools.lru_cache(maxsize=None)
def _learned_shapes(architecture, num_classes):
  shapes = expected_state_dict_shapes(architecture, num_classes)
  return {key: tuple(shape) for key, shape in shapes.items() if not key.endswith(_NUM_BATCHES_TRACKED)}


def detect_architecture(state_dict):
  """(architecture, num_classes) whose official state_dict has exactly these keys and shapes.

  A converted inference file (yolov9-X's main branch) has the layout of gelan-X and is detected
  as such. Raises ValueError naming the differing keys of the nearest architecture.
  """
  shapes = {key: tuple(np.shape(value)) for key, value in state_dict.items()
            if not key.endswith(_NUM_BATCHES_TRACKED)}
  nearest = None
  for architecture in models.ARCHITECTURES:
    class_shape = shapes.get(class_layer_key(architecture))
    if class_shape is None or len(class_shape) != 1:
      continue
    expected = _learned_shapes(architecture, class_shape[0])
    if expected == shapes:
      return architecture, class_shape[0]
    differing = len(expected.keys() ^ shapes.keys()) + sum(
        expected[k] != shapes[k] for k in expected.keys() & shapes.keys())
    nearest = min(nearest or (differing, architecture), (differing, architecture))
  if nearest is None:
    heads = sorted({class_layer_key(a) for a in models.ARCHITECTURES})
    raise ValueError(f"the state_dict has none of the class-layer keys of the YOLOv9/GELAN heads "
                     f"({', '.join(heads)}); its first keys are {list(state_dict)[:5]}")
  try:
    from_torch_state_dict(nearest[1], state_dict)
  except ValueError as error:  # names the missing, unexpected and mis-shaped keys
    raise ValueError(f"the state_dict fits none of the {len(models.ARCHITECTURES)} architectures; "
                     f"the nearest is {nearest[1]} ({nearest[0]} keys differ): {error}") from None
  raise AssertionError(f"{nearest[1]} accepts the state_dict that detection rejected")


def load_torch_checkpoint(path, config=None, num_classes=None):
  """(config_name, variables, info) from an official checkpoint, a state_dict ``.pt`` or a
  ``.safetensors`` file; nothing from the file is executed.

  ``config``: the architecture (e.g. "yolov9-c"); detected from the keys and shapes when None (a
  converted inference file is detected as its gelan counterpart). ``num_classes``: read from the
  file when None, otherwise it must match. ``variables``: float32 ``{"params", "batch_stats"}``.
  ``info``: see ``read_state_dict``, plus ``num_classes``.
  """
  state_dict, info = read_state_dict(path)
  try:
    if config is None:
      config, _ = detect_architecture(state_dict)
    variables = from_torch_state_dict(config, state_dict, num_classes)
  except ValueError as error:
    raise ValueError(f"{path}: {error}{_fitting_architecture_hint(state_dict, config)}") from None
  info["num_classes"] = int(np.shape(state_dict[class_layer_key(config)])[0])
  return config, variables, info


def _fitting_architecture_hint(state_dict, config):
  if config is None:
    return ""
  try:
    fitting, classes = detect_architecture(state_dict)
  except ValueError:
    return ""
  return f" (the file fits {fitting} with {classes} classes)"


def _write_int(write, value):
  if 0 <= value < 256:
    write(pickle.BININT1 + struct.pack("<B", value))
  elif 0 <= value < 65536:
    write(pickle.BININT2 + struct.pack("<H", value))
  elif -2**31 <= value < 2**31:
    write(pickle.BININT + struct.pack("<i", value))
  else:
    encoded = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    write(pickle.LONG1 + struct.pack("<B", len(encoded)) + encoded)


def _write_str(write, text):
  encoded = text.encode("utf-8")
  write(pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded)


def _write_global(write, module, name):
  write(pickle.GLOBAL + f"{module}\n{name}\n".encode())


def _write_int_tuple(write, values):
  write(pickle.MARK)
  for value in values:
    _write_int(write, int(value))
  write(pickle.TUPLE)


def _state_dict_pickle(arrays):
  """The protocol-2 pickle ``torch.save`` writes for an OrderedDict of contiguous tensors; tensor
  i's storage is the persistent id ('storage', torch.<X>Storage, 'i', 'cpu', numel)."""
  stream = io.BytesIO()
  write = stream.write
  write(pickle.PROTO + b"\x02")
  _write_global(write, "collections", "OrderedDict")
  write(pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.MARK)
  for index, (key, array) in enumerate(arrays.items()):
    _write_str(write, key)
    _write_global(write, "torch._utils", "_rebuild_tensor_v2")
    write(pickle.MARK + pickle.MARK)
    _write_str(write, "storage")
    _write_global(write, "torch", _STORAGE_OF_DTYPE[array.dtype])
    _write_str(write, str(index))
    _write_str(write, "cpu")
    _write_int(write, array.size)
    write(pickle.TUPLE + pickle.BINPERSID)
    _write_int(write, 0)  # storage offset
    _write_int_tuple(write, array.shape)
    _write_int_tuple(write, [int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)])
    write(pickle.NEWFALSE)  # requires_grad
    _write_global(write, "collections", "OrderedDict")  # backward hooks: none
    write(pickle.EMPTY_TUPLE + pickle.REDUCE + pickle.TUPLE + pickle.REDUCE)
  write(pickle.SETITEMS + pickle.STOP)
  return stream.getvalue()


def _write_aligned_record(archive, name, data, alignment=64):
  # PyTorch's writer pads each local header with an extra field (id "FB") so that every record's
  # data starts at a multiple of 64 bytes, which torch.load(mmap=True) relies on.
  record = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  data_start = archive.fp.tell() + 30 + len(name.encode()) + 4
  padding = -data_start % alignment
  record.extra = b"FB" + struct.pack("<H", padding) + b"\0" * padding
  archive.writestr(record, data, compress_type=zipfile.ZIP_STORED)


def save_torch_state_dict(path, state_dict):
  """Writes ``{key: array}`` as ``torch.save(OrderedDict)`` does, without PyTorch: the zip archive
  ``<stem>/data.pkl``, ``<stem>/data/<i>`` (raw little-endian storages), ``version``,
  ``byteorder`` and the other records of PyTorch's current format."""
  path = paths.user_path(path)
  if paths.is_remote(path):  # written locally (an atomic rename), then copied
    with paths.local_dir(path.parent) as folder:
      save_torch_state_dict(folder / path.name, state_dict)
    return
  arrays = collections.OrderedDict()
  for key, value in state_dict.items():
    array = np.asarray(value, order="C")
    if array.dtype not in _STORAGE_OF_DTYPE:
      raise ValueError(f"state_dict key {key} has dtype {array.dtype}, which has no torch storage "
                       f"(expected one of {sorted(str(d) for d in _STORAGE_OF_DTYPE)})")
    arrays[key] = array.astype(array.dtype.newbyteorder("<"), copy=False)
  data_pickle = _state_dict_pickle(arrays)
  records = [("data.pkl", data_pickle), (".format_version", b"1"), (".storage_alignment", b"64"),
             ("byteorder", b"little")]
  records += [(f"data/{index}", array.tobytes()) for index, array in enumerate(arrays.values())]
  # PyTorch draws a random id; a digest of the content keeps our files reproducible.
  digest = hashlib.sha256(data_pickle + b"".join(data for _, data in records[4:])).digest()
  records += [("version", b"3\n"), (".data/serialization_id",
                                    str(int.from_bytes(digest[:16], "little")).zfill(40).encode())]
  partial = path.with_name(path.name + ".partial")
  with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
    for name, data in records:
      _write_aligned_record(archive, f"{path.stem or 'archive'}/{name}", data)
  os.replace(partial, path)


def _cast_floats(state_dict, dtype):
  cast = {}
  for key, array in state_dict.items():
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating):
      with np.errstate(over="ignore"):  # overflow is reported below, naming the key
        converted = array.astype(dtype)
      if np.any(np.isfinite(array) & ~np.isfinite(converted)):
        raise ValueError(f"state_dict key {key} has values beyond the range of {np.dtype(dtype)} "
                         f"(largest magnitude {np.abs(array).max()})")
      array = converted
    cast[key] = array
  return cast


# The attributes the official training sets on the model before saving it, and that its scripts
# read: val.py checks nc against the data, detect.py and val.py name classes by names, the
# trainer's loss reads hyp, --image-weights reads class_weights; yaml and stride come with the
# model's construction.
MODEL_ATTRIBUTES = ("nc", "names", "hyp", "class_weights", "yaml", "stride")


def official_hyperparameters(config):
  """The official hyp dict (hyp.scratch-high.yaml's keys, FACTS.md §6.2) of a training config
  (``configs/common.base()`` or a run's): its optimizer, augmentation and loss values, and the
  official values of the keys that the YOLOv9 recipe does not use."""
  optimizer, augment, loss = config.optimizer, config.augment, config.loss
  return {"lr0": optimizer.lr0, "lrf": optimizer.lrf, "momentum": optimizer.momentum,
          "weight_decay": optimizer.weight_decay, "warmup_epochs": optimizer.warmup_epochs,
          "warmup_momentum": optimizer.warmup_momentum, "warmup_bias_lr": optimizer.warmup_bias_lr,
          "box": loss.box_gain, "cls": loss.cls_gain, "cls_pw": 1.0, "obj": 0.7, "obj_pw": 1.0,
          "dfl": loss.dfl_gain, "iou_t": 0.2, "anchor_t": 5.0, "fl_gamma": 0.0,
          "hsv_h": augment.hsv[0], "hsv_s": augment.hsv[1], "hsv_v": augment.hsv[2],
          "degrees": 0.0, "translate": augment.translate, "scale": augment.scale, "shear": 0.0,
          "perspective": 0.0, "flipud": 0.0, "fliplr": augment.fliplr, "mosaic": augment.mosaic,
          "mixup": augment.mixup, "copy_paste": 0.3}


# Run by write_official_checkpoint in a separate interpreter that has PyTorch and the official
# code: builds the official model from its YAML, loads our state_dict strictly, sets the
# attributes of MODEL_ATTRIBUTES as the official training does, and saves it as the official
# training code's final checkpoint (strip_optimizer's format, FACTS.md §10.1). class_weights are
# uniform (the official training derives them from its labels' frequencies, which an export does
# not have; only --image-weights sampling reads them).
_OFFICIAL_CHECKPOINT_SCRIPT = """
import datetime, json, sys
repository, model_yaml, state_dict_path, class_names, hyp, half, output_path = sys.argv[1:]
sys.path.insert(0, repository)
import torch
from models.yolo import DetectionModel
class_names = json.loads(class_names)
model = DetectionModel(model_yaml, ch=3, nc=len(class_names))
model.load_state_dict(torch.load(state_dict_path, weights_only=True), strict=True)
model.nc = len(class_names)
model.names = class_names
model.hyp = json.loads(hyp)
model.class_weights = torch.ones(len(class_names))
model = model.half() if half == "half" else model
for parameter in model.parameters():
  parameter.requires_grad = False
torch.save({"model": model, "ema": None, "updates": None, "optimizer": None, "best_fitness": None,
            "epoch": -1, "opt": None, "git": None, "date": datetime.datetime.now().isoformat()},
           output_path)
"""


def write_official_checkpoint(state_dict_path, architecture, output_path, official_repository,
                              class_names=None, hyp=None, python=sys.executable):
  """Turns a state_dict file into the official whole-model checkpoint that the official
  ``detect.py``/``val.py`` load, by running the official code: ``official_repository`` is a
  checkout of WongKinYiu/yolov9, ``python`` an interpreter with PyTorch and its requirements.
  ``class_names`` default to class0, class1, ...; ``hyp`` (``official_hyperparameters``) to
  none (an empty dict); the floats keep the state_dict's precision."""
  model_yaml = paths.user_path(official_repository) / "models" / "detect" / f"{architecture}.yaml"
  if not model_yaml.is_file():
    raise ValueError(f"{official_repository} is not a checkout of the official repository: it has "
                     f"no {model_yaml.relative_to(official_repository)}")
  state_dict, _ = read_state_dict(state_dict_path)
  num_classes = int(np.shape(state_dict[class_layer_key(architecture)])[0])
  class_names = list(class_names) if class_names else [f"class{i}" for i in range(num_classes)]
  if len(class_names) != num_classes:
    raise ValueError(f"{len(class_names)} class names for a model with {num_classes} classes")
  half = "half" if state_dict[class_layer_key(architecture)].dtype == np.float16 else "float"
  result = subprocess.run(
      [python, "-c", _OFFICIAL_CHECKPOINT_SCRIPT, str(official_repository), str(model_yaml),
       str(state_dict_path), json.dumps(class_names), json.dumps(dict(hyp or {})), half,
       str(output_path)],
      capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"the official code (run by {python}) could not write {output_path}:\n"
                       f"{result.stderr[-3000:]}")


def export_official_weights(architecture, variables, output_prefix, dtype="float32",
                            official_repository=None, class_names=None, hyp=None,
                            python=sys.executable):
  """Writes ``variables`` in the official layouts; returns the paths written.

  ``<output_prefix>.pt`` and ``.safetensors``: the state_dict of ``architecture`` itself (for
  yolov9-X with its auxiliary branch, what the official training code loads). For yolov9-X also
  ``<output_prefix>-converted.pt`` and ``.safetensors``: the main branch in the gelan-X layout, as
  the official reparameterisation writes it (FACTS.md §1.5). Floats are written as ``dtype``
  (float32 or float16); ``num_batches_tracked`` stays int64. With ``official_repository``, each
  layout also gets ``<prefix>-official.pt``, the whole-model checkpoint of the official scripts
  (see ``write_official_checkpoint``, which runs ``python`` with PyTorch), with ``class_names``
  and ``hyp``; the ``.safetensors`` files keep ``class_names`` in their metadata (JSON). Every
  file gets the mode of a new file (0644 under the usual umask).
  """
  # Imported here: evaluation modules import interop, so a module-level import could be circular.
  from yolov9_jax.evaluation import inference
  output_prefix = paths.user_path(output_prefix)
  with paths.local_dir(output_prefix.parent) as folder:  # remote outputs: written, then copied
    written = _export_official_weights(
        architecture, variables, folder / output_prefix.name, inference, dtype,
        official_repository, class_names, hyp, python)
  return [output_prefix.parent / path.name for path in written]


def _export_official_weights(architecture, variables, output_prefix, inference, dtype,
                             official_repository, class_names, hyp, python):
  state_dict = to_torch_state_dict(architecture, variables)
  try:
    from_torch_state_dict(architecture, state_dict)
  except ValueError as error:
    raise ValueError(f"the variables are not those of {architecture}: {error}") from None
  num_classes = np.shape(state_dict[class_layer_key(architecture)])[0]
  if class_names and len(class_names) != num_classes:
    raise ValueError(f"{len(class_names)} class names for a model with {num_classes} classes")
  layouts = [(architecture, variables, output_prefix)]
  converted, converted_variables = inference.prune_to_main_branch(architecture, variables)
  if converted != architecture:
    layouts.append((converted, converted_variables,
                    output_prefix.with_name(output_prefix.name + "-converted")))
  written = []
  for layout, layout_variables, prefix in layouts:
    state_dict = _cast_floats(to_torch_state_dict(layout, layout_variables), dtype)
    pt_path, safetensors_path = (prefix.with_name(prefix.name + suffix)
                                 for suffix in (".pt", ".safetensors"))
    prefix.parent.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(pt_path, state_dict)
    metadata = {"format": "pt", "architecture": layout}
    if class_names:
      metadata["class_names"] = json.dumps(list(class_names))
    safetensors.numpy.save_file(state_dict, safetensors_path, metadata=metadata)
    # safetensors writes 0600 files; the .pt beside it has the mode of any new file (umask).
    shutil.copymode(pt_path, safetensors_path)
    written += [pt_path, safetensors_path]
    if official_repository is not None:
      official_path = prefix.with_name(prefix.name + "-official.pt")
      write_official_checkpoint(pt_path, layout, official_path, official_repository, class_names,
                                hyp, python)
      written.append(official_path)
  return written
