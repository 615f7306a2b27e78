"""Train a YOLOv9 / GELAN detector with the official recipe (FACTS.md §6).

    python train.py                                            # the shapes demo, on the CPU
    python train.py --config=configs/coco.py:yolov9-c --workdir=runs/yolov9-c
    python train.py --config=configs/shapes_demo.py --config.train.epochs=5   # any field

Every host of a multi-host job runs the same command with --config.distributed=True. Running the
same command again resumes from the workdir's latest checkpoint, exactly. SIGTERM saves and exits.
"""
import json
import os
import pathlib
import sys
import time

from yolov9_jax import xla_flags

xla_flags.use_fast_cpu_convolutions()  # before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from yolov9_jax import models, paths, sharding, weights  # noqa: E402
from yolov9_jax.data import eval_batches, pipeline, prepare, sources, visualize  # noqa: E402
from yolov9_jax.evaluation import evaluator  # noqa: E402
from yolov9_jax.training import checkpoint, config_checks, program, writers  # noqa: E402
from yolov9_jax.training import state as train_state  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent  # local: this repository
config_flags.DEFINE_config_file("config", str(REPO / "configs" / "shapes_demo.py"),
                                "Training config: a configs/*.py file[:argument].", lock_config=True)
flags.DEFINE_string("workdir", "", "Checkpoints, logs and plots (default: runs/<config file name>).")
FLAGS = flags.FLAGS


def init_variables(config, num_classes):
  """Fresh variables from the config seed; with ``model.init_from``, the checkpoint's weights
  except the class head where the number of classes differs."""
  variables = models.init_variables(config.model.name, num_classes, config.seed,
                                    config.augment.image_size, config.model.dtype)
  if config.model.init_from:
    pretrained, _ = weights.load(config.model.init_from, config.model.name)
    variables, fresh = train_state.transfer(pretrained, variables)
    print(f"fine-tuning from {config.model.init_from}; re-initialised: {', '.join(fresh) or 'nothing'}")
  return variables


def log_eval_images(writer, step, result, source, class_names, count):
  """A few validation images with their predicted boxes (score >= 0.25) in TensorBoard (drawn on
  process 0, which holds the predictions)."""
  if jax.process_index() > 0 or count == 0:
    return
  per_image = result.predictions.by_image()
  images = {}
  for index in range(min(count, len(source))):
    example = source[index]
    found = per_image.get(eval_batches.example_image_id(example), evaluator.Predictions.empty())
    found = found.select(found.scores >= 0.25)
    drawn = visualize.draw_boxes(np.asarray(example["image"]), found.boxes_xyxy_px, found.labels,
                                 class_names, found.scores)
    images[f"validation/{index}"] = np.asarray(drawn)
  writer.write_images(step, images)


