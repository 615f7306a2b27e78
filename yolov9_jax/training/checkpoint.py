"""Checkpoints with orbax: the last K (saved asynchronously every N steps) and the best by mAP.

A checkpoint holds the whole ``TrainState`` (params, EMA, optimizer state, gradient sum, the
iteration, which is also the data position: the batch at step N is a function of (seed, N)) and
a JSON item with the config and the run's counters. With a ``state.CheckpointForm`` (train.py
passes one) the state item holds named trees: ``state/ema_params/model_0/conv/kernel`` reads
with plain orbax, without this package. Checkpoints written before that (flat vectors: the
state's own layout) still resume. Orbax writes into a temporary directory and renames it when
complete, so a process killed during a save leaves the previous checkpoint restorable.
"""
import json
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata import array_metadata_store

from yolov9_jax import paths

LAST, BEST, DAMAGED = "checkpoints", "best", "damaged_checkpoints"

# Orbax's replica-parallel save (its default off GPU) cuts every replicated array into one slice
# per device, and each slice is a program XLA compiles per leaf shape and device: at a run's first
# save, ~320 compilations and ~30 s for gelan-t on 2 CPU devices, more leaves times more chips on a
# TPU host. The train state is small next to what a host writes per second, so each array is
# written whole by its first replica (as orbax does on GPU); the files are the same.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                              array_metadata_store=array_metadata_store.Store()),
    override=True)


class Checkpoints:
  """``save(state, meta)`` every time it is called (the caller decides when), ``save_best``
  after an evaluation, ``restore_latest(template)``. ``form``: a ``state.CheckpointForm`` to save
  named trees (None: the state as it is)."""

  def __init__(self, workdir, keep=3, form=None):
    self.form = form
    workdir = paths.absolute(workdir)
    self.last = ocp.CheckpointManager(
        workdir / LAST, options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                             enable_async_checkpointing=True))
    self.best = ocp.CheckpointManager(
        workdir / BEST, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics["score"], best_mode="max",
            enable_async_checkpointing=True))

  def _args(self, state, meta):
    tree = state if self.form is None else self.form.to_tree(state)
    return ocp.args.Composite(state=ocp.args.StandardSave(tree),
                              meta=ocp.args.JsonSave(json.loads(json.dumps(meta, default=str))))

  def _restore_state(self, manager, step, template):
    """The state of ``step`` laid out and sharded as ``template`` (a state, or its ``abstract``
    for a checkpoint of the same form), from named trees or from the older flat vectors."""
    if self.form is not None and _is_named(_saved_tree(manager.directory / str(step) / "state")):
      tree = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(self.form.abstract_tree(template))))["state"]
      return self.form.from_tree(tree, template)
    if self.form is not None:
      print(f"checkpoint {manager.directory / str(step)} holds flat vectors (written before "
            "checkpoints held named trees): read in that layout")
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract(template))))["state"]

  def save(self, state, meta, wait=False):
    """Starts an asynchronous save of ``state`` at its iteration; ``wait`` blocks until done."""
    step = int(jax.device_get(state.iteration))
    if step not in self.last.all_steps():
      self.last.save(step, args=self._args(state, meta))
    if wait:
      self.last.wait_until_finished()

  def save_best(self, state, meta, score):
    """Keeps ``state`` if ``score`` (the official fitness: 0.1 mAP50 + 0.9 mAP50-95) is the best."""
    step = int(jax.device_get(state.iteration))
    if step not in self.best.all_steps():
      self.best.save(step, args=self._args(state, meta), metrics={"score": float(score)})

  def latest_step(self):
    return self.last.latest_step()

  def restore_latest(self, template):
    """(state, meta) of the newest checkpoint that reads back completely, laid out and sharded as
    ``template`` (the fresh state), or None where there is none. A checkpoint whose state does not read (a truncated file after a preempted copy or a
    full disk) is moved aside to ``<workdir>/damaged_checkpoints/`` with a message, and the one
    before it is tried; a damaged ``meta`` alone costs the counters, not the weights."""
    for step in sorted(self.last.all_steps(), reverse=True):
      error = None
      try:
        state = self._restore_state(self.last, step, template)
      except Exception as caught:  # noqa: BLE001  (orbax/tensorstore raise many kinds)
        error = caught
      if not _everywhere(error is None):  # every process skips the step if one could not read it
        self._set_aside(step, error or "another process could not read it")
        continue
      try:
        meta = self.last.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as caught:  # noqa: BLE001
        print(f"checkpoint {self.last.directory / str(step)}: its meta item does not read "
              f"({_first_line(caught)}); resuming its weights with fresh counters")
        meta = {}
      return state, meta
    return None

  def _set_aside(self, step, error):
    """Moves the damaged step directory out of the manager's reach, keeping it for inspection."""
    source = self.last.directory / str(step)
    target = self.last.directory.parent / DAMAGED / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"checkpoint {source} does not read back ({_first_line(error)}); moved to {target}, "
          f"trying the one before it")
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      source.rename(target)
    _barrier(f"set_aside_{step}")
    self.last.reload()

  def restore(self, template, step=None, best=False):
    """(state, meta) of ``step`` (default: the latest; ``best``: the best one), laid out and
    sharded as ``template``: a state, or without a ``form`` its ``abstract``."""
    manager = self.best if best else self.last
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    state = self._restore_state(manager, step, template)
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return state, meta

  def wait(self):
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.last.close()
    self.best.close()


