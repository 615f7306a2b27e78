"""PyTorch checkpoint files: export -> import is exact, real PyTorch reads what we write, official
pickled checkpoints import without the official code, and nothing in a file is ever run."""
import collections
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import types
import zipfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.flatten_util import ravel_pytree
import pytest
import testweights
from conftest import REPO_ROOT
from flax import serialization, traverse_util

from yolov9_jax import interop, models
from yolov9_jax.evaluation import inference


@pytest.fixture(scope="module")
def yolov9_t_variables():
  """yolov9-t with 3 classes: deterministic float32 weights and non-trivial BatchNorm statistics."""
  shapes = interop.expected_state_dict_shapes("yolov9-t", 3)
  return interop.from_torch_state_dict("yolov9-t", testweights.state_dict(list(shapes.items()), seed=5))


def _float16_exact(variables):
  """The same weights rounded to values that float16 holds exactly."""
  return jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), variables)


def assert_same_variables(actual, expected):
  actual, expected = traverse_util.flatten_dict(actual), traverse_util.flatten_dict(expected)
  assert actual.keys() == expected.keys()
  for path, value in expected.items():
    assert actual[path].dtype == np.float32, path
    np.testing.assert_array_equal(actual[path], value, err_msg=str(path))


def test_export_then_import_is_bit_exact_in_both_layouts_and_formats(tmp_path, yolov9_t_variables):
  written = interop.export_official_weights("yolov9-t", yolov9_t_variables, tmp_path / "yolov9-t")
  assert [p.name for p in written] == ["yolov9-t.pt", "yolov9-t.safetensors",
                                       "yolov9-t-converted.pt", "yolov9-t-converted.safetensors"]
  _, main_branch = inference.prune_to_main_branch("yolov9-t", yolov9_t_variables)
  for path, architecture, expected in zip(
      written, ["yolov9-t", "yolov9-t", "gelan-t", "gelan-t"],
      [yolov9_t_variables, yolov9_t_variables, main_branch, main_branch]):
    config_name, variables, info = interop.load_torch_checkpoint(path)
    assert config_name == architecture, path.name  # detected from the keys and shapes alone
    assert info["num_classes"] == 3 and info["dtype"] == "float32"
    assert info["kind"] == ("safetensors" if path.suffix == ".safetensors" else "state_dict")
    assert_same_variables(variables, expected)


def test_float16_export_writes_half_tensors_that_import_exactly(tmp_path, yolov9_t_variables):
  variables = _float16_exact(yolov9_t_variables)
  written = interop.export_official_weights("yolov9-t", variables, tmp_path / "half", dtype="float16")
  state_dict, info = interop.read_state_dict(written[0])
  assert info["dtype"] == "float16"
  assert state_dict["model.0.bn.num_batches_tracked"].dtype == np.int64
  assert {a.dtype for k, a in state_dict.items() if "num_batches" not in k} == {np.dtype(np.float16)}
  for path in written[:2]:
    config_name, loaded, _ = interop.load_torch_checkpoint(path, config="yolov9-t")
    assert_same_variables(loaded, variables)


def test_float16_export_refuses_values_beyond_its_range(tmp_path, yolov9_t_variables):
  variables = jax.tree.map(np.copy, yolov9_t_variables)
  variables["batch_stats"]["model_0"]["bn"]["var"][3] = 1e6
  with pytest.raises(ValueError, match="model.0.bn.running_var has values beyond the range of float16"):
    interop.export_official_weights("yolov9-t", variables, tmp_path / "x", dtype="float16")


def test_export_of_variables_of_another_architecture_names_the_keys(tmp_path, yolov9_t_variables):
  with pytest.raises(ValueError, match=r"not those of gelan-t: .*model\.22\.cv3\.0\.2\.bias"):
    interop.export_official_weights("gelan-t", yolov9_t_variables, tmp_path / "x")


# -- what real PyTorch makes of our files --------------------------------------------------------

def _torch_module_of_manifest(torch, manifest):
  """A torch Module with exactly the official state_dict entries (names, shapes, dtypes, which are
  buffers) of a shared/spec/keys manifest."""
  root = torch.nn.Module()
  for entry in manifest["state_dict"]:
    *path, leaf = entry["key"].split(".")
    module = root
    for name in path:
      if name not in module._modules:
        module.add_module(name, torch.nn.Module())
      module = module._modules[name]
    tensor = torch.zeros(entry["shape"], dtype=getattr(torch, entry["dtype"]))
    if leaf in ("running_mean", "running_var", "num_batches_tracked"):
      module.register_buffer(leaf, tensor)
    else:
      module.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
  return root


