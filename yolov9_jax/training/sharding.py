"""Where arrays live: one mesh over every device of every host, the batch split along "data",
the train state replicated. Decided here and nowhere else; the model knows nothing of devices."""
import jax
import numpy as np
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


def check_batch_size(global_batch_size, mesh):
  """The global batch must split evenly over the devices (and so over the processes)."""
  if global_batch_size % mesh.size:
    raise ValueError(f"config field train.batch_size={global_batch_size} is not divisible by the "
                     f"{mesh.size} devices")


def jit_train_step(step_fn, state, mesh):
  """``step_fn`` jitted once: state replicated and donated, batch split over the data axis, so
  BatchNorm statistics and the loss normalisation are over the global batch."""
  state_sharding = jax.tree.map(lambda _: replicated(mesh), state)
  return jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding(mesh)),
                 out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)


def put_replicated(tree, mesh):
  """Host arrays -> replicated global arrays (every process passes the same values)."""
  sharding = replicated(mesh)

  def put(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, tree)
