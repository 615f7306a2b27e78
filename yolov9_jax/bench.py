"""Speed, memory and FLOPs of training and inference, for one model / batch / image size / dtype.

    python -m yolov9_jax.bench --model yolov9-c --batch_size 64 --image_size 640 --dtype bfloat16
    python -m yolov9_jax.bench --model gelan-c --benchmarks inference,inference_nms --batch_size 1

Benchmarks (``--benchmarks``, comma-separated):

- ``train``: the jitted train step (train.py's, with the official recipe and loss, main + auxiliary
  branches) on one synthetic batch that stays on the devices: the device's training speed.
- ``train_pipeline``: the same compiled step fed by the real input pipeline (decode, mosaic,
  mixup, affine, HSV, flip, transfer) over a generated ``shapes`` set at the same image size.
- ``inference``: the folded main branch (auxiliary branch pruned, BatchNorm and RepConv folded)
  on a uint8 batch already on the devices, as the official speed numbers count it.
- ``inference_nms``: the same with NMS on the device (the evaluation's detector).

One process, all its devices (a GPU box or one TPU host). Each prints one JSON line as it finishes (``--profile_dir`` also traces its timed steps); a markdown table of all of them follows. Fields:
``compile_seconds`` (lower + compile, or a persistent-cache hit), ``seconds_per_step`` (mean over
``--steps`` timed steps after ``--warmup``), ``images_per_second``, ``memory_planned_bytes``
(XLA's buffer plan of the compiled program: arguments + outputs + temporaries - aliased),
``peak_memory_bytes`` (the device's own peak so far, where the backend reports it: GPU, TPU),
``forward_gflops_per_image`` (XLA's cost analysis of the model's forward pass: the training graph
for train, the folded graph for inference), ``official_gflops_per_image`` (the official thop count
from the state_dict manifests, scaled by pixels), ``step_gflops_per_image`` (XLA's count for the
whole compiled program, per image) and ``mfu``: model FLOPs (3 x forward for training, the
convention of the official 6.7 % MFU figure; forward for inference) per second over the device's
dense bfloat16 peak (``PEAK_TFLOPS``, or ``--peak_tflops``).
"""
from yolov9_jax import xla_flags

xla_flags.use_fast_cpu_convolutions()  # before JAX starts

import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from configs import coco  # noqa: E402
from yolov9_jax import models, paths, sharding  # noqa: E402
from yolov9_jax.data import pipeline, sources  # noqa: E402
from yolov9_jax.evaluation import evaluator  # noqa: E402
from yolov9_jax.training import program  # noqa: E402

BENCHMARKS = ("train", "train_pipeline", "inference", "inference_nms")

# Dense bfloat16 peak per device, TFLOP/s, from the vendors' data sheets, by a substring of
# ``device.device_kind``. H100 is the SXM part (the PCIe card: 756).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0, "TPU v6 lite": 918.0,
               "TPU v6e": 918.0}

# The official thop GFLOPs at 640 of the folded inference graphs (FACTS.md §4.3); the training
# graphs' counts are in the state_dict manifests (shared/spec/keys) and repeated here so that the
# package does not need the spec at run time.
OFFICIAL_GFLOPS_640 = {
    "train": {"yolov9-t": 16.53, "yolov9-s": 39.95, "yolov9-m": 133.02, "yolov9-c": 239.88,
              "yolov9-e": 245.53, "gelan-t": 10.08, "gelan-s": 27.04, "gelan-m": 77.35,
              "gelan-c": 103.51, "gelan-e": 192.50},
    "fused": {"gelan-t": 9.82, "gelan-s": 26.38, "gelan-m": 76.32, "gelan-c": 102.15,
              "gelan-e": 188.95},
}


def peak_tflops(device, override=None):
  """The device's dense bfloat16 peak (TFLOP/s), or None where unknown (CPUs)."""
  if override:
    return override
  return next((value for kind, value in PEAK_TFLOPS.items() if kind in device.device_kind), None)