def test_exported_files_load_strictly_into_torch_modules_of_the_official_layouts(tmp_path, spec_dir):
  torch = pytest.importorskip("torch")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  shapes = interop.expected_state_dict_shapes("yolov9-t", 80)  # the manifests' class count
  variables = _float16_exact(interop.from_torch_state_dict(
      "yolov9-t", testweights.state_dict(list(shapes.items()), seed=1)))
  written = interop.export_official_weights("yolov9-t", variables, tmp_path / "yolov9-t",
                                            dtype="float16")
  for (pt_path, safetensors_path), architecture in zip([written[:2], written[2:]],
                                                       ["yolov9-t", "gelan-t"]):
    manifest = json.loads((spec_dir / "keys" / f"{architecture}.json").read_text())
    ours = interop.read_state_dict(pt_path)[0]
    from_pt = torch.load(pt_path, weights_only=True)
    assert list(from_pt) == [e["key"] for e in manifest["state_dict"]]  # the official order
    for loaded in (from_pt, safetensors_torch.load_file(safetensors_path)):
      module = _torch_module_of_manifest(torch, manifest)
      module.load_state_dict(loaded, strict=True)  # every key, every shape
      for key, tensor in module.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), ours[key].astype(tensor.numpy().dtype), err_msg=key)


def test_written_archive_has_the_records_of_torch_save(tmp_path):
  torch = pytest.importorskip("torch")
  arrays = {"a.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
            "a.bias": np.array([1.5, -2], np.float16), "a.num_batches_tracked": np.zeros((), np.int64)}
  interop.save_torch_state_dict(tmp_path / "ours.pt", arrays)
  torch.save(collections.OrderedDict((k, torch.from_numpy(v)) for k, v in arrays.items()),
             tmp_path / "theirs.pt")
  with zipfile.ZipFile(tmp_path / "ours.pt") as ours, zipfile.ZipFile(tmp_path / "theirs.pt") as theirs:
    assert ours.namelist() == [n.replace("theirs/", "ours/") for n in theirs.namelist()]
    for name in theirs.namelist():
      if "/data/" in name or name.endswith(("version", "byteorder", "alignment")):
        assert ours.read(name.replace("theirs/", "ours/")) == theirs.read(name), name
    raw = (tmp_path / "ours.pt").read_bytes()
    for record in ours.infolist():  # storages start at 64-byte boundaries, as torch.load(mmap=True) needs
      name_length, extra_length = np.frombuffer(raw[record.header_offset + 26:][:4], "<u2")
      assert (record.header_offset + 30 + name_length + extra_length) % 64 == 0, record.filename
  loaded = torch.load(tmp_path / "ours.pt", weights_only=True, mmap=True)
  for key, value in arrays.items():
    assert loaded[key].dtype == torch.from_numpy(value).dtype
    np.testing.assert_array_equal(loaded[key].numpy(), value)


_STAND_IN_YOLO_PY = """
import json, pathlib, torch

class DetectionModel(torch.nn.Module):
  # Stands in for the official class in tests without the official code: the official state_dict
  # entries (from the keys file beside its YAML) and the attributes its constructor sets.
  def __init__(self, cfg, ch=3, nc=None):
    super().__init__()
    keys = json.loads(pathlib.Path(cfg).with_suffix(".keys.json").read_text())
    for key, shape in keys:
      *path, leaf = key.split(".")
      module = self
      for name in path:
        if name not in module._modules:
          module.add_module(name, torch.nn.Module())
        module = module._modules[name]
      if leaf == "num_batches_tracked":
        module.register_buffer(leaf, torch.zeros(shape, dtype=torch.int64))
      elif leaf in ("running_mean", "running_var"):
        module.register_buffer(leaf, torch.zeros(shape))
      else:
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
    self.yaml = {"nc": nc, "yaml_file": pathlib.Path(cfg).name}
    self.stride = torch.tensor([8.0, 16.0, 32.0])
"""


