"""Per-chip memory and cost of the real train step on a TPU slice, from the TPU compiler, on any
machine with the ``libtpu`` package (no TPU needed):

    pip install --no-deps --target .cache/libtpu-0.0.42.1 libtpu==0.0.42.1
    JAX_PLATFORMS=cpu PYTHONPATH=.cache/libtpu-0.0.42.1 python -m yolov9_jax.tpu_plan \\
        --topology=v5p:2x2x1 --model=yolov9-c --batch_size=64 --image_size=640 --dtype=bfloat16 \\
        [--shard_state] [--max_boxes=100]

libtpu stays out of the project's environment: where it is importable, JAX loads it at start-up
even on a CPU machine, and that changed the CPU training numbers.

``jax.experimental.topologies`` describes the slice (``v5e:2x2``, ``v5p:2x2x1``, ``v6e:2x2``, and
multi-host ones such as ``v5e:4x4`` or ``v5p:4x4x4``); the step is train.py's, with its shardings
(replicated or ``--shard_state``), traced on abstract arguments placed on the slice's devices and
compiled by XLA:TPU. Prints one JSON line: XLA's per-chip buffer plan (arguments, outputs,
temporaries, aliased; ``planned_bytes_per_chip`` = arguments + outputs + temporaries - aliased),
the compiled program's FLOPs and bytes accessed per chip per step (XLA's cost analysis, a hint:
it is a static count), and the compile time. Compiling yolov9-c at 640 takes minutes.

``--program=detect`` compiles the evaluator's detector instead (eval.py's folded main branch with
NMS, batch split over the chips). ``--largest_batch`` searches the largest images per chip (a
multiple of ``--batch_step``) whose plan fits the chip's HBM, from ``--batch_size`` per chip:
a JSON line per compile, then a summary line; a straight plan takes four compiles. Near the
limit each compile takes minutes (yolov9-c: 15-25), so ``--upper_bound`` bounds it from above
in minutes: the smallest batch XLA:TPU refuses for HBM, as a refusal comes before scheduling
(27-181 s at 640 here) and a probe still compiling after ``--probe_seconds`` is taken to have
passed.
"""
import json
import os
import re
import subprocess
import sys
import time

# Compiling only, never touching a TPU: several such processes may load libtpu at once (it would
# otherwise take /tmp/libtpu_lockfile and refuse a second process).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from configs import coco  # noqa: E402
from yolov9_jax import models, sharding  # noqa: E402
from yolov9_jax.evaluation import evaluator  # noqa: E402
from yolov9_jax.training import program  # noqa: E402

# HBM per device that XLA:TPU (libtpu 0.0.42.1) says a program may use, GiB, read from its
# refusals ("exceeds available HBM (15.75G)"); below the data sheets' 16 (v5e), 32 (v6e) and
# 95 GB (v5p) by what the runtime keeps. v4 topologies here have a device per TensorCore (16 GiB).
USABLE_HBM_GIB = {"v4": 15.25, "v5e": 15.75, "v5p": 95.74, "v6e": 31.25}