def random_variables(model_name, num_classes, seed=0):
  """Training variables {"params", "batch_stats"} in ``model_name``'s layout, drawn in numpy (no
  compiled init: speed does not depend on the values)."""
  shapes = models.abstract_variables(model_name, num_classes)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32) + (
      1.0 if len(s.shape) == 1 else 0.0), shapes)


def forward_gflops(model_name, num_classes, image_size, fused):
  """XLA's FLOP count (cost analysis of the lowered program, no compilation) of one image's
  forward pass: the training graph (BatchNorm in training mode), or with ``fused`` the folded
  main branch of ``model_name``. XLA counts 2 per multiply-add and skips a convolution's taps
  that fall on padding, so it is about 1.5 % below the official thop count."""
  if fused:
    model_name = models.gelan_counterpart(model_name)
  model = models.build(model_name, num_classes=num_classes, fused=fused)
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  variables = models.abstract_variables(model_name, num_classes, fused)
  if fused:
    forward = lambda v, x: model.apply(v, x, train=False)
  else:
    forward = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  return jax.jit(forward).lower(variables, image).cost_analysis()["flops"] / 1e9


def official_gflops(model_name, image_size, fused):
  """The official count scaled by pixels to ``image_size`` (None where it is not known)."""
  table = OFFICIAL_GFLOPS_640["fused" if fused else "train"]
  name = models.gelan_counterpart(model_name) if fused else model_name
  return None if name not in table else table[name] * (image_size / 640) ** 2


def synthetic_batch(batch_size, image_size, max_boxes, boxes_per_image, num_classes, seed=0):
  """A training batch as the pipeline makes it: random pixels, ``boxes_per_image`` random boxes
  (x1, y1, x2, y2 pixels, 2-50 % of the side) per image in ``max_boxes`` slots."""
  rng = np.random.default_rng(seed)
  size = rng.uniform(0.02, 0.5, (batch_size, max_boxes, 2)) * image_size
  corner = rng.uniform(0, 1, (batch_size, max_boxes, 2)) * (image_size - size)
  valid = np.arange(max_boxes)[None, :] < min(boxes_per_image, max_boxes)
  return {"images": rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8),
          "boxes": np.concatenate([corner, corner + size], -1).astype(np.float32),
          "classes": rng.integers(0, num_classes, (batch_size, max_boxes)).astype(np.int32),
          "valid": np.broadcast_to(valid, (batch_size, max_boxes)).copy()}


