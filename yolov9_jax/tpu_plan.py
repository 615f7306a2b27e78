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
"""
import json
import os
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
from yolov9_jax.training import program  # noqa: E402

# HBM per chip, GiB, from Google's TPU data sheets.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}


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
  flags.DEFINE_boolean("help", False, "show this help", **define)
  return flag_values


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
  except flags.Error as error:
    sys.exit(f"python -m yolov9_jax.tpu_plan: {error}")
  args = types.SimpleNamespace(**{name: flag_values[name].value for name in flag_values})
  compiled, seconds, chips = compile_train_step(
      args.topology, args.model, args.batch_size, args.image_size, args.dtype, args.shard_state,
      args.max_boxes, args.num_classes, args.remat)
  record = {"topology": args.topology, "model": args.model, "batch_size": args.batch_size,
            "image_size": args.image_size, "dtype": args.dtype, "shard_state": args.shard_state,
            "max_boxes": args.max_boxes, "remat": args.remat, **plan_record(compiled, seconds, chips, args.batch_size)}
  generation = args.topology.split(":")[0]
  if generation in HBM_GIB:
    record["hbm_bytes_per_chip"] = HBM_GIB[generation] * 2**30
    record["fits"] = record["planned_bytes_per_chip"] <= record["hbm_bytes_per_chip"]
  print(json.dumps(record), flush=True)
  return record


if __name__ == "__main__":
  main()
