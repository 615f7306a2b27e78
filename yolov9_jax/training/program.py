"""The training program of a run's config: the model, the optimizer, the initial train state and
the train step jitted for the mesh. train.py, the benchmarks, the TPU plan and the tests all build
it here, so what they run is the same program."""
import dataclasses
from typing import Any, Callable

import jax

from yolov9_jax import models, sharding
from yolov9_jax.training import optimizer as optim
from yolov9_jax.training import state as train_state
from yolov9_jax.training import step as step_lib


@dataclasses.dataclass(frozen=True)
class Program:
  model: Any                 # the Flax module (config.model: name, dtype, remat)
  tx: Any                    # the optax optimizer of the recipe
  host_state: train_state.TrainState  # the initial state, NumPy arrays on the host
  step: Callable             # jitted (state, batch) -> (state, metrics), state donated
  shard_state: bool          # FSDP: the state's flat parameter vectors split over the mesh
  split: Any                 # with shard_state: which leaves of the state are split (else None)
  traces: list               # one entry per trace of the step, i.e. per compilation

  @property
  def compilations(self):
    """How many times the step was traced and compiled (once, unless batch shapes changed)."""
    return len(self.traces)

  def state_on(self, mesh):
    """The initial state as global arrays on ``mesh`` (every process passes the same values)."""
    return sharding.put_state(self.host_state, mesh, self.split)


def build(config, variables, mesh, *, num_classes, steps_per_epoch) -> Program:
  """The program of ``config`` (its ``model``, ``optimizer``, ``loss`` and ``train`` fields) for
  ``variables`` ({"params", "batch_stats"} of ``config.model.name`` with ``num_classes``) on
  ``mesh``; ``steps_per_epoch`` sets the schedules' epoch length."""
  batch_size, shard_state = config.train.batch_size, config.train.shard_state
  sharding.check_batch_size(batch_size, mesh.size, "config field train.batch_size")
  model = models.build(config.model.name, num_classes=num_classes, dtype=config.model.dtype,
                       remat=config.model.remat)
  tx = optim.make_optimizer(config.optimizer, batch_size)
  layout = train_state.Layout.of(variables, pad_to=mesh.size if shard_state else 1)
  host_state = jax.device_get(train_state.create(
      variables, layout, tx, accumulate=optim.max_accumulate(config.optimizer, batch_size) > 1))
  step = step_lib.make_train_step(
      model, tx, num_classes=num_classes, loss_config=config.loss, recipe=config.optimizer,
      steps_per_epoch=steps_per_epoch, total_epochs=config.train.epochs,
      global_batch_size=batch_size)
  traces = []

  def train_step(state, batch):  # the name XLA's module and the compilation cache see
    traces.append(None)  # Python runs this body only while jax traces the step
    return step(state, batch)

  split = train_state.parameter_shaped(host_state, tx) if shard_state else None
  jitted = sharding.jit_train_step(train_step, host_state, mesh, split)
  return Program(model, tx, host_state, jitted, shard_state, split, traces)
