"""Where arrays live: one mesh over every device of every host, the batch split along "data",
the train state replicated, or with ``shard_state`` (FSDP / ZeRO-3) its flat parameter-sized
vectors (weights, EMA, momentum, gradient sum: the train state names them) split along "data" too: each device then holds
1/N of them and XLA gathers the weights for the forward pass and reduce-scatters the gradients.
Decided here and nowhere else; the model knows nothing of devices."""
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None):
  """A 1-D mesh over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh):
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size, num_devices, name="train.batch_size"):
  """The global batch must split evenly over the ``num_devices`` devices of the mesh (and so over
  the processes): ValueError naming the setting ``name`` otherwise."""
  if not isinstance(global_batch_size, int) or global_batch_size < 1:
    raise ValueError(f"{name}={global_batch_size!r}: expected a positive integer")
  if global_batch_size % num_devices:
    raise ValueError(f"{name}={global_batch_size}: not divisible by the {num_devices} devices; "
                     f"use a multiple of {num_devices}")


def state_shardings(state, mesh, split=None):
  """Replicated, except the leaves marked True in ``split`` (a tree of bools like ``state``; with
  ``shard_state`` it is ``training.state.parameter_shaped``), which are split along the data
  axis."""
  if split is None:
    return jax.tree.map(lambda _: replicated(mesh), state)
  return jax.tree.map(lambda _, is_split: NamedSharding(mesh, PartitionSpec(DATA_AXIS)) if is_split
                      else replicated(mesh), state, split)


def jit_train_step(step_fn, state, mesh, split=None):
  """``step_fn`` jitted once: state donated (its leaves marked in ``split`` split over the data
  axis), batch split over the data axis, so BatchNorm statistics and the loss normalisation are
  over the global batch."""
  shardings = state_shardings(state, mesh, split)
  return jax.jit(step_fn, in_shardings=(shardings, batch_sharding(mesh)),
                 out_shardings=(shardings, replicated(mesh)), donate_argnums=0)


def to_host(tree):
  """NumPy copies of ``tree``'s global arrays on this process. An array no single process holds
  whole (``shard_state`` across hosts) is gathered from all: every process must call this."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)


def put_state(state, mesh, split=None):
  """A host state -> global arrays with ``state_shardings`` (every process passes the same
  values)."""
  def put(x, sharding):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(put, state, state_shardings(state, mesh, split))