def abstract_on(tree, shardings):
  """ShapeDtypeStructs of ``tree``'s leaves, placed by ``shardings`` (nothing is allocated)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.result_type(x), sharding=s),
                      tree, shardings)


def compile_train_step(topology_name, model_name, batch_size, image_size, dtype="bfloat16",
                       shard_state=False, max_boxes=100, num_classes=80, remat=False):
  """(compiled train step for the slice, compile seconds, number of chips): the COCO recipe's
  program (configs/coco.py) with these settings."""
  topology = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
  mesh = sharding.make_mesh(topology.devices)
  config = coco.get_config(model_name)
  config.model.update(dtype=dtype, remat=remat)
  config.train.update(batch_size=batch_size, shard_state=shard_state)
  shapes = models.abstract_variables(model_name, num_classes)
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  training = program.build(config, variables, mesh, num_classes=num_classes,
                           steps_per_epoch=coco.TRAIN_IMAGES // batch_size)
  state = training.host_state
  abstract_state = abstract_on(state, sharding.state_shardings(state, mesh, training.split))
  batch_sharding = sharding.batch_sharding(mesh)
  abstract_batch = {
      "images": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8,
                                     sharding=batch_sharding),
      "boxes": jax.ShapeDtypeStruct((batch_size, max_boxes, 4), jnp.float32, sharding=batch_sharding),
      "classes": jax.ShapeDtypeStruct((batch_size, max_boxes), jnp.int32, sharding=batch_sharding),
      "valid": jax.ShapeDtypeStruct((batch_size, max_boxes), jnp.bool_, sharding=batch_sharding)}
  start = time.perf_counter()
  compiled = training.step.trace(abstract_state, abstract_batch).lower(
      lowering_platforms=("tpu",)).compile()
  return compiled, time.perf_counter() - start, mesh.size


def compile_detector(topology_name, model_name, batch_size, image_size, dtype="bfloat16",
                     num_classes=80):
  """(compiled evaluator's detector for the slice, compile seconds, number of chips): eval.py's
  jitted folded main branch with NMS on the device (configs/common.py's eval protocol: confidence
  0.001, IoU 0.7, 300 detections, multi-label), the batch split over the chips and the fused
  weights replicated, as in evaluation."""
  topology = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
  mesh = sharding.make_mesh(topology.devices)
  eval_config = coco.get_config(model_name).eval
  fused_architecture = models.gelan_counterpart(model_name)
  detect = evaluator.detector(fused_architecture, num_classes, mesh, eval_config.conf_threshold,
                              eval_config.iou_threshold, eval_config.max_det, True, dtype)
  fused_shapes = models.abstract_variables(fused_architecture, num_classes, fused=True)
  abstract_variables = abstract_on(
      fused_shapes, jax.tree.map(lambda _: sharding.replicated(mesh), fused_shapes))
  abstract_images = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.uint8,
                                         sharding=sharding.batch_sharding(mesh))
  start = time.perf_counter()
  compiled = detect.trace(abstract_variables, abstract_images).lower(
      lowering_platforms=("tpu",)).compile()
  return compiled, time.perf_counter() - start, mesh.size


# XLA:TPU refuses to compile a program that does not fit a device's HBM, naming what it needed,
# in one of two messages (libtpu 0.0.42.1): early, from the temporaries alone, "RESOURCE_EXHAUSTED:
# Ran out of memory on HBM, the total memory required for HLO temporaries (24.35G) exceeds
# available HBM (15.75G)."; late, after scheduling a batch near the limit, "Ran out of memory in
# memory space hbm. Used 15.75G of 15.75G hbm. Exceeded hbm capacity by 7.95M.".
_TEMPORARIES_EXCEED_HBM = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT])\) exceeds "
                                     r"available HBM")
_EXCEEDED_HBM_CAPACITY = re.compile(r"of ([0-9.]+)([KMGT]) hbm\. Exceeded hbm capacity by "
                                    r"([0-9.]+)([KMGT])")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def exceeded_hbm_bytes(error):
  """The bytes per chip XLA:TPU said a program needs when it refused it for HBM (infinite where
  the refusal names no size); None where ``error`` is not such a refusal."""
  text = str(error)
  if ("RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text) or (
      "hbm" not in text.lower()):
    return None

  def size(number, unit):
    return float(number) * _UNITS[unit]

  if match := _TEMPORARIES_EXCEED_HBM.search(text):
    return size(*match.groups())
  if match := _EXCEEDED_HBM_CAPACITY.search(text):
    return size(*match.groups()[:2]) + size(*match.groups()[2:])
  return float("inf")


def largest_fitting_batch(planned_bytes, capacity_bytes, step=8, first=16, most=1024,
                          max_compiles=12):
  """(largest images per chip, a multiple of ``step``, whose plan fits ``capacity_bytes``;
  {images per chip: planned bytes} of every compile), with ``planned_bytes(images_per_chip)``
  one compile each. The plan grows almost linearly with the batch (the state is fixed, the
  activations grow per image), so each guess is where a line through measured plans crosses the
  capacity, clamped inside the bracket: on a straight plan, two compiles find the line, one at
  the predicted batch and one a step above it close the bracket. Stops at ``most`` or after
  ``max_compiles``."""
  measured = {}
  fitting, failing = 0, None  # 0 images always fit; failing: the smallest known not to fit

  def guess():
    # The line through the two batches planned nearest the capacity; with one batch, the line
    # through it and 0 bytes at 0 images, whose crossing lies below the true one (the state's
    # bytes do not grow with the batch), so the next compile still fits.
    near = sorted(sorted(measured, key=lambda n: abs(measured[n] - capacity_bytes))[:2])
    (n0, b0), (n1, b1) = ((0, 0.0), (near[0], measured[near[0]])) if len(near) == 1 else (
        (near[0], measured[near[0]]), (near[1], measured[near[1]]))
    slope = (b1 - b0) / (n1 - n0) if np.isfinite(b1 - b0) else 0.0
    if slope > 0:
      candidate = int((n0 + (capacity_bytes - b0) / slope) // step * step)
    else:  # no usable line (a refusal without a size): bisect the bracket
      candidate = (fitting + (failing if failing is not None else 2 * fitting)) // 2 // step * step
    upper = failing - step if failing is not None else most
    return min(max(candidate, fitting + step), upper)

  images = max(step, first // step * step)
  while len(measured) < max_compiles:
    measured[images] = planned_bytes(images)
    if measured[images] <= capacity_bytes:
      fitting = max(fitting, images)
    else:
      failing = images if failing is None else min(failing, images)
    if (failing is not None and failing - fitting <= step) or fitting >= most:
      break
    images = guess()
    if images in measured:
      break
  return fitting, dict(sorted(measured.items()))


def smallest_refused_batch(refused, step=8, first=16, most=1024, max_probes=16):
  """(smallest images per chip, a multiple of ``step``, that ``refused(images_per_chip)`` says
  does not fit, or None up to ``most``; {images per chip: refused} of every probe). Doubles from
  ``first`` until a batch is refused, then bisects between the largest not refused and the
  smallest refused. With fits growing monotonically in the batch, the answer is an upper bound
  of the largest batch that fits (one step below it may still not fit: see --upper_bound)."""
  probed = {}
  passed, failing = 0, None
  images = max(step, first // step * step)
  while len(probed) < max_probes and images not in probed:
    probed[images] = bool(refused(images))
    if probed[images]:
      failing = images if failing is None else min(failing, images)
    else:
      passed = max(passed, images)
    if failing is None:
      if images >= most:
        break
      images = min(2 * images, most // step * step)
    elif failing - passed <= step:
      break
    else:
      images = passed + max(step, (failing - passed) // 2 // step * step)
  return failing, dict(sorted(probed.items()))


def plan_record(compiled, compile_seconds, chips, batch_size):
  """The per-chip numbers of a compiled step (see the module docstring)."""
  memory = compiled.memory_analysis()
  planned = (memory.argument_size_in_bytes + memory.output_size_in_bytes +
             memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
  per_chip_images = batch_size / chips
  bytes_accessed = cost.get("bytes accessed")
  return {"chips": chips, "images_per_chip": per_chip_images,
          "planned_bytes_per_chip": int(planned),
          "argument_bytes": int(memory.argument_size_in_bytes),
          "output_bytes": int(memory.output_size_in_bytes),
          "temp_bytes": int(memory.temp_size_in_bytes),
          "alias_bytes": int(memory.alias_size_in_bytes),
          "flops_per_chip": cost.get("flops"), "bytes_accessed_per_chip": bytes_accessed,
          "bytes_accessed_per_image": None if bytes_accessed is None else bytes_accessed / per_chip_images,
          "optimal_seconds_hint": cost.get("optimal_seconds"),
          "compile_seconds": round(compile_seconds, 1)}


def _flags():
  """This command's flags: absl, as every entry point (train/eval/detect/export/bench)."""
  from absl import flags
  flag_values = flags.FlagValues()
  define = dict(flag_values=flag_values)
  flags.DEFINE_string("topology", None, "e.g. v5e:2x2, v5p:2x2x1, v6e:2x2, v5e:4x4", **define)
  flags.DEFINE_enum("model", "yolov9-c", sorted(models.ARCHITECTURES), "architecture", **define)
  flags.DEFINE_integer("batch_size", 64, "global, over every chip", **define)
  flags.DEFINE_integer("image_size", 640, "training image side, a multiple of 32", **define)
  flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "compute dtype", **define)
  flags.DEFINE_boolean("shard_state", False, "FSDP, as train.shard_state", **define)
  flags.DEFINE_integer("max_boxes", 100, "box slots per training image", **define)
  flags.DEFINE_integer("num_classes", 80, "classes of the model", **define)
  flags.DEFINE_boolean("remat", False, "as model.remat: recompute each layer's insides in the "
                       "backward pass", **define)
  flags.DEFINE_enum("program", "train", ["train", "detect"], "train: train.py's step; detect: "
                    "the evaluator's folded detector with NMS", **define)
  flags.DEFINE_boolean("largest_batch", False, "find the largest images per chip (a multiple of "
                       "--batch_step) whose plan fits the chip's HBM, starting at --batch_size "
                       "per chip; a JSON line per compile, then the summary", **define)
  flags.DEFINE_integer("batch_step", 8, "with --largest_batch: images per chip are multiples of "
                       "this", lower_bound=1, **define)
  flags.DEFINE_integer("most_per_chip", 1024, "with --largest_batch: stop there", lower_bound=1,
                       **define)
  flags.DEFINE_boolean("upper_bound", False, "cheaply bound the largest images per chip from "
                       "above: the smallest (a multiple of --batch_step) XLA:TPU refuses for HBM, "
                       "each probe stopped after --probe_seconds (a probe still compiling then "
                       "has passed the compiler's first HBM check); a JSON line per probe, then "
                       "the summary", **define)
  flags.DEFINE_integer("probe_seconds", 240, "with --upper_bound: stop each probe after this; "
                       "above the time XLA:TPU takes to refuse (at 640 here: yolov9-c 37-122 s, "
                       "yolov9-e 76-181 s)",
                       lower_bound=1, **define)
  flags.DEFINE_boolean("help", False, "show this help", **define)
  return flag_values