def _step_directory(path):
  """A step directory from a workdir, its checkpoints/ or best/ folder, or a step directory."""
  path = paths.absolute(path)
  if (path / LAST).is_dir():
    path = path / LAST
  if (path / "state").is_dir():
    return path
  steps = sorted((p for p in path.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)) \
      if path.is_dir() else []
  if not steps:
    raise FileNotFoundError(f"{path} holds no training checkpoint (a workdir, its {LAST}/ or {BEST}/ "
                            "folder, or one step directory)")
  return steps[-1]


def load_model_variables(path, ema=True):
  """(model name, variables {"params", "batch_stats"}, meta) of a training checkpoint: its EMA
  weights, or the raw training weights with ``ema=False``. Needs nothing but the checkpoint: the
  model and its number of classes come from the saved config and class names."""
  from yolov9_jax import models  # noqa: PLC0415  (training.state imports nothing of models)
  from yolov9_jax.training import state as train_state  # noqa: PLC0415
  step_directory = _step_directory(path)
  state = _restore_as_numpy(step_directory / "state")
  meta = read_meta(step_directory)
  name = meta["config"]["model"]["name"]
  prefix = "ema_" if ema else ""
  if isinstance(state["params"], dict):  # named trees
    return name, {"params": state[f"{prefix}params"],
                  "batch_stats": state[f"{prefix}batch_stats"]}, meta
  shapes = models.abstract_variables(name, len(meta["class_names"]))
  layout = train_state.Layout.of(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  return name, layout.variables(state[f"{prefix}params"], state[f"{prefix}batch_stats"]), meta


def read_meta(path):
  """The meta item (config, class names, ...) of a training checkpoint: ``path`` is a train.py
  workdir (its latest checkpoint) or one checkpoint directory."""
  return json.loads((_step_directory(path) / "meta" / "metadata").read_text())


def _restore_as_numpy(directory):
  """The arrays of an orbax checkpoint as NumPy arrays, whatever devices and processes saved them
  (a checkpoint of a sharded state names devices this process may not have)."""
  return ocp.StandardCheckpointer().restore(
      directory, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), _saved_tree(directory)))


def _saved_tree(directory):
  """The tree of array metadata (shapes, dtypes) that an orbax item directory holds."""
  return ocp.StandardCheckpointer().metadata(directory).item_metadata.tree


def _is_named(saved_tree):
  """Whether a saved state holds named trees (else the flat vectors of the older form)."""
  return isinstance(saved_tree, dict) and isinstance(saved_tree.get("params"), dict)


def _first_line(error):
  return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__


def _everywhere(flag):
  """True where ``flag`` holds on every process (a collective on a multi-process job)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


def _barrier(name):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def abstract(state):
  """Shapes, dtypes and shardings of ``state``, to restore into."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class Preemption:
  """Notes a SIGTERM (a preempted TPU VM or a cluster's stop signal) so that the training loop
  can save at the end of the current step and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore_handler(self):
    signal.signal(signal.SIGTERM, self._previous)
