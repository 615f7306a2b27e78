"""Input-pipeline throughput: training batches at 640 with mosaic, by number of Grain worker
processes, and the evaluation transform.

Sources are COCO-like: `shapes` images re-saved as JPEG (quality 90) with a 640 px long side, as
nearly every COCO image is. Prints JSON. For each worker count N (1, 2, ... --max_workers):
"images_per_second" (wall clock, after each worker has delivered its first block; the median
of three windows of --batches batches),
"images_per_cpu_second" (images / CPU seconds of this process and its workers: images/s per busy
core, independent of other load) and "scaling_efficiency" = rate(N) / (N x rate(1)).

    python benchmarks/input_pipeline.py [--images 256] [--batches 32] [--batch_size 16] [--max_workers CORES]
"""
import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

import grain
import numpy as np
import psutil

from yolov9_jax.data import coco_format, eval_batches, pipeline, shapes


def _cpu_seconds():
  """CPU time of this process and its worker processes so far."""
  processes = [psutil.Process()] + psutil.Process().children(recursive=True)
  total = 0.0
  for process in processes:
    try:
      times = process.cpu_times()
      total += times.user + times.system
    except psutil.NoSuchProcess:
      pass
  return total


def _measure(batches, warmup, count, images_per_batch, repeats=3):
  """The median rate of ``repeats`` consecutive windows of ``count`` batches (this machine's
  load varies), and images per CPU second over all of them."""
  for _ in range(warmup):  # worker start-up, imports
    next(batches)
  cpu, walls = _cpu_seconds(), []
  for _ in range(repeats):
    wall = time.perf_counter()
    for _ in range(count):
      next(batches)
    walls.append(time.perf_counter() - wall)
  cpu = _cpu_seconds() - cpu
  images = count * images_per_batch
  return {"images": images * repeats, "images_per_second": round(images / float(np.median(walls)), 1),
          "images_per_cpu_second": round(images * repeats / cpu, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--batches", type=int, default=32, help="batches timed per measurement")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--max_workers", type=int, default=len(os.sched_getaffinity(0)))
  args = parser.parse_args()

  root = pathlib.Path(tempfile.mkdtemp(prefix="yolov9_jax_bench_"))
  annotations = shapes.as_jpegs(shapes.generate(root / "raw", num_images=args.images, image_hw=(480, 640)),
                                root / "jpeg")
  builder, _ = coco_format.prepare(annotations, root / "jpeg", root / "tfds", "shapes_bench")
  source = builder.as_data_source(split="train")

  def train_mosaic(workers, **overrides):
    config = pipeline.default_config()
    config.update(image_size=640, workers=workers, **overrides)
    train = pipeline.TrainPipeline(source, config, global_batch_size=args.batch_size)
    try:
      # Every worker's first block is start-up; the timed batches come after them.
      warmup = max(workers, 1) * config.batches_per_block
      return _measure(train(), warmup, args.batches, args.batch_size)
    finally:
      train.close()

  sweep = {workers: train_mosaic(workers) for workers in range(1, args.max_workers + 1)}
  single = sweep[1]["images_per_second"]
  for workers, record in sweep.items():
    record["scaling_efficiency"] = round(record["images_per_second"] / (workers * single), 3)
  results = {
      "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
      "versions": {"grain": grain.__version__ if hasattr(grain, "__version__") else "0.2.18"},
      "batch_size": args.batch_size, "image_size": 640,
      "batches_per_block": pipeline.default_config().batches_per_block,
      # The default: partners from the block's own images (one decode per image).
      "train_mosaic_by_workers": {str(w): r for w, r in sweep.items()},
      # Partners from anywhere in the dataset, as the official code (four or five decodes).
      "train_mosaic_official_partners_1_worker": train_mosaic(1, mosaic_partners_from_block=False),
      # The official --cache ram (each worker keeps the images it has decoded), warmed by the
      # first passes over the data; here the same 1 worker.
      "train_mosaic_ram_cache_1_worker": train_mosaic(1, cache_images=True),
  }

  def square_eval_batches():  # the square letterbox (the rectangles differ by shape only)
    plan = eval_batches.make_plan(np.zeros((len(source), 2)), args.batch_size, 640,
                                  rectangular=False)
    while True:
      yield from eval_batches.batches(source, plan)

  results["eval_letterbox"] = _measure(square_eval_batches(), 1, args.batches, args.batch_size)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
