"""Images/s of the deployable detector in each runtime on this machine's CPU: jitted JAX,
StableHLO (jax.export), onnxruntime, TFLite and the TF SavedModel, for each model and batch size.

The detector is export.py's (folded main branch + NMS on the graph, single-label, conf 0.25,
IoU 0.45, max_det 300) on random weights: NMS has static shapes, so the work does not depend on
them. One JSON object per (model, batch, runtime), then a summary line:

    python benchmarks/deploy.py --models=gelan-t,gelan-c --image_size=640 --batch_sizes=1,8

The official PyTorch eager model is the reference of issue 20; it needs a checkout of the official
repository (OFFICIAL_YOLOV9_REPO), which CI and this repository do not carry: without one the
summary says so.
"""
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from yolov9_jax import models
from yolov9_jax.deploy import formats, runtimes, spec as spec_lib
from yolov9_jax.evaluation import inference

_MODELS = flags.DEFINE_list("models", ["gelan-t", "gelan-c"], "architectures")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 640, "square input side, pixels")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "batch sizes")
_RUNTIMES = flags.DEFINE_list("runtimes", ["jax", "stablehlo", "onnx", "tflite", "saved_model"],
                              "which runtimes")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", 80, "classes of the random weights")
_SECONDS = flags.DEFINE_float("seconds", 5.0, "timed seconds per measurement (after warm-up)")


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


def main(argv):
  del argv
  rows = []
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
            model, fused = inference.inference_model(name, variables)
            spec = spec_lib.DetectorSpec(model.architecture, tuple(map(str, range(model.num_classes))),
                                         **{k: v for k, v in _settings(size, batch_size).items()
                                            if k != "class_names"})
            jitted = jax.jit(spec_lib.detector_function(model, fused, spec))
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
  best_at_1 = {}
  for row in rows:
    if row["batch_size"] == 1:
      key = row["model"]
      if row["images_per_second"] > best_at_1.get(key, {}).get("images_per_second", 0):
        best_at_1[key] = row
  print(json.dumps({"summary": {m: {"best_runtime_at_batch_1": r["runtime"],
                                    "images_per_second": r["images_per_second"]}
                                for m, r in best_at_1.items()},
                    "torch_reference": ("not run: needs OFFICIAL_YOLOV9_REPO (a checkout of the "
                                        "official repository)"),
                    "cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "jax": jax.__version__}))


if __name__ == "__main__":
  app.run(main)
