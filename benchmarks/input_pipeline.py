"""Input-pipeline throughput: training batches at 640 with mosaic, and the eval transform.

Sources are COCO-like: `shapes` images re-saved as JPEG (quality 90) with a 640 px long side, as
nearly every COCO image is. Prints JSON. "images_per_cpu_second" divides images by the process's
CPU time (all threads), so it reads as images/s per core and does not depend on other load on the
machine.

    python benchmarks/input_pipeline.py [--images 128] [--batches 8] [--batch_size 16] [--workers 2]
"""
import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np

from yolov9_jax.data import coco_format, eval_batches, pipeline, shapes


def _measure(make_batches, count, images_per_batch):
  batches = make_batches()
  next(batches)  # warm-up: traces the TF graphs
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(count):
    next(batches)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  images = count * images_per_batch
  return {"images": images, "images_per_second": round(images / wall, 1),
          "images_per_cpu_second": round(images / cpu, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=128)
  parser.add_argument("--batches", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--workers", type=int, default=2)
  # Below the number of images, so that each epoch's images are decoded again as in a real run.
  parser.add_argument("--window", type=int, default=32, help="mosaic_partner_window")
  args = parser.parse_args()

  root = pathlib.Path(tempfile.mkdtemp(prefix="yolov9_jax_bench_"))
  annotations = shapes.as_jpegs(shapes.generate(root / "raw", num_images=args.images, image_hw=(480, 640)),
                           root / "jpeg")
  builder, _ = coco_format.prepare(annotations, root / "jpeg", root / "tfds", "shapes_bench")
  source = builder.as_data_source(split="train")

  def train_mosaic(**overrides):
    config = pipeline.default_config()
    config.update(image_size=640, workers=args.workers, prefetch_batches=1,
                  mosaic_partner_window=args.window)
    config.update(overrides)
    train = pipeline.TrainPipeline(source, config, global_batch_size=args.batch_size)
    if config.cache_images:  # warmed over a full epoch
      for index in range(len(source)):
        train._load(index)
    return _measure(lambda: (train.batch(s) for s in range(10**9)), args.batches, args.batch_size)

  results = {
      "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
      "workers": args.workers, "batch_size": args.batch_size, "image_size": 640,
      # The default: partners from the decoded window (about one decode per image).
      "train_mosaic": train_mosaic(),
      # Partners from anywhere in the dataset, as the official code (four or five decodes).
      "train_mosaic_official_partners": train_mosaic(mosaic_partner_window=0),
      # The official --cache ram: every decoded image stays in memory.
      "train_mosaic_ram_cache": train_mosaic(cache_images=True),
  }

  def square_eval_batches():  # the square letterbox (the rectangles differ by shape only)
    plan = eval_batches.make_plan(np.zeros((len(source), 2)), args.batch_size, 640,
                                  rectangular=False)
    while True:
      yield from eval_batches.batches(source, plan)

  results["eval_letterbox"] = _measure(square_eval_batches, args.batches, args.batch_size)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