def test_whole_model_checkpoints_carry_what_the_official_scripts_read(tmp_path, yolov9_t_variables,
                                                                     spec_dir):
  """The official val.py reads the model's nc (an AttributeError without it), detect.py/val.py its
  names and stride, the trainer its hyp; the official training sets nc, names, hyp and
  class_weights before saving. The official code is not in CI: a stand-in ``models.yolo`` with
  the official keys builds the model (the opt-in test below runs the real one)."""
  torch = pytest.importorskip("torch")
  repository = tmp_path / "stand_in_repository"
  (repository / "models" / "detect").mkdir(parents=True)
  (repository / "models" / "__init__.py").write_text("")
  (repository / "models" / "yolo.py").write_text(_STAND_IN_YOLO_PY)
  for architecture in ("yolov9-t", "gelan-t"):
    (repository / "models" / "detect" / f"{architecture}.yaml").write_text(f"# {architecture}\n")
    (repository / "models" / "detect" / f"{architecture}.keys.json").write_text(json.dumps(
        list(interop.expected_state_dict_shapes(architecture, 3).items())))
  from configs import common
  hyp = interop.official_hyperparameters(common.base())
  facts = (spec_dir / "FACTS.md").read_text()
  table = facts[facts.index("### 6.2"):facts.index("### 6.3")]
  official = {}  # hyp.scratch-high.yaml as FACTS.md §6.2 lists it ("hsv_h / hsv_s / hsv_v" in one row)
  for keys, values in re.findall(r"^\| ([a-z0-9_ /]+) \| ([0-9.e /-]+) \|", table, re.MULTILINE):
    official.update(zip(keys.split(" / "), map(float, values.split(" / "))))
  assert len(official) == 29 and hyp == pytest.approx(official)
  written = interop.export_official_weights(
      "yolov9-t", yolov9_t_variables, tmp_path / "out" / "yolov9-t", official_repository=repository,
      class_names=["cat", "dog", "bird"], hyp=hyp)
  umask = os.umask(0)
  os.umask(umask)
  for path in written:  # the .safetensors files were 0600
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path.name
  main_branch = inference.prune_to_main_branch("yolov9-t", yolov9_t_variables)[1]
  for path, architecture, expected in ((written[2], "yolov9-t", yolov9_t_variables),
                                       (written[5], "gelan-t", main_branch)):
    assert path.name.endswith("-official.pt")
    _, info = interop.read_state_dict(path)  # the restricted reader: nothing in the file runs
    attributes = info["model_attributes"]
    assert set(attributes) == set(interop.MODEL_ATTRIBUTES)
    assert attributes["nc"] == 3 and attributes["names"] == ["cat", "dog", "bird"]
    assert attributes["hyp"] == hyp
    np.testing.assert_array_equal(attributes["class_weights"], np.ones(3, np.float32))
    assert info["epoch"] == -1 and info["entry"] == "model"
    config_name, loaded, _ = interop.load_torch_checkpoint(path)
    assert config_name == architecture
    assert_same_variables(loaded, expected)
  del torch


@pytest.mark.skipif(not os.environ.get("OFFICIAL_YOLOV9_REPO"), reason=(
    "needs OFFICIAL_YOLOV9_REPO, a checkout of the official repository, and OFFICIAL_YOLOV9_PYTHON, "
    "a Python with PyTorch and its requirements"))
