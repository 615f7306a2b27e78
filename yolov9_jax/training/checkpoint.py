"""Checkpoints with orbax: the last K (saved asynchronously every N steps) and the best by mAP.

A checkpoint holds the whole ``TrainState`` (params, EMA, optimizer state, gradient sum, the
iteration, which is also the data position: the batch at step N is a function of (seed, N)) and
a JSON item with the config and the run's counters. Orbax writes into a temporary directory and
renames it when complete, so a process killed during a save leaves the previous checkpoint
restorable.
"""
import json
import pathlib
import signal

import jax
import orbax.checkpoint as ocp

LAST, BEST = "checkpoints", "best"


class Checkpoints:
  """``save(state, meta)`` every time it is called (the caller decides when), ``save_best``
  after an evaluation, ``restore_latest(abstract_state)``."""

  def __init__(self, workdir, keep=3):
    workdir = pathlib.Path(workdir).absolute()
    self.last = ocp.CheckpointManager(
        workdir / LAST, options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                             enable_async_checkpointing=True))
    self.best = ocp.CheckpointManager(
        workdir / BEST, options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda metrics: metrics["score"], best_mode="max",
            enable_async_checkpointing=True))

  @staticmethod
  def _args(state, meta):
    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(json.loads(json.dumps(meta, default=str))))

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

  def restore(self, abstract_state, step=None, best=False):
    """(state, meta) of ``step`` (default: the latest; ``best``: the best one). ``abstract_state``:
    a state or ``jax.ShapeDtypeStruct`` tree with the shardings to restore into."""
    manager = self.best if best else self.last
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self):
    self.last.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.last.close()
    self.best.close()


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