def _setting(args):
  """What a compile was of, as each record and each search's summary names it."""
  setting = {"topology": args.topology, "program": args.program, "model": args.model,
             "image_size": args.image_size, "dtype": args.dtype}
  if args.program == "train":
    setting.update(shard_state=args.shard_state, max_boxes=args.max_boxes, remat=args.remat)
  return setting


def _usable_hbm_bytes(topology_name):
  """The HBM per chip a program may plan for on ``topology_name``; None for an unknown chip."""
  generation = topology_name.split(":")[0]
  return USABLE_HBM_GIB[generation] * 2**30 if generation in USABLE_HBM_GIB else None


def _search_setting(args, chips):
  """What a batch search was of: the compile's setting, the slice's chips and their usable HBM."""
  return {**_setting(args), "chips": chips,
          "usable_hbm_bytes_per_chip": _usable_hbm_bytes(args.topology)}


def plan(args, batch_size):
  """One compile of ``args.program`` at the global ``batch_size``: the JSON record. A program
  XLA:TPU refuses for HBM gives a record with ``fits`` false and the bytes it said it needed."""
  record = {**_setting(args), "batch_size": batch_size}
  hbm_bytes = _usable_hbm_bytes(args.topology)
  start = time.perf_counter()
  try:
    if args.program == "train":
      compiled, seconds, chips = compile_train_step(
          args.topology, args.model, batch_size, args.image_size, args.dtype, args.shard_state,
          args.max_boxes, args.num_classes, args.remat)
    else:
      compiled, seconds, chips = compile_detector(args.topology, args.model, batch_size,
                                                  args.image_size, args.dtype, args.num_classes)
  except Exception as error:  # noqa: BLE001 - only XLA:TPU's HBM refusal is an answer
    needed = exceeded_hbm_bytes(error)
    if needed is None:
      raise
    chips = len(topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices)
    record.update(chips=chips, images_per_chip=batch_size / chips, planned_bytes_per_chip=needed,
                  refused_by_compiler=True,
                  compile_seconds=round(time.perf_counter() - start, 1))
  else:
    record.update(plan_record(compiled, seconds, chips, batch_size))
  if hbm_bytes is not None:
    record["usable_hbm_bytes_per_chip"] = hbm_bytes
    record["fits"] = record["planned_bytes_per_chip"] <= hbm_bytes
  return record


