"""Scaling on paper: time and cost to train a model on COCO for N epochs on accelerator slices,
from FLOPs per image and an MFU (measured on one device, or assumed), with the costs of the
gradient all-reduce and of synchronised BatchNorm added per step. Prints JSON lines, then a
markdown table. Every input is a flag; the defaults are the assumptions docs/benchmarks.md states.

    python benchmarks/scaling.py [--mfu 0.067,0.17] [--forward_gflops 239.88] [--epochs 500]
"""
import argparse
import json

# name: (chips, dense bf16 TFLOP/s per chip, on-demand $ per chip-hour, all-reduce GB/s per chip,
#        seconds per small all-reduce (latency), CPU cores per chip on the host)
SLICES = {
    "8x H100 (a3-highgpu-8g)": (8, 989.4, 11.06, 300.0, 20e-6, 13),
    "TPU v4-16 (8 chips)": (8, 275.0, 3.22, 100.0, 10e-6, 30),
    "TPU v5e-8": (8, 197.0, 1.20, 100.0, 10e-6, 14),
    "TPU v5p-16 (8 chips)": (8, 459.0, 4.20, 200.0, 10e-6, 26),
    "TPU v4-64 (32 chips)": (32, 275.0, 3.22, 100.0, 15e-6, 30),
    "TPU v5e-32": (32, 197.0, 1.20, 100.0, 15e-6, 14),
    "TPU v5p-64 (32 chips)": (32, 459.0, 4.20, 200.0, 15e-6, 26),
}


def plan(args, slice_name, mfu):
  chips, peak_tflops, dollars_per_chip_hour, allreduce_gbps, latency, cores_per_chip = SLICES[slice_name]
  train_flops_per_image = 3 * args.forward_gflops * 1e9  # forward + backward (2x forward)
  compute_seconds = args.batch_per_chip * train_flops_per_image / (peak_tflops * 1e12 * mfu)
  # Ring all-reduce of float32 gradients: each chip sends and receives 2 (n - 1) / n of them.
  allreduce_seconds = 2 * (chips - 1) / chips * args.parameters * 4 / (allreduce_gbps * 1e9)
  # Synchronised BatchNorm: one small all-reduce per BN layer forward and one backward, in series.
  batchnorm_seconds = 2 * args.batchnorm_layers * latency
  step_seconds = compute_seconds + allreduce_seconds + batchnorm_seconds
  images_per_second = chips * args.batch_per_chip / step_seconds
  hours = args.epochs * args.train_images / images_per_second / 3600
  pipeline_cores = images_per_second / chips / args.pipeline_images_per_core
  return {"slice": slice_name, "mfu": mfu, "global_batch": chips * args.batch_per_chip,
          "step_seconds": round(step_seconds, 4), "allreduce_share": round(allreduce_seconds / step_seconds, 3),
          "batchnorm_sync_share": round(batchnorm_seconds / step_seconds, 3),
          "images_per_second": round(images_per_second, 1), "hours": round(hours, 1),
          "dollars": round(hours * chips * dollars_per_chip_hour),
          "pipeline_cores_per_chip_needed": round(pipeline_cores, 1),
          "host_cores_per_chip": cores_per_chip}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mfu", default="0.067,0.17",
                      help="comma-separated: 0.067 = the official code on one H100 (92 images/s); "
                           "0.17 = this project's H100 target (230 images/s)")
  parser.add_argument("--forward_gflops", type=float, default=239.88, help="yolov9-c at 640, training graph")
  parser.add_argument("--parameters", type=float, default=51.18e6, help="yolov9-c, trainable")
  parser.add_argument("--batchnorm_layers", type=int, default=238, help="yolov9-c")
  parser.add_argument("--batch_per_chip", type=int, default=16, help="the official 8-GPU recipe: 128 / 8")
  parser.add_argument("--train_images", type=int, default=118_287, help="COCO train2017")
  parser.add_argument("--epochs", type=int, default=500)
  parser.add_argument("--pipeline_images_per_core", type=float, default=70.8,
                      help="measured, benchmarks/input_pipeline.py (mosaic path, one CPU core)")
  args = parser.parse_args()
  rows = [plan(args, name, float(mfu)) for mfu in args.mfu.split(",") for name in SLICES]
  for row in rows:
    print(json.dumps(row))
  print()
  print("| slice | MFU | global batch | step s | all-reduce | BN sync | images/s | hours | $ (on demand) | pipeline cores/chip needed (host has) |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['slice']} | {100 * r['mfu']:.1f} % | {r['global_batch']} | {r['step_seconds']:.3f} | "
          f"{100 * r['allreduce_share']:.1f} % | {100 * r['batchnorm_sync_share']:.1f} % | "
          f"{r['images_per_second']:,.0f} | {r['hours']:,.1f} | {r['dollars']:,} | "
          f"{r['pipeline_cores_per_chip_needed']} ({r['host_cores_per_chip']}) |")


if __name__ == "__main__":
  main()
