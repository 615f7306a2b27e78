"""Images/s of the deployable detector in each runtime on this machine's CPU: jitted JAX,
StableHLO (jax.export), onnxruntime, TFLite and the TF SavedModel, for each model and batch size.

The detector is export.py's (folded main branch + NMS on the graph, single-label, conf 0.25,
IoU 0.45, max_det 300) on random weights: NMS has static shapes, so the work does not depend on
them. One JSON object per (model, batch, runtime), then a summary line:

    PYTHONPATH=. python benchmarks/deploy.py --models=gelan-t,gelan-c --image_size=640 --batch_sizes=1,8

The reference is the official PyTorch eager model with the same weights (exported in the official
layout), fused as the official detect.py fuses it, timed with the official non_max_suppression
on the same settings: it runs with ``--official_repo`` (a checkout of WongKinYiu/yolov9; default
$OFFICIAL_YOLOV9_REPO) and ``--official_python`` (a Python with PyTorch and the official
requirements; default $OFFICIAL_YOLOV9_PYTHON, else this one). Without a checkout the summary says
that the reference was not run.
"""
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from yolov9_jax import xla_flags

xla_flags.use_fast_cpu_convolutions()  # before JAX starts, as detect.py does

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from yolov9_jax import interop, models  # noqa: E402
from yolov9_jax.deploy import formats, runtimes  # noqa: E402

_MODELS = flags.DEFINE_list("models", ["gelan-t", "gelan-c"], "architectures")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 640, "square input side, pixels")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "batch sizes")
_RUNTIMES = flags.DEFINE_list("runtimes", ["jax", "stablehlo", "onnx", "tflite", "saved_model"],
                              "which runtimes")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 80, "classes of the random weights")
_SECONDS = flags.DEFINE_float("seconds", 5.0, "timed seconds per measurement (after warm-up)")
_OFFICIAL_REPO = flags.DEFINE_string("official_repo", os.environ.get("OFFICIAL_YOLOV9_REPO", ""),
                                     "a checkout of the official repository (empty: no reference)")
_OFFICIAL_PYTHON = flags.DEFINE_string(
    "official_python", os.environ.get("OFFICIAL_YOLOV9_PYTHON", sys.executable),
    "a Python with PyTorch and the official requirements")

# Run by --official_python: the official model built from its YAML with our weights, fused, in
# eval mode, then model + official non_max_suppression timed as _images_per_second times ours.
_TORCH_REFERENCE = """
import json, sys, time
import numpy as np
repository, model_yaml, state_dict_path, image_size, batch_sizes, seconds, settings = sys.argv[1:]
sys.path.insert(0, repository)
import torch
from models.yolo import DetectionModel
from utils.general import non_max_suppression
settings = json.loads(settings)
state_dict = torch.load(state_dict_path, weights_only=True)
model = DetectionModel(model_yaml, ch=3, nc=settings["num_classes"])
model.load_state_dict(state_dict, strict=True)
model = model.fuse().eval()
rng = np.random.default_rng(0)
for batch_size in map(int, batch_sizes.split(",")):
  images = rng.integers(0, 256, (batch_size, int(image_size), int(image_size), 3), dtype=np.uint8)
  def run():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
      return non_max_suppression(model(x), settings["conf_threshold"], settings["iou_threshold"],
                                 max_det=settings["max_det"])
  for _ in range(2):
    run()
  calls, start = 0, time.perf_counter()
  while time.perf_counter() - start < float(seconds) or calls < 3:
    run()
    calls += 1
  print(json.dumps({"batch_size": batch_size, "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "images_per_second": calls * batch_size / (time.perf_counter() - start)}), flush=True)
"""


def _images_per_second(run, images):
  for _ in range(2):  # compilation, allocation
    run(images)
  calls, start = 0, time.perf_counter()
  while time.perf_counter() - start < _SECONDS.value or calls < 3:
    run(images)
    calls += 1
  return calls * len(images) / (time.perf_counter() - start)