def _plan_in_subprocess(args, batch_size, timeout_seconds=None):
  """``plan`` at the global ``batch_size`` in a process of its own (a compiler process keeps most
  of the host memory it reached, 10-13 GB for gelan-c at 640, measured, so one process compiling
  several large batches in turn outgrows the host). None where it ran past ``timeout_seconds``
  (the process is killed)."""
  command = [sys.executable, "-m", "yolov9_jax.tpu_plan", f"--topology={args.topology}",
             f"--program={args.program}", f"--model={args.model}", f"--batch_size={batch_size}",
             f"--image_size={args.image_size}", f"--dtype={args.dtype}",
             f"--shard_state={args.shard_state}", f"--max_boxes={args.max_boxes}",
             f"--num_classes={args.num_classes}", f"--remat={args.remat}"]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_seconds)
  except subprocess.TimeoutExpired:  # subprocess.run has killed the compile
    return None
  if done.returncode:
    sys.exit(f"python -m yolov9_jax.tpu_plan: the compile of a global batch of {batch_size} "
             f"failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _largest_batch(args, chips):
  """--largest_batch: the largest images per chip whose full compile plans within the usable HBM,
  found with few compiles (each takes minutes)."""
  records = []

  def planned_bytes(images_per_chip):
    records.append(_plan_in_subprocess(args, images_per_chip * chips))
    print(json.dumps(records[-1]), flush=True)  # each compile as it ends: they take minutes
    return records[-1]["planned_bytes_per_chip"]

  largest, measured = largest_fitting_batch(
      planned_bytes, _usable_hbm_bytes(args.topology), step=args.batch_step,
      first=max(1, args.batch_size // chips), most=args.most_per_chip)
  at_largest = next((r for r in records if r["images_per_chip"] == largest), {})
  summary = {**_search_setting(args, chips),
             "largest_images_per_chip": largest, "batch_step": args.batch_step,
             "planned_bytes_at_largest": at_largest.get("planned_bytes_per_chip"),
             "bytes_accessed_per_image_at_largest": at_largest.get("bytes_accessed_per_image"),
             "planned_bytes_by_images_per_chip": measured,
             "compile_seconds": round(sum(r["compile_seconds"] for r in records), 1)}
  print(json.dumps(summary), flush=True)
  return summary


def _upper_bound(args, chips):
  """--upper_bound: the smallest images per chip XLA:TPU refuses (or plans beyond the usable HBM)
  within --probe_seconds per probe. A refusal for HBM comes before scheduling (27-181 s at 640
  here, the most for yolov9-e on v6e) unless the batch is near the limit, where the compiler
  first schedules for minutes; so the bound is a batch shown not to fit, and the largest that
  fits lies below it."""
  records = []

  def refused(images_per_chip):
    start = time.perf_counter()
    record = _plan_in_subprocess(args, images_per_chip * chips, args.probe_seconds)
    if record is None:
      record = {"images_per_chip": float(images_per_chip), "refused_by_compiler": False,
                "passed_first_hbm_check": True,
                "compile_seconds": round(time.perf_counter() - start, 1)}
    records.append(record)
    print(json.dumps(record), flush=True)
    return "fits" in record and not record["fits"]

  bound, probed = smallest_refused_batch(refused, step=args.batch_step,
                                         first=max(1, args.batch_size // chips),
                                         most=args.most_per_chip)
  largest_fitting = max((r["images_per_chip"] for r in records if r.get("fits")), default=None)
  summary = {**_search_setting(args, chips),
             "smallest_refused_images_per_chip": bound,
             "largest_compiled_fitting_images_per_chip": largest_fitting and int(largest_fitting),
             "batch_step": args.batch_step, "probe_seconds": args.probe_seconds,
             "refused_by_images_per_chip": probed,
             "seconds": round(sum(r["compile_seconds"] for r in records), 1)}
  print(json.dumps(summary), flush=True)
  return summary


def main(argv=None):
  import types

  from absl import flags
  flag_values = _flags()
  try:
    flag_values([sys.argv[0]] + list(sys.argv[1:] if argv is None else argv))
    if flag_values.help:
      print(__doc__ + "\n" + flag_values.get_help())
      return None
    if not flag_values.topology:
      raise flags.Error("--topology is required, e.g. --topology=v5e:2x2")
    if flag_values.largest_batch and flag_values.upper_bound:
      raise flags.Error("--largest_batch and --upper_bound are two searches: give one")
    if ((flag_values.largest_batch or flag_values.upper_bound) and
        _usable_hbm_bytes(flag_values.topology) is None):
      search = "--largest_batch" if flag_values.largest_batch else "--upper_bound"
      raise flags.Error(f"{search} needs the HBM of {flag_values.topology}'s chips; "
                        f"known: {', '.join(sorted(USABLE_HBM_GIB))}")
  except flags.Error as error:
    sys.exit(f"python -m yolov9_jax.tpu_plan: {error}")
  args = types.SimpleNamespace(**{name: flag_values[name].value for name in flag_values})
  if not (args.largest_batch or args.upper_bound):
    record = plan(args, args.batch_size)
    print(json.dumps(record), flush=True)
    return record
  chips = len(topologies.get_topology_desc(platform="tpu", topology_name=args.topology).devices)
  return (_upper_bound if args.upper_bound else _largest_batch)(args, chips)


if __name__ == "__main__":
  main()
