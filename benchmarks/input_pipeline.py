"""Input-pipeline throughput: training batches at 640 with mosaic, and the eval transform.

Prints JSON. "images_per_cpu_second" divides images by the process's CPU time (all threads), so
it reads as images/s per core and does not depend on other load on the machine.

    python benchmarks/input_pipeline.py [--images 64] [--batches 6] [--batch_size 16] [--workers 2]
"""
import argparse
import json
import os
import pathlib
import platform
import tempfile
import time

from yolov9_jax.data import coco_format, pipeline, shapes


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
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--batches", type=int, default=6)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--workers", type=int, default=2)
  args = parser.parse_args()

  root = pathlib.Path(tempfile.mkdtemp(prefix="yolov9_jax_bench_"))
  annotations = shapes.generate(root / "raw", num_images=args.images, image_hw=(480, 640))
  builder, _ = coco_format.prepare(annotations, root / "raw" / "images", root / "tfds", "shapes_bench")
  source = builder.as_data_source(split="train")

  config = pipeline.default_config()
  config.update(image_size=640, workers=args.workers, prefetch_batches=1)
  train = pipeline.TrainPipeline(source, config, global_batch_size=args.batch_size)
  results = {
      "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
      "workers": args.workers, "batch_size": args.batch_size, "image_size": 640,
      "train_mosaic": _measure(lambda: (train.batch(s) for s in range(10**9)), args.batches,
                               args.batch_size),
  }

  def eval_batches():
    while True:
      yield from pipeline.eval_batches(source, args.batch_size, 640, process_index=0, process_count=1)

  results["eval_letterbox"] = _measure(eval_batches, args.batches, args.batch_size)

  # The official --cache ram: decoded, resized images stay in memory (warmed over a full epoch).
  config.cache_images = True
  cached = pipeline.TrainPipeline(source, config, global_batch_size=args.batch_size)
  for index in range(len(source)):
    cached._load(index)
  results["train_mosaic_ram_cache"] = _measure(
      lambda: (cached.batch(s) for s in range(10**9)), args.batches, args.batch_size)
  print(json.dumps(results))


if __name__ == "__main__":
  main()
