"""Evaluation throughput: the whole evaluation loop, the network alone, and network + NMS.

Sources are COCO-like JPEGs (640 px long side, as in input_pipeline.py). The weights are random:
the work does not depend on them, since NMS has static shapes (``max_det`` rounds over the capped
candidate list whatever the scores). Prints JSON:

- eval_images_per_second: ``evaluator.evaluate``'s loop (decode, letterbox, transfer, network, NMS,
  predictions back to original pixels as COCO results), compilation excluded;
- model_images_per_second: the fused main branch alone on a batch already on the device (uint8
  in, /255 on the device), as the official speed numbers count it;
- model_nms_images_per_second: network + NMS on the device, no input pipeline.

    python benchmarks/eval.py [--model gelan-t] [--image_size 320] [--batch_size 8] [--images 64]
"""
import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import jax
import numpy as np
from input_pipeline import _coco_like
from jax.sharding import NamedSharding, PartitionSpec

from yolov9_jax import bench, models
from yolov9_jax.data import coco_format, shapes
from yolov9_jax.evaluation import evaluator, inference


def _images_per_second(function, batch, batch_size, repeats):
  jax.block_until_ready(function(batch))  # compiles
  start = time.perf_counter()
  for _ in range(repeats):
    out = function(batch)
  jax.block_until_ready(out)
  return round(batch_size * repeats / (time.perf_counter() - start), 1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="gelan-t")
  parser.add_argument("--num_classes", type=int, default=80)
  parser.add_argument("--image_size", type=int, default=320)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=8, help="timed device batches")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args()

  root = pathlib.Path(tempfile.mkdtemp(prefix="yolov9_jax_eval_bench_"))
  annotations = _coco_like(shapes.generate(root / "raw", num_images=args.images, image_hw=(480, 640)),
                           root / "jpeg")
  builder, _ = coco_format.prepare(annotations, root / "jpeg", root / "tfds", "shapes_eval_bench",
                                   split="validation")
  source = builder.as_data_source(split="validation")
  # The random model predicts the shapes set's 3 classes' ids for every label it has.
  category_ids = [1 + label % 3 for label in range(args.num_classes)]
  variables = bench.random_variables(models.build(args.model, num_classes=args.num_classes))

  start = time.perf_counter()
  result = evaluator.evaluate(args.model, variables, source, category_ids,
                              image_size=args.image_size, batch_size=args.batch_size,
                              dtype=args.dtype, progress=False)
  total_seconds = time.perf_counter() - start

  mesh = evaluator.default_mesh()
  detect, fused_variables, _ = evaluator.prepare_detector(
      args.model, variables, mesh, 0.001, 0.7, 300, multi_label=True, dtype=args.dtype)
  model = models.build(inference.gelan_counterpart(args.model),
                       num_classes=args.num_classes, dtype=args.dtype, fused=True)
  network = jax.jit(lambda images: model.apply(
      fused_variables, images.astype(model.dtype) / 255, train=False)["main"])
  batch = jax.device_put(np.random.default_rng(0).integers(
      0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8),
      NamedSharding(mesh, PartitionSpec("data")))
  print(json.dumps({
      "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                  "devices": [str(d) for d in jax.devices()]},
      "model": args.model, "num_classes": args.num_classes, "image_size": args.image_size,
      "batch_size": args.batch_size, "dtype": args.dtype, "images": result.images,
      "eval_images_per_second": round(result.images_per_second, 1),
      "model_images_per_second": _images_per_second(network, batch, args.batch_size, args.repeats),
      "model_nms_images_per_second": _images_per_second(
          lambda b: detect(fused_variables, b), batch, args.batch_size, args.repeats),
      "eval_compile_seconds": round(result.compile_seconds, 1),
      "evaluate_total_seconds": round(total_seconds, 1),  # compilation and COCOeval included
      "detections_per_image": round(len(result.results) / max(result.images, 1), 1),
      "nms_candidates_dropped": result.candidates_dropped}))


if __name__ == "__main__":
  main()