def memory_fields(compiled):
  """XLA's planned bytes for ``compiled`` and the device's peak bytes so far (None on CPU)."""
  analysis = compiled.memory_analysis()
  planned = None if analysis is None else int(
      analysis.argument_size_in_bytes + analysis.output_size_in_bytes +
      analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
  stats = jax.local_devices()[0].memory_stats() or {}
  return {"memory_planned_bytes": planned, "peak_memory_bytes": stats.get("peak_bytes_in_use")}


def check_fits_in_host_memory(compiled, what):
  """On the CPU backend, device memory is host memory: refuse a program whose planned buffers
  exceed the memory available now, instead of letting the kernel kill the process mid-run."""
  planned = memory_fields(compiled)["memory_planned_bytes"]
  if jax.default_backend() != "cpu" or planned is None:
    return
  available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  if planned > available:
    raise SystemExit(f"{what} needs {planned / 2**30:.1f} GiB (XLA's plan) and this machine has "
                     f"{available / 2**30:.1f} GiB available: lower --batch_size or --image_size")


def compiled_gflops_per_image(compiled, batch_size):
  """XLA's FLOP count of the whole compiled program, per image (None where XLA gives none)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else None
  return None if not analysis or "flops" not in analysis else analysis["flops"] / 1e9 / batch_size


def timed_steps(run_step, steps, warmup, profile_dir=None):
  """Seconds per step of ``run_step()`` (which returns something to wait on), after ``warmup``.
  With ``profile_dir``, the timed steps are also traced there (``jax.profiler``: open it with
  TensorBoard's profile plugin or Perfetto)."""
  for _ in range(warmup):
    jax.block_until_ready(run_step())
  if profile_dir:
    jax.profiler.start_trace(str(profile_dir))
  start = time.perf_counter()
  out = None
  for _ in range(steps):
    out = run_step()
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / steps
  if profile_dir:
    jax.profiler.stop_trace()
  return seconds


def profile_dir(args, benchmark):
  return paths.user_path(args.profile_dir) / benchmark if args.profile_dir else None


class TrainBench:
  """The train step of train.py for ``args``, compiled once, with its state on the mesh."""

  def __init__(self, args, mesh):
    self.args, self.mesh = args, mesh
    config = coco.get_config(args.model)  # the COCO recipe, with the benchmark's settings
    config.model.update(dtype=args.dtype, remat=args.remat)
    config.train.update(batch_size=args.batch_size, shard_state=args.shard_state)
    config.augment.update(image_size=args.image_size, max_boxes=args.max_boxes, workers=args.workers)
    self.augment = config.augment
    training = program.build(config, random_variables(args.model, args.num_classes), mesh,
                             num_classes=args.num_classes,
                             steps_per_epoch=coco.TRAIN_IMAGES // args.batch_size)
    self.state = training.state_on(mesh)
    self.batch = pipeline.to_global_array(synthetic_batch(
        args.batch_size, args.image_size, args.max_boxes, args.boxes_per_image,
        args.num_classes), mesh)
    start = time.perf_counter()
    self.compiled = training.step.lower(self.state, self.batch).compile()
    self.compile_seconds = time.perf_counter() - start
    check_fits_in_host_memory(self.compiled, "the train step")
    self.step_gflops_per_image = compiled_gflops_per_image(self.compiled, args.batch_size)

  def step(self, batch):
    self.state, metrics = self.compiled(self.state, batch)
    return metrics["loss"]

  def shapes_batches(self):
    """Batches of the real pipeline over a generated shapes set at the benchmark's image size."""
    args = self.args
    num_images = max(4 * args.batch_size, 64)
    builder, _ = sources.shapes_builder(args.data_dir, num_images, 8,
                                        (args.image_size * 3 // 4, args.image_size))
    train = pipeline.TrainPipeline(builder.as_data_source(split="train"), self.augment,
                                   args.batch_size, total_epochs=1000)
    return pipeline.prefetch_to_device(train(0), self.mesh)


def bench_train(args, mesh, with_pipeline):
  """Yields the record for "train" and, with ``with_pipeline``, then "train_pipeline"."""
  bench = TrainBench(args, mesh)
  forward = forward_gflops(args.model, args.num_classes, args.image_size, fused=False)
  common = {"compile_seconds": bench.compile_seconds, "forward_gflops_per_image": forward,
            "official_gflops_per_image": official_gflops(args.model, args.image_size, False),
            "step_gflops_per_image": bench.step_gflops_per_image,
            "model_flops_per_image": 3 * forward * 1e9}
  seconds = timed_steps(lambda: bench.step(bench.batch), args.steps, args.warmup,
                        profile_dir(args, "train"))
  yield {"benchmark": "train", "seconds_per_step": seconds, **common, **memory_fields(bench.compiled)}
  if with_pipeline:
    batches = bench.shapes_batches()
    seconds = timed_steps(lambda: bench.step(next(batches)), args.steps, args.warmup,
                          profile_dir(args, "train_pipeline"))
    yield {"benchmark": "train_pipeline", "seconds_per_step": seconds, **common,
           **memory_fields(bench.compiled)}


def bench_inference(args, mesh, with_nms):
  """The record for "inference" (folded main branch) or "inference_nms" (and NMS)."""
  variables = random_variables(args.model, args.num_classes)
  detect, fused_variables, _ = evaluator.prepare_detector(
      args.model, variables, mesh, 0.001, 0.7, 300, multi_label=True, dtype=args.dtype)
  model = models.build(models.gelan_counterpart(args.model), num_classes=args.num_classes,
                       dtype=args.dtype, fused=True)
  if not with_nms:
    detect = jax.jit(lambda v, images: model.apply(v, images.astype(model.dtype) / 255,
                                                   train=False)["main"],
                     in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                     out_shardings=sharding.batch_sharding(mesh))
  images = pipeline.to_global_array(np.random.default_rng(0).integers(
      0, 256, (args.batch_size, args.image_size, args.image_size, 3), dtype=np.uint8), mesh)
  start = time.perf_counter()
  compiled = detect.lower(fused_variables, images).compile()
  compile_seconds = time.perf_counter() - start
  name = "inference_nms" if with_nms else "inference"
  check_fits_in_host_memory(compiled, name)
  seconds = timed_steps(lambda: compiled(fused_variables, images), args.steps, args.warmup,
                        profile_dir(args, name))
  forward = forward_gflops(args.model, args.num_classes, args.image_size, fused=True)
  return {"benchmark": name, "seconds_per_step": seconds,
          "compile_seconds": compile_seconds, "forward_gflops_per_image": forward,
          "official_gflops_per_image": official_gflops(args.model, args.image_size, True),
          "step_gflops_per_image": compiled_gflops_per_image(compiled, args.batch_size),
          "model_flops_per_image": forward * 1e9, **memory_fields(compiled)}


def finish(record, args, device):
  """Adds the settings, the machine and the derived rates to a benchmark's record."""
  images_per_second = args.batch_size / record["seconds_per_step"]
  peak = peak_tflops(device, args.peak_tflops)
  model_flops = record.pop("model_flops_per_image")
  out = {"benchmark": record.pop("benchmark"), "model": args.model, "batch_size": args.batch_size,
         "image_size": args.image_size, "dtype": args.dtype, "num_classes": args.num_classes,
         "shard_state": args.shard_state, "remat": args.remat,
         "images_per_second": images_per_second, **record,
         "mfu": None if peak is None else model_flops * images_per_second / (peak * 1e12 * jax.device_count()),
         "peak_tflops_per_device": peak, "backend": jax.default_backend(),
         "device_kind": device.device_kind, "num_devices": jax.device_count(),
         "jax_version": jax.__version__, "host": platform.processor() or platform.machine()}
  return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


MARKDOWN_COLUMNS = (("benchmark", "benchmark"), ("model", "model"), ("batch_size", "batch"),
                    ("image_size", "size"), ("dtype", "dtype"), ("device_kind", "device"),
                    ("images_per_second", "images/s"), ("seconds_per_step", "s/step"),
                    ("compile_seconds", "compile s"), ("forward_gflops_per_image", "fwd GFLOPs/img"),
                    ("mfu", "MFU"), ("memory_planned_bytes", "planned GiB"),
                    ("peak_memory_bytes", "peak GiB"))


def markdown_table(records):
  def cell(key, value):
    if value is None:
      return "-"
    if key.endswith("_bytes"):
      return f"{value / 2**30:.2f}"
    if key == "mfu":
      return f"{100 * value:.1f} %"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
  lines = ["| " + " | ".join(title for _, title in MARKDOWN_COLUMNS) + " |",
           "|" + "---|" * len(MARKDOWN_COLUMNS)]
  lines += ["| " + " | ".join(cell(key, r.get(key)) for key, _ in MARKDOWN_COLUMNS) + " |"
            for r in records]
  return "\n".join(lines)


def _flags():
  """This command's flags: absl, as every entry point (train/eval/detect/export/bench)."""
  flag_values = flags.FlagValues()
  define = dict(flag_values=flag_values)
  flags.DEFINE_enum("model", "yolov9-c", sorted(models.ARCHITECTURES), "architecture", **define)
  flags.DEFINE_string("benchmarks", ",".join(BENCHMARKS),
                      f"comma-separated, of {', '.join(BENCHMARKS)}", **define)
  flags.DEFINE_integer("batch_size", 64, "global, over all devices", **define)
  flags.DEFINE_integer("image_size", 640, "letterbox side, a multiple of 32", **define)
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "compute dtype (parameters and BatchNorm statistics stay float32)", **define)
  flags.DEFINE_integer("num_classes", 80, "classes of the model", **define)
  flags.DEFINE_integer("max_boxes", 300, "box slots per training image", **define)
  flags.DEFINE_integer("boxes_per_image", 8, "valid boxes per synthetic training image (COCO "
                       "averages 7.3)", **define)
  flags.DEFINE_integer("steps", 10, "timed steps", **define)
  flags.DEFINE_integer("warmup", 2, "untimed steps after compilation", **define)
  flags.DEFINE_boolean("shard_state", False, "FSDP, as train.shard_state", **define)
  flags.DEFINE_boolean("remat", False, "as model.remat: recompute each layer's insides in the "
                       "backward pass", **define)
  flags.DEFINE_integer("workers", pipeline.default_workers(), "input pipeline worker processes "
                       "(0: in this process)", **define)
  flags.DEFINE_string("data_dir", ".cache/datasets", "where train_pipeline generates its shapes "
                      "set (reused)", **define)
  flags.DEFINE_float("peak_tflops", None, "the device's peak for MFU where PEAK_TFLOPS does not "
                     "know it (CPUs)", **define)
  flags.DEFINE_string("profile_dir", "", "trace the timed steps with jax.profiler into "
                      "DIR/<benchmark>", **define)
  flags.DEFINE_string("compilation_cache", ".cache/jax", "persistent compilation cache directory "
                      "('' for none)", **define)
  flags.DEFINE_boolean("help", False, "show this help", **define)
  return flag_values


def _usage_error(message):
  print(f"python -m yolov9_jax.bench: {message} (--help lists the flags)", file=sys.stderr)
  sys.exit(2)


def parse_args(argv=None):
  """The settings from ``argv`` (without the program name; default: the command line) as an
  object with one attribute per flag; a bad setting exits with a message."""
  flag_values = _flags()
  try:
    extra = flag_values([sys.argv[0]] + list(sys.argv[1:] if argv is None else argv))[1:]
  except flags.Error as error:
    _usage_error(str(error))
  if extra:
    _usage_error(f"unexpected arguments {extra}")
  if flag_values.help:
    print(__doc__ + "\n" + flag_values.get_help())
    sys.exit(0)
  args = types.SimpleNamespace(**{name: flag_values[name].value for name in flag_values})
  unknown = set(args.benchmarks.split(",")) - set(BENCHMARKS)
  if unknown:
    _usage_error(f"unknown benchmarks {sorted(unknown)}; expected some of {list(BENCHMARKS)}")
  for name in ("batch_size", "image_size", "steps", "num_classes", "max_boxes"):
    if getattr(args, name) < 1:
      _usage_error(f"--{name} must be at least 1")
  try:
    models.check_image_size(args.image_size, "--image_size")
  except ValueError as error:
    _usage_error(str(error))
  if args.batch_size % jax.device_count():
    _usage_error(f"--batch_size {args.batch_size} does not split over {jax.device_count()} devices")
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.fspath(paths.absolute(args.compilation_cache)))
  mesh = sharding.make_mesh()
  device = jax.devices()[0]
  chosen = args.benchmarks.split(",")
  records = []

  def emit(record):
    records.append(finish(record, args, device))
    print(json.dumps(records[-1]), flush=True)

  # Inference first: the device's peak memory then grows from the smaller programs to the larger.
  for name in ("inference", "inference_nms"):
    if name in chosen:
      emit(bench_inference(args, mesh, with_nms=name == "inference_nms"))
  if "train" in chosen or "train_pipeline" in chosen:
    for record in bench_train(args, mesh, with_pipeline="train_pipeline" in chosen):
      if record["benchmark"] in chosen:
        emit(record)
  print()
  print(markdown_table(records))
  return records


if __name__ == "__main__":
  main()
