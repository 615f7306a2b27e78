"""Evaluation throughput: the whole evaluation loop, the network alone, and network + NMS.

Sources are COCO-like JPEGs (``shapes.as_jpegs``: 640 px long side, as in input_pipeline.py). The weights are random:
the work does not depend on them, since NMS has static shapes (``max_det`` rounds over the capped
candidate list whatever the scores). Prints JSON:

- eval_images_per_second: ``evaluator.evaluate``'s loop (decode, letterbox, transfer, network, NMS,
  predictions back to original pixels as COCO results), compilation excluded;
- model_images_per_second: the fused main branch alone on a batch already on the device (uint8
  in, /255 on the device), as the official speed numbers count it (``yolov9_jax.bench``'s
  "inference" benchmark, run here with the same settings);
- model_nms_images_per_second: network + NMS on the device, no input pipeline (its
  "inference_nms").

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

from yolov9_jax import bench, sharding
from yolov9_jax.data import coco_format, shapes
from yolov9_jax.evaluation import evaluator


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
  annotations = shapes.as_jpegs(shapes.generate(root / "raw", num_images=args.images, image_hw=(480, 640)),
                           root / "jpeg")
  builder, _ = coco_format.prepare(annotations, root / "jpeg", root / "tfds", "shapes_eval_bench",
                                   split="validation")
  source = builder.as_data_source(split="validation")
  # The random model predicts the shapes set's 3 classes' ids for every label it has.
  category_ids = [1 + label % 3 for label in range(args.num_classes)]
  variables = bench.random_variables(args.model, args.num_classes)

  start = time.perf_counter()
  result = evaluator.evaluate(args.model, variables, source, category_ids,
                              image_size=args.image_size, batch_size=args.batch_size,
                              dtype=args.dtype, progress=False)
  total_seconds = time.perf_counter() - start

  # The network and network + NMS alone: bench.py's "inference" and "inference_nms".
  bench_args = bench.parse_args([
      f"--model={args.model}", f"--num_classes={args.num_classes}", f"--dtype={args.dtype}",
      f"--image_size={args.image_size}", f"--batch_size={args.batch_size}",
      f"--steps={args.repeats}", "--compilation_cache="])
  mesh, device = sharding.make_mesh(), jax.devices()[0]
  network, network_nms = (
      bench.finish(bench.bench_inference(bench_args, mesh, with_nms), bench_args, device)
      for with_nms in (False, True))
  print(json.dumps({
      "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                  "devices": [str(d) for d in jax.devices()]},
      "model": args.model, "num_classes": args.num_classes, "image_size": args.image_size,
      "batch_size": args.batch_size, "dtype": args.dtype, "images": result.images,
      "eval_images_per_second": round(result.images_per_second, 1),
      "model_images_per_second": round(network["images_per_second"], 1),
      "model_nms_images_per_second": round(network_nms["images_per_second"], 1),
      "eval_compile_seconds": round(result.compile_seconds, 1),
      "evaluate_total_seconds": round(total_seconds, 1),  # compilation and COCOeval included
      "detections_per_image": round(len(result.predictions) / max(result.images, 1), 1),
      "nms_candidates_dropped": result.candidates_dropped}))


if __name__ == "__main__":
  main()