def _settings(image_size, batch_size):
  return {"class_names": None, "image_size": image_size, "batch_size": batch_size,
          "conf_threshold": 0.25, "iou_threshold": 0.45, "max_det": 300, "multi_label": False,
          "nms": True}


def _torch_rows(name, variables, size, scratch):
  """The official eager model's rows for ``name`` (one per batch size), or [] without a checkout."""
  if not _OFFICIAL_REPO.value:
    return []
  model_yaml = os.path.join(_OFFICIAL_REPO.value, "models", "detect", f"{name}.yaml")
  if not os.path.isfile(model_yaml):
    raise app.UsageError(f"--official_repo={_OFFICIAL_REPO.value}: no models/detect/{name}.yaml")
  state_dict_path = interop.export_official_weights(name, variables,
                                                    os.path.join(scratch, f"{name}-official"))[0]
  settings = {**_settings(size, 1), "num_classes": _NUM_CLASSES.value}
  done = subprocess.run(
      [_OFFICIAL_PYTHON.value, "-c", _TORCH_REFERENCE, _OFFICIAL_REPO.value, model_yaml,
       str(state_dict_path), str(size), ",".join(_BATCH_SIZES.value), str(_SECONDS.value),
       json.dumps(settings)], capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(f"the official model (run by {_OFFICIAL_PYTHON.value}) failed:\n"
                       f"{done.stderr[-3000:]}")
  rows = []
  for line in done.stdout.splitlines():
    if line.startswith("{"):
      measured = json.loads(line)
      rows.append({"model": name, "image_size": size, "batch_size": measured["batch_size"],
                   "runtime": f"official pytorch eager (torch {measured['torch']}, "
                              f"{measured['threads']} threads)",
                   "images_per_second": round(measured["images_per_second"], 2)})
  return rows


def main(argv):
  del argv
  rows, reference_rows = [], []
  size = _IMAGE_SIZE.value
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as scratch:
    for name in _MODELS.value:
      variables = models.init_variables(name, _NUM_CLASSES.value, seed=0, image_size=64)
      for batch_size in map(int, _BATCH_SIZES.value):
        images = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
        for runtime in _RUNTIMES.value:
          start = time.perf_counter()
          if runtime == "jax":
            _, function = formats.build_detector(name, variables, _settings(size, batch_size))
            jitted = jax.jit(function)
            run = lambda x, f=jitted: jax.block_until_ready(f(x))  # noqa: E731
          else:
            _, written = formats.export_detector(runtime, name, variables,
                                                 _settings(size, batch_size),
                                                 os.path.join(scratch, f"{name}-{batch_size}"))
            run = runtimes.load(written[0])
          prepare_seconds = time.perf_counter() - start
          row = {"model": name, "image_size": size, "batch_size": batch_size, "runtime": runtime,
                 "images_per_second": round(_images_per_second(run, images), 2),
                 "export_and_load_seconds": round(prepare_seconds, 1)}
          rows.append(row)
          print(json.dumps(row), flush=True)
      for row in _torch_rows(name, variables, size, scratch):
        reference_rows.append(row)
        print(json.dumps(row), flush=True)
  summary = {}
  for name in _MODELS.value:
    ours = [row for row in rows if row["model"] == name and row["batch_size"] == 1]
    if not ours:
      continue
    best = max(ours, key=lambda row: row["images_per_second"])
    summary[name] = {"best_runtime_at_batch_1": best["runtime"],
                     "images_per_second": best["images_per_second"]}
    reference = [row for row in reference_rows if row["model"] == name and row["batch_size"] == 1]
    if reference:
      summary[name]["official_pytorch_eager_images_per_second"] = reference[0]["images_per_second"]
      summary[name]["speedup_over_official"] = round(
          best["images_per_second"] / reference[0]["images_per_second"], 2)
  print(json.dumps({"summary": summary,
                    "official_reference": ("run" if reference_rows else
                                           "not run: no --official_repo (a checkout of the "
                                           "official repository) / OFFICIAL_YOLOV9_REPO"),
                    "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "jax": jax.__version__}))

if __name__ == "__main__":
  app.run(main)