def test_official_checkpoints_written_by_the_official_code_import_back_and_validate(tmp_path, yolov9_t_variables):
  variables = _float16_exact(yolov9_t_variables)
  written = interop.export_official_weights(
      "yolov9-t", variables, tmp_path / "yolov9-t", dtype="float16",
      official_repository=os.environ["OFFICIAL_YOLOV9_REPO"], class_names=["cat", "dog", "bird"],
      python=os.environ.get("OFFICIAL_YOLOV9_PYTHON", sys.executable))
  assert [p.name for p in written] == [
      "yolov9-t.pt", "yolov9-t.safetensors", "yolov9-t-official.pt", "yolov9-t-converted.pt",
      "yolov9-t-converted.safetensors", "yolov9-t-converted-official.pt"]
  main_branch = inference.prune_to_main_branch("yolov9-t", variables)[1]
  for path, architecture, expected in ((written[2], "yolov9-t", variables),
                                       (written[5], "gelan-t", main_branch)):
    config_name, loaded, info = interop.load_torch_checkpoint(path)
    assert config_name == architecture
    assert info["kind"] == "official checkpoint" and info["entry"] == "model" and info["epoch"] == -1
    assert info["class_names"] == ["cat", "dog", "bird"] and info["dtype"] == "float16"
    assert_same_variables(loaded, expected)
  # The official validation scripts load both files and run them end to end on a YOLO-format set.
  data_yaml = _write_yolo_format_set(tmp_path / "set", ["cat", "dog", "bird"])
  official_python = os.environ.get("OFFICIAL_YOLOV9_PYTHON", sys.executable)
  # The official scripts download Arial.ttf into their settings folder unless it is there; offline,
  # any TrueType font does (the plots are not checked), here matplotlib's own.
  settings = tmp_path / "settings"
  settings.mkdir()
  font = subprocess.run([official_python, "-c", "import matplotlib, os; print(os.path.join("
                         "matplotlib.get_data_path(), 'fonts', 'ttf', 'DejaVuSans.ttf'))"],
                        capture_output=True, text=True, check=True).stdout.strip()
  shutil.copy(font, settings / "Arial.ttf")
  # The official loader calls torch.load without weights_only, which PyTorch >= 2.6 turns on by
  # default and which refuses the official releases too; the files are the ones this test wrote.
  env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "YOLOV5_CONFIG_DIR": str(settings)}
  for path, script in ((written[2], "val_dual.py"), (written[5], "val.py")):
    result = subprocess.run(
        [official_python, script, "--data", str(data_yaml),
         "--weights", str(path), "--imgsz", "64", "--batch-size", "2", "--device", "cpu",
         "--workers", "0", "--project", str(tmp_path / "val"), "--name", path.stem],
        cwd=os.environ["OFFICIAL_YOLOV9_REPO"], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout[-3000:] + result.stderr[-3000:]
    # Its table: "all", then images, instances, P, R, mAP50, mAP50-95 for the 5 images, 7 boxes.
    row = re.search(r"\ball\s+5\s+7\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+", result.stdout + result.stderr)
    assert row, (script, result.stdout[-3000:] + result.stderr[-3000:])
  # Fine-tuning from the exported file: the official trainer takes every tensor of it.
  result = subprocess.run(
      [official_python, "train_dual.py", "--weights", str(written[2]),
       "--cfg", "models/detect/yolov9-t.yaml", "--hyp", "data/hyps/hyp.scratch-high.yaml",
       "--data", str(data_yaml), "--epochs", "1", "--batch-size", "2", "--imgsz", "64",
       "--device", "cpu", "--workers", "0", "--noplots", "--project", str(tmp_path / "train")],
      cwd=os.environ["OFFICIAL_YOLOV9_REPO"], capture_output=True, text=True, timeout=600, env=env)
  output = result.stdout + result.stderr
  assert result.returncode == 0 and "Traceback" not in output, output[-3000:]
  transferred = re.search(r"Transferred (\d+)/(\d+) items", output)
  assert transferred and transferred[1] == transferred[2], output[-3000:]


def _write_yolo_format_set(root, class_names):
  """Five small images of several aspect ratios with 7 boxes in the official YOLO layout
  (images/val, labels/val, a data YAML); returns the YAML's path."""
  import cv2
  rng = np.random.default_rng(0)
  (root / "images" / "val").mkdir(parents=True)
  (root / "labels" / "val").mkdir(parents=True)
  boxes_per_image = [1, 2, 1, 2, 1]
  for index, ((height, width), count) in enumerate(zip(
      [(48, 64), (64, 48), (64, 64), (40, 80), (72, 56)], boxes_per_image)):
    cv2.imwrite(str(root / "images" / "val" / f"{index}.jpg"),
                rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    lines = [f"{rng.integers(len(class_names))} {x:.4f} {y:.4f} 0.3000 0.2500"
             for x, y in rng.uniform(0.3, 0.7, (count, 2))]
    (root / "labels" / "val" / f"{index}.txt").write_text("\n".join(lines) + "\n")
  data_yaml = root / "data.yaml"
  data_yaml.write_text(json.dumps({"path": str(root), "train": "images/val", "val": "images/val",
                                   "nc": len(class_names), "names": class_names}))  # JSON is YAML
  return data_yaml


# -- official pickled checkpoints, written here as the official training code writes them --------

_STAND_INS = types.ModuleType("official_stand_ins")


def _official(path):
  """A stand-in for the official global ``path`` (a class, a function, a storage type): pickle finds
  it in the module official_stand_ins, and ``_official_pickle`` rewrites its GLOBAL to ``path``."""
  name = path.replace(".", "__")
  if not hasattr(_STAND_INS, name):
    setattr(_STAND_INS, name, type(name, (), {"__module__": _STAND_INS.__name__}))
  return getattr(_STAND_INS, name)


class _Storage:
  def __init__(self, array):
    self.array = array


class _Tensor:
  """Pickles as torch does: _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks),
  wrapped in _rebuild_parameter for nn.Parameter."""

  def __init__(self, storage, offset, shape, stride, parameter=False):
    self.rebuild = (storage, offset, tuple(shape), tuple(stride), False, collections.OrderedDict())
    self.parameter = parameter

  def __reduce__(self):
    tensor = (_official("torch._utils._rebuild_tensor_v2"), self.rebuild)
    if not self.parameter:
      return tensor
    return _official("torch._utils._rebuild_parameter"), (
        _Tensor(*self.rebuild[:4]), False, collections.OrderedDict())


def _official_pickle(obj, storages):
  """Protocol-2 pickle of ``obj`` with its stand-ins' GLOBALs renamed to the official paths and
  storages as persistent ids, exactly the opcodes torch.save emits for the official models."""
  class Pickler(pickle.Pickler):
    def persistent_id(self, value):
      if isinstance(value, _Storage):
        storages.append(value.array)
        dtype_name = {np.float16: "Half", np.float32: "Float", np.int64: "Long"}[value.array.dtype.type]
        return ("storage", _official(f"torch.{dtype_name}Storage"), str(len(storages) - 1), "cpu",
                value.array.size)
      return None

  sys.modules[_STAND_INS.__name__] = _STAND_INS
  try:
    stream = io.BytesIO()
    Pickler(stream, protocol=2).dump(obj)
  finally:
    del sys.modules[_STAND_INS.__name__]
  return re.sub(rb"cofficial_stand_ins\n(\w+)\n", lambda m: b"c%s\n%s\n" % tuple(
      m.group(1).replace(b"__", b".").rsplit(b".", 1)), stream.getvalue())


def _write_torch_zip(path, data_pickle, storages=()):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", data_pickle)
    archive.writestr("archive/byteorder", "little")
    for index, array in enumerate(storages):
      archive.writestr(f"archive/data/{index}", array.tobytes())
    archive.writestr("archive/version", "3\n")


def _module(official_class, parameters=(), buffers=(), modules=(), **attributes):
  module = _official(official_class)()
  module.__dict__.update(training=False, _parameters=collections.OrderedDict(parameters),
                         _buffers=collections.OrderedDict(buffers), _non_persistent_buffers_set=set(),
                         _modules=collections.OrderedDict(modules), **attributes)
  return module


def _official_model(architecture, state_dict, class_names):
  """The module tree the official code pickles for ``state_dict`` (float16, as saved): layers of the
  official classes, conv and BatchNorm leaves, parameter-free layers, plain tensor attributes and a
  non-persistent buffer. A BatchNorm's statistics share one storage (mean at offset 0, variance
  after it) and the first conv's weight is stored channels-last, so offsets and strides matter."""
  tree = {}
  for key, array in state_dict.items():
    *path, leaf = key.split(".")
    node = tree
    for name in path:
      node = node.setdefault(name, {})
    node[leaf] = array

  def tensor(array, parameter):
    array = array.astype(np.float16) if array.dtype == np.float32 else array
    strides = [int(np.prod(array.shape[i + 1:])) for i in range(array.ndim)]
    return _Tensor(_Storage(array.ravel()), 0, array.shape, strides, parameter)

  def build(name, node, parent_class):
    children = {k: v for k, v in node.items() if isinstance(v, dict)}
    leaves = {k: v for k, v in node.items() if not isinstance(v, dict)}
    if name == "conv" and parent_class == "models.common.Conv":
      official_class = "torch.nn.modules.conv.Conv2d"
    elif name == "bn":
      official_class = "torch.nn.modules.batchnorm.BatchNorm2d"
    elif {"conv", "bn"} <= children.keys():
      official_class = "models.common.Conv"
    elif name.startswith("dfl"):
      official_class = "models.common.DFL"
    else:
      official_class = "torch.nn.modules.container.Sequential"
    parameters = {k: tensor(v, True) for k, v in leaves.items() if k in ("weight", "bias")}
    buffers = {k: tensor(v, False) for k, v in leaves.items() if k not in ("weight", "bias")}
    if "running_mean" in leaves:
      statistics = np.concatenate([leaves["running_mean"], leaves["running_var"]]).astype(np.float16)
      shared = _Storage(statistics)
      size = leaves["running_mean"].size
      buffers["running_mean"] = _Tensor(shared, 0, (size,), (1,))
      buffers["running_var"] = _Tensor(shared, size, (size,), (1,))
    modules = {k: build(k, v, official_class) for k, v in children.items()}
    if official_class == "models.common.Conv":
      modules["act"] = _module("torch.nn.modules.activation.SiLU", inplace=True)
    return _module(official_class, parameters, buffers, modules, eps=0.001, momentum=0.03)

  rows = models.ARCHITECTURES[architecture]
  layers = {}
  for index, (source, layer_type, _) in enumerate(rows):
    is_head = index == len(rows) - 1
    official_class = {"Upsample": "torch.nn.modules.upsampling.Upsample"}.get(
        layer_type, f"models.{'yolo' if is_head else 'common'}.{layer_type}")
    modules = {k: build(k, v, official_class) for k, v in tree["model"].get(str(index), {}).items()}
    if layer_type == "Conv":
      modules["act"] = _module("torch.nn.modules.activation.SiLU", inplace=True)
    # The head keeps its anchors as a plain tensor attribute (empty until the first forward).
    extra = {"anchors": _Tensor(_Storage(np.zeros(0, np.float16)), 0, (0,), (1,))} if is_head else {}
    layers[str(index)] = _module(official_class, modules=modules, i=index, f=source,
                                 type=official_class, **extra)
  first_conv = layers["0"]._modules["conv"]._parameters["weight"]
  storage, _, shape, _ = first_conv.rebuild[:4]
  channels_last = storage.array.reshape(shape).transpose(0, 2, 3, 1).copy()
  _, cin, kh, kw = shape
  first_conv.rebuild = (_Storage(channels_last.ravel()), 0, shape, (kh * kw * cin, 1, kw * cin, cin),
                        *first_conv.rebuild[4:])
  sequential = _module("torch.nn.modules.container.Sequential", modules=layers)
  model = _module("models.yolo.DetectionModel", modules={"model": sequential},
                  buffers={"cached_grid": _Tensor(_Storage(np.ones(4, np.float16)), 0, (4,), (1,))},
                  names=list(class_names), nc=len(class_names), yaml={"nc": len(class_names)},
                  stride=_Tensor(_Storage(np.array([8, 16, 32], np.float32)), 0, (3,), (1,)))
  model._non_persistent_buffers_set = {"cached_grid"}  # official DDetect-style cache: not saved
  return model


@pytest.fixture(scope="module")
def gelan_t_official_weights():
  """(EMA, raw) gelan-t state_dicts with 4 classes, float16 as the official checkpoints hold them."""
  shapes = list(interop.expected_state_dict_shapes("gelan-t", 4).items())
  half = lambda sd: {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in sd.items()}
  return half(testweights.state_dict(shapes, seed=11)), half(testweights.state_dict(shapes, seed=12))


@pytest.mark.parametrize("with_ema", [True, False])
def test_official_pickled_checkpoint_imports_without_the_official_code(
    tmp_path, gelan_t_official_weights, with_ema):
  ema_weights, raw_weights = gelan_t_official_weights
  names = ["ring", "square", "star", "moon"]
  storages = []
  checkpoint = {
      "model": _official_model("gelan-t", raw_weights, names),
      "ema": _official_model("gelan-t", ema_weights, names) if with_ema else None,
      "updates": 1200, "optimizer": None, "epoch": 7, "git": None, "date": "2024-03-01T10:00:00",
      "best_fitness": np.array([0.25]),  # a NumPy array, as the official training loop keeps it
      "opt": {"weights": "gelan-t.pt", "hyp": {"lr0": 0.01}, "epochs": 500}}
  data_pickle = _official_pickle(checkpoint, storages)
  assert b"cmodels.yolo\nDetectionModel\n" in data_pickle
  assert b"ctorch\nHalfStorage\n" in data_pickle and b"c__builtin__\nset\n" in data_pickle
  _write_torch_zip(tmp_path / "gelan-t.pt", data_pickle, storages)

  config_name, variables, info = interop.load_torch_checkpoint(tmp_path / "gelan-t.pt")

  assert config_name == "gelan-t"
  attributes = info.pop("model_attributes")
  assert info == {"kind": "official checkpoint", "entry": "ema" if with_ema else "model",
                  "epoch": 7, "date": "2024-03-01T10:00:00", "class_names": names,
                  "dtype": "float16", "num_classes": 4}
  # The attributes the official scripts read from the model, tensors as arrays.
  stride = attributes.pop("stride")
  assert attributes == {"nc": 4, "names": names, "yaml": {"nc": 4}}
  np.testing.assert_array_equal(stride, np.array([8, 16, 32], np.float32))
  expected = ema_weights if with_ema else raw_weights
  assert_same_variables(variables, interop.from_torch_state_dict("gelan-t", expected))
  assert "models" not in sys.modules  # the official package was never imported


# -- files that must be refused ------------------------------------------------------------------

def _call(module, name, *args):
  """Pickle opcodes that call ``module.name(*args)`` when loaded: what a malicious checkpoint holds."""
  arguments = pickle.dumps(args, protocol=2)[2:-1]  # the tuple's opcodes, without PROTO and STOP
  return f"c{module}\n{name}\n".encode() + arguments + pickle.REDUCE


def _checkpoint_with(value_opcodes):
  """A protocol-2 pickle of {"epoch": 3, "opt": <value>}, the value given as opcodes."""
  items = b"".join(pickle.dumps(x, protocol=2)[2:-1] for x in ("epoch", 3, "opt"))
  return pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK + items + value_opcodes + \
      pickle.SETITEMS + pickle.STOP


_PAYLOADS = {
    "os.system": lambda marker: _call("os", "system", f"touch {marker}"),
    "posix.system": lambda marker: _call("posix", "system", f"touch {marker}"),
    "builtins.eval": lambda marker: _call("builtins", "eval", f"open({str(marker)!r}, 'w')"),
    "__builtin__.exec": lambda marker: _call("__builtin__", "exec", f"open({str(marker)!r}, 'w')"),
    "subprocess.Popen": lambda marker: _call("subprocess", "Popen", ["touch", str(marker)]),
    "builtins.getattr": lambda marker: _call("builtins", "getattr", "os", "system"),
}


def test_the_malicious_payloads_do_run_under_plain_pickle(tmp_path):
  """The payloads below are real: plain pickle.loads runs them (hence the restricted unpickler)."""
  marker = tmp_path / "marker"
  pickle.loads(_checkpoint_with(_PAYLOADS["os.system"](marker)))
  assert marker.exists()


@pytest.mark.parametrize("global_name", sorted(_PAYLOADS))
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, global_name):
  marker = tmp_path / "marker"
  _write_torch_zip(tmp_path / "evil.pt", _checkpoint_with(_PAYLOADS[global_name](marker)))
  with pytest.raises(interop.UnsafeCheckpointError, match=re.escape(f"the global {global_name},")):
    interop.load_torch_checkpoint(tmp_path / "evil.pt")
  assert not marker.exists()


def test_a_global_naming_an_arbitrary_module_is_refused_without_importing_it(tmp_path, monkeypatch):
  marker = tmp_path / "marker"
  (tmp_path / "side_effect_on_import.py").write_text(f"open({str(marker)!r}, 'w')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  _write_torch_zip(tmp_path / "evil.pt", b"\x80\x02cside_effect_on_import\nanything\n.")
  with pytest.raises(interop.UnsafeCheckpointError, match="side_effect_on_import.anything"):
    interop.read_state_dict(tmp_path / "evil.pt")
  assert not marker.exists() and "side_effect_on_import" not in sys.modules


def test_legacy_and_foreign_files_are_refused_before_unpickling(tmp_path):
  marker = tmp_path / "marker"
  (tmp_path / "legacy.pt").write_bytes(_checkpoint_with(_PAYLOADS["os.system"](marker)))
  with pytest.raises(ValueError, match="legacy"):
    interop.read_state_dict(tmp_path / "legacy.pt")
  (tmp_path / "notes.pt").write_text("not weights")
  with pytest.raises(ValueError, match="neither a PyTorch zip checkpoint nor"):
    interop.read_state_dict(tmp_path / "notes.pt")
  assert not marker.exists()


def test_a_tensor_reaching_beyond_its_storage_is_refused(tmp_path):
  storages = []
  too_long = _Tensor(_Storage(np.zeros(4, np.float16)), 2, (3,), (1,))
  _write_torch_zip(tmp_path / "bad.pt", _official_pickle({"w": too_long}, storages), storages)
  with pytest.raises(ValueError, match=r"reaches element 4 of a storage of 4"):
    interop.read_state_dict(tmp_path / "bad.pt")


@pytest.mark.parametrize("state", [{"array": np.zeros((2, 2))}, (None, {"array": np.zeros((2, 2))})],
                         ids=["dict state", "slot state"])
def test_a_build_opcode_cannot_swap_the_array_under_a_storage(tmp_path, state):
  """BUILD sets attributes on whatever object precedes it; aimed at a storage, it would let a file
  rebuild a tensor over memory of its choosing."""
  opcodes = lambda value: pickle.dumps(value, protocol=2)[2:-1]
  stream = (pickle.PROTO + b"\x02" + b"ctorch._utils\n_rebuild_tensor_v2\n" + pickle.MARK +
            pickle.MARK + opcodes("storage") + b"ctorch\nHalfStorage\n" + opcodes("0") + opcodes("cpu") +
            opcodes(4) + pickle.TUPLE + pickle.BINPERSID + opcodes(state) + pickle.BUILD +
            opcodes(0) + opcodes((4,)) + opcodes((1,)) + pickle.TUPLE + pickle.REDUCE + pickle.STOP)
  _write_torch_zip(tmp_path / "swap.pt", stream, [np.zeros(4, np.float16)])
  with pytest.raises(ValueError, match="not a readable checkpoint: AttributeError"):
    interop.read_state_dict(tmp_path / "swap.pt")


# -- checkpoints that do not fit ------------------------------------------------------------------

def test_checkpoint_of_another_architecture_or_class_count_names_the_keys(tmp_path, yolov9_t_variables):
  _, main_branch = inference.prune_to_main_branch("yolov9-t", yolov9_t_variables)
  interop.save_torch_state_dict(tmp_path / "gelan.pt", interop.to_torch_state_dict("gelan-t", main_branch))
  with pytest.raises(ValueError) as error:
    interop.load_torch_checkpoint(tmp_path / "gelan.pt", config="yolov9-t")
  assert "no key model.29.cv3.0.2.bias" in str(error.value)
  assert "(the file fits gelan-t with 3 classes)" in str(error.value)
  with pytest.raises(ValueError, match="the checkpoint has 3 classes, the model 4"):
    interop.load_torch_checkpoint(tmp_path / "gelan.pt", num_classes=4)


def test_state_dict_of_no_architecture_names_the_nearest_and_its_differing_keys(tmp_path, yolov9_t_variables):
  state_dict = interop.to_torch_state_dict("yolov9-t", yolov9_t_variables)
  state_dict["model.3.extra.weight"] = state_dict.pop("model.3.cv1.conv.weight")
  interop.save_torch_state_dict(tmp_path / "odd.pt", state_dict)
  with pytest.raises(ValueError, match=r"nearest is yolov9-t \(2 keys differ\).*model\.3\.cv1\.conv\.weight"
                                       r".*model\.3\.extra\.weight"):
    interop.load_torch_checkpoint(tmp_path / "odd.pt")
  interop.save_torch_state_dict(tmp_path / "other.pt", {"fc.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match="none of the class-layer keys"):
    interop.load_torch_checkpoint(tmp_path / "other.pt")


# -- the command --------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint_format", ["orbax", "msgpack"])
def test_export_command_writes_the_ema_weights_in_both_layouts(
    tmp_path, yolov9_t_variables, checkpoint_format):
  ema = _float16_exact(yolov9_t_variables)
  raw = jax.tree.map(np.negative, ema)
  if checkpoint_format == "orbax":  # as train.py saves it: flat vectors, config and class names
    flat = lambda tree: np.asarray(ravel_pytree(tree)[0])
    state = {"iteration": np.int32(10), "params": flat(raw["params"]),
             "batch_stats": flat(raw["batch_stats"]), "ema_params": flat(ema["params"]),
             "ema_batch_stats": flat(ema["batch_stats"])}
    checkpoint = tmp_path / "checkpoints" / "10"
    manager = ocp.CheckpointManager(checkpoint.parent)
    manager.save(10, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(
        {"config": {"model": {"name": "yolov9-t"}}, "class_names": ["a", "b", "c"]})))
    manager.wait_until_finished()
  else:  # the model variables, as flax.serialization writes them
    checkpoint = tmp_path / "ema.msgpack"
    checkpoint.write_bytes(serialization.to_bytes(ema))
  result = subprocess.run(
      [sys.executable, "export.py", f"--checkpoint={checkpoint}", "--architecture=yolov9-t",
       f"--output={tmp_path / 'out' / 'yolov9-t'}", "--dtype=float16"],
      cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert [line.rsplit("/", 1)[-1] for line in result.stdout.split()] == [
      "yolov9-t.pt", "yolov9-t.safetensors", "yolov9-t-converted.pt", "yolov9-t-converted.safetensors"]
  config_name, variables, info = interop.load_torch_checkpoint(tmp_path / "out" / "yolov9-t-converted.pt")
  assert config_name == "gelan-t" and info["dtype"] == "float16"
  assert_same_variables(variables, inference.prune_to_main_branch("yolov9-t", ema)[1])