def train(config, workdir):
  """Trains as ``config`` says, in ``workdir`` (resuming from its latest checkpoint); returns
  (final train state, final evaluation), or (state at the save, None) when preempted."""
  started = time.perf_counter()
  if config.distributed:
    explicit = config.coordinator_address and config.num_processes > 0 and config.process_id >= 0
    jax.distributed.initialize(*(
        (config.coordinator_address, config.num_processes, config.process_id) if explicit else ()),
        heartbeat_timeout_seconds=config.heartbeat_timeout_seconds)
  jax.config.update("jax_compilation_cache_dir", str(REPO / ".cache" / "jax"))
  mesh = sharding.make_mesh()
  config_checks.validate(config, mesh.size)
  workdir = paths.user_path(workdir)
  is_main_process = jax.process_index() == 0
  if is_main_process:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  # Data: a user's YOLO/COCO source is prepared on first use (by process 0, the others wait);
  # the batch at step N is a function of (seed, N).
  if config.data.source in prepare.SOURCES:
    if is_main_process:
      try:
        record = prepare.ensure_prepared(config.data)
      except (FileNotFoundError, ValueError) as error:  # the user's files: a message, no traceback
        sys.exit(f"train.py: dataset {config.data.source}: {error}")
      (workdir / prepare.PREPARED_FILE).write_text(json.dumps(record, indent=1))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("dataset prepared")
  data = sources.open_datasets(config.data)
  batch_size, epochs = config.train.batch_size, config.train.epochs
  steps_per_epoch = config.train.steps_per_epoch or len(data.train) // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"config field train.batch_size={batch_size} is larger than the "
                     f"{len(data.train)} training images")
  total_steps = epochs * steps_per_epoch

  # Model, optimizer, state: fresh, fine-tuned, or resumed from the workdir.
  training = program.build(config, init_variables(config, len(data.class_names)), mesh,
                           num_classes=len(data.class_names), steps_per_epoch=steps_per_epoch)
  state = training.state_on(mesh)
  checkpoints = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints,
                                       form=train_state.CheckpointForm(training.tx))
  best_fitness = -1.0
  resumed = checkpoints.restore_latest(state)
  if resumed is not None:
    state, meta = resumed
    best_fitness = meta.get("best_fitness", -1.0)
    print(f"resumed from {workdir} at step {int(state.iteration)}")
  start_step = int(jax.device_get(state.iteration))

  train_data = pipeline.TrainPipeline(data.train, config.augment, batch_size,
                                      steps_per_epoch=steps_per_epoch, total_epochs=epochs)
  if is_main_process and start_step == 0:
    visualize.save_batch_grid(train_data.batch(0), data.class_names, workdir / "train_batch0.png")

  writer = writers.create(workdir, is_main_process)
  preemption = checkpoint.Preemption()

  def meta():
    return {"config": config.to_dict(), "best_fitness": best_fitness,
            "pipeline_counters": vars(train_data.counters), "class_names": data.class_names}

  eval_images_hw = None  # read once, at the first evaluation (the rectangles need the sizes)

  def run_evaluation(step):
    nonlocal best_fitness, eval_images_hw
    if config.eval.rectangular and eval_images_hw is None:
      eval_images_hw = evaluator.images_hw(data.eval)
    # Gathered from every process where shard_state splits the EMA over hosts.
    ema_variables = state.layout.variables(*sharding.to_host((state.ema_params, state.ema_batch_stats)))
    result = evaluator.evaluate(
        config.model.name, ema_variables, data.eval, data.category_ids,
        class_names=data.class_names, image_size=config.augment.image_size,
        batch_size=config.eval.batch_size, ground_truth=data.eval_annotations or None, mesh=mesh,
        conf_threshold=config.eval.conf_threshold, iou_threshold=config.eval.iou_threshold,
        max_det=config.eval.max_det, dtype=config.model.dtype,
        rectangular=config.eval.rectangular, source_images_hw=eval_images_hw,
        progress=is_main_process)
    # The same on every process (the evaluator shares its metrics), so all save the best together.
    fitness = 0.1 * result.metrics["AP50"] + 0.9 * result.metrics["AP"]
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result.metrics.items() if k != "table"})
    log_eval_images(writer, step, result, data.eval, data.class_names, config.eval.num_images_logged)
    if fitness > best_fitness:
      best_fitness = fitness
      checkpoints.save_best(state, meta(), fitness)
    return result

  # The loop: one jitted step per global batch; the host reads metrics of the step before,
  # while the device runs the current one.
  batches = pipeline.prefetch_to_device(train_data(start_step), mesh)
  step, result, previous, interval_start = start_step, None, None, time.perf_counter()
  for epoch in range(start_step // steps_per_epoch, epochs):
    progress = tqdm.tqdm(total=steps_per_epoch, initial=step - epoch * steps_per_epoch,
                         desc=f"epoch {epoch + 1}/{epochs}", disable=not is_main_process,
                         dynamic_ncols=True)
    while step < (epoch + 1) * steps_per_epoch:
      state, metrics = training.step(state, next(batches))
      step += 1
      progress.update()
      if previous is not None and int(previous["consecutive_nonfinite"]) >= config.train.max_consecutive_nonfinite:
        checkpoints.wait()
        writer.close()
        train_data.close()
        sys.exit(f"stopping: {config.train.max_consecutive_nonfinite} consecutive steps had a "
                 f"non-finite loss or gradient (step {step}); the data or the settings are broken. "
                 f"The last good checkpoint in {workdir / checkpoint.LAST} is intact.")
      previous = metrics
      if step % config.train.log_every_steps == 0:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        seconds = time.perf_counter() - interval_start
        values["images_per_second"] = config.train.log_every_steps * batch_size / seconds
        interval_start = time.perf_counter()
        progress.set_postfix({k: f"{values[k]:.4g}" for k in ("box", "cls", "dfl", "lr", "images_per_second")})
        writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
      if step % config.train.checkpoint_every_steps == 0:
        checkpoints.save(state, meta())
      stop = (multihost_utils.reached_preemption_sync_point(step)
              if jax.process_count() > 1 else preemption.requested)
      if stop:
        progress.close()
        checkpoints.save(state, meta(), wait=True)
        checkpoints.close()
        writer.close()
        train_data.close()
        preemption.restore_handler()
        print(f"preempted: saved step {step} in {workdir / checkpoint.LAST}")
        return state, None
    progress.close()
    if (epoch + 1) % config.eval.every_epochs == 0 and epoch + 1 < epochs:
      run_evaluation(step)
      interval_start = time.perf_counter()

  train_data.close()  # stops the worker processes before the evaluation needs the cores
  checkpoints.save(state, meta(), wait=True)
  result = run_evaluation(step)
  checkpoints.wait()
  checkpoints.close()
  writer.close()
  preemption.restore_handler()
  if is_main_process:
    print(result.metrics["table"])
    print(f"{config.model.name} on {len(data.eval)} validation images: mAP@0.5 "
          f"{result.metrics['AP50']:.3f}, mAP@0.5:0.95 {result.metrics['AP']:.3f} (EMA weights); "
          f"{total_steps} steps; non-finite steps skipped: {int(jax.device_get(state.nonfinite_steps))}; "
          f"train-step compilations: {training.compilations}; "
          f"{(time.perf_counter() - started) / 60:.1f} min; workdir {workdir}")
  return state, result


def run(config, workdir):
  """``train``, with the message a multi-process job needs when another process dies: on the
  CPU a collective fails at once; on accelerators it waits until the coordination service sees
  the lost heartbeats and stops every process (``config.heartbeat_timeout_seconds``)."""
  try:
    return train(config, workdir)
  except jax.errors.JaxRuntimeError as error:
    if jax.process_count() == 1:
      raise
    sys.exit(f"train.py, process {jax.process_index()} of {jax.process_count()}: a step across "
             f"processes failed ({str(error).strip().splitlines()[0][:300]}). Another process has "
             f"most likely died (a preempted or crashed host): the JAX coordination service names "
             f"it in this log and stops the remaining processes within "
             f"config.heartbeat_timeout_seconds={config.heartbeat_timeout_seconds}. Run the same "
             f"command on every host again to resume from the last checkpoint in "
             f"{paths.user_path(workdir) / checkpoint.LAST}.")


def main(argv):
  del argv
  writers.log_at_info_without_chatty_libraries()
  config_file = FLAGS["config"].config_filename.split(":")[0]
  config_name = os.path.splitext(os.path.basename(config_file))[0]
  run(FLAGS.config, FLAGS.workdir or REPO / "runs" / config_name)


if __name__ == "__main__":
  app.run(main)
