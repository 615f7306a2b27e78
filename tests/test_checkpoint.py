"""Checkpoints: what is saved comes back exactly, a save killed half-way leaves the previous one
restorable, SIGTERM is noted for the training loop."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from yolov9_jax import models, sharding
from yolov9_jax.training import checkpoint
from yolov9_jax.training import optimizer as optim
from yolov9_jax.training import state as train_state


def _tiny_state(seed=0, channels=(2, 4)):
  rng = np.random.default_rng(seed)
  kernel = rng.normal(size=(3, 3, *channels))
  variables = {"params": {"conv": {"kernel": jnp.asarray(kernel, jnp.float32),
                                   "bias": jnp.zeros(channels[1])}},
               "batch_stats": {"bn": {"mean": jnp.asarray(rng.normal(size=4), jnp.float32)}}}
  tx = optim.make_optimizer(optim.default_config(), 16)
  state = train_state.create(variables, train_state.Layout.of(variables), tx, accumulate=True)
  return state.replace(iteration=jnp.asarray(7, jnp.int32))


def test_a_checkpoint_restores_the_whole_state_and_meta(tmp_path):
  state = _tiny_state()
  checkpoints = checkpoint.Checkpoints(tmp_path, keep=2)
  for iteration in (7, 8, 9):
    checkpoints.save(state.replace(iteration=jnp.asarray(iteration, jnp.int32)), {"note": iteration})
  checkpoints.wait()
  assert checkpoints.last.all_steps() == [8, 9]  # keep the last 2
  restored, meta = checkpoints.restore(checkpoint.abstract(state))
  assert meta == {"note": 9} and int(restored.iteration) == 9
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state.replace(iteration=jnp.asarray(9)))):
    np.testing.assert_array_equal(got, want)
  assert restored.layout is state.layout  # the static part comes from the target
  checkpoints.save_best(state, {}, score=0.3)
  checkpoints.save_best(state.replace(iteration=jnp.asarray(11, jnp.int32)), {}, score=0.1)
  checkpoints.wait()
  best, _ = checkpoints.restore(checkpoint.abstract(state), best=True)
  assert int(best.iteration) == 7  # the higher score, not the later step
  checkpoints.close()


def test_saving_a_replicated_state_compiles_nothing(tmp_path):
  """A save of a state replicated over every device writes it without compiling a program per
  leaf and device (orbax's replica-parallel slicing: ~30 s at a run's first save on 2 CPUs)."""
  mesh = sharding.make_mesh()
  assert mesh.size > 1  # conftest's simulated devices
  # Channels that split over 8 devices: what orbax would slice.
  state = sharding.put_state(_tiny_state(channels=(16, 32)), mesh)
  compilations = []

  def listener(event, seconds, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compilations.append(seconds)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    checkpoints = checkpoint.Checkpoints(tmp_path)
    checkpoints.save(state, {"note": 1})
    checkpoints.wait()
    checkpoints.close()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compilations == []
  restored, _ = checkpoint.Checkpoints(tmp_path).restore(checkpoint.abstract(state))
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(got, want)


_KILLED_DURING_SAVE = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import jax.numpy as jnp
from test_checkpoint import _tiny_state
from yolov9_jax.training import checkpoint
checkpoints = checkpoint.Checkpoints({workdir!r})
state = _tiny_state()
checkpoints.save(state, {{"n": 1}}, wait=True)
big = state.replace(iteration=jnp.asarray(8, jnp.int32), params=jnp.ones(50_000_000))
checkpoints.save(big, {{"n": 2}})  # asynchronous: still writing when the process dies
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_process_killed_during_a_save_leaves_the_previous_checkpoint(tmp_path):
  tests = pathlib.Path(__file__).parent
  script = _KILLED_DURING_SAVE.format(repo=str(tests.parent), tests=str(tests), workdir=str(tmp_path))
  done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], timeout=300,
                        capture_output=True, text=True)
  assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
  checkpoints = checkpoint.Checkpoints(tmp_path)
  assert checkpoints.latest_step() == 7  # the half-written step 8 is not taken for a checkpoint
  restored, meta = checkpoints.restore(checkpoint.abstract(_tiny_state()))
  assert meta == {"n": 1}
  np.testing.assert_array_equal(restored.params, _tiny_state().params)
  checkpoints.close()


def test_sigterm_is_noted_not_fatal():
  preemption = checkpoint.Preemption()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    assert preemption.requested
  finally:
    preemption.restore_handler()
  assert signal.getsignal(signal.SIGTERM) is not preemption._handle


def _largest_file(directory):
  return max((p for p in pathlib.Path(directory).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_one_before_restored(tmp_path, capsys):
  state = _tiny_state()
  checkpoints = checkpoint.Checkpoints(tmp_path, keep=3)
  for iteration in (7, 8, 9):
    checkpoints.save(state.replace(iteration=jnp.asarray(iteration, jnp.int32)), {"note": iteration})
  checkpoints.close()
  damaged = _largest_file(tmp_path / checkpoint.LAST / "9" / "state")  # the arrays' data file
  damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])  # a copy cut short

  checkpoints = checkpoint.Checkpoints(tmp_path, keep=3)
  restored, meta = checkpoints.restore_latest(checkpoint.abstract(state))
  assert int(restored.iteration) == 8 and meta == {"note": 8}
  np.testing.assert_array_equal(restored.params, state.params)
  message = capsys.readouterr().out
  assert f"{tmp_path / checkpoint.LAST / '9'} does not read back" in message
  assert checkpoints.last.all_steps() == [7, 8]
  aside = list((tmp_path / checkpoint.DAMAGED).iterdir())  # kept, not deleted
  assert len(aside) == 1 and aside[0].name.startswith("9-")
  assert (aside[0] / "state" / damaged.relative_to(tmp_path / checkpoint.LAST / "9" / "state")).exists()
  checkpoints.save(state.replace(iteration=jnp.asarray(9, jnp.int32)), {"note": "again"}, wait=True)
  assert checkpoints.last.all_steps() == [7, 8, 9]  # the run saves step 9 anew
  checkpoints.close()


@pytest.mark.parametrize("damage", ["cut short", "missing"])
def test_a_damaged_meta_alone_keeps_the_weights(tmp_path, capsys, damage):
  state = _tiny_state()
  checkpoints = checkpoint.Checkpoints(tmp_path)
  checkpoints.save(state, {"best_fitness": 0.5}, wait=True)
  checkpoints.close()
  meta_directory = tmp_path / checkpoint.LAST / "7" / "meta"
  if damage == "missing":
    shutil.rmtree(meta_directory)
  else:
    (meta_directory / "metadata").write_text('{"best_fit')
  checkpoints = checkpoint.Checkpoints(tmp_path)
  restored, meta = checkpoints.restore_latest(checkpoint.abstract(state))
  assert meta == {} and int(restored.iteration) == 7
  np.testing.assert_array_equal(restored.ema_params, state.ema_params)
  assert "meta item does not read" in capsys.readouterr().out
  checkpoints.close()


def test_no_checkpoint_restores_nothing(tmp_path):
  checkpoints = checkpoint.Checkpoints(tmp_path)
  assert checkpoints.restore_latest(checkpoint.abstract(_tiny_state())) is None
  checkpoints.close()


def _gelan_t_state(mesh):
  """A gelan-t (3 classes) train state on ``mesh`` with distinct values in every vector."""
  shapes = models.abstract_variables("gelan-t", 3)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
  tx = optim.make_optimizer(optim.default_config(), 8)
  layout = train_state.Layout.of(variables, pad_to=mesh.size)
  host = jax.device_get(train_state.create(variables, layout, tx, accumulate=True))
  host = host.replace(iteration=np.int32(5), ema_params=host.params * 0.5,
                      grad_sum=host.params * 2, ema_batch_stats=host.batch_stats + 1,
                      opt_state=jax.tree.map(lambda x: host.params * 3 if np.ndim(x) == 1 else x,
                                             host.opt_state))  # the momentum
  return variables, tx, host


@pytest.mark.parametrize("shard_state", [False, True], ids=["replicated", "fsdp"])
def test_a_checkpoint_holds_named_trees_that_plain_orbax_reads(tmp_path, shard_state):
  mesh = sharding.make_mesh()
  variables, tx, host = _gelan_t_state(mesh)
  split = train_state.parameter_shaped(host, tx) if shard_state else None
  state = sharding.put_state(host, mesh, split)
  if shard_state:  # the weights, their EMA, the gradient sum and the momentum; nothing else
    split_leaves = [leaf for leaf, is_split in zip(jax.tree.leaves(host), jax.tree.leaves(split))
                    if is_split]
    assert len(split_leaves) == 4 and all(leaf.shape == host.params.shape for leaf in split_leaves)
    assert state.grad_sum.sharding.spec == jax.sharding.PartitionSpec(sharding.DATA_AXIS)
  form = train_state.CheckpointForm(tx)
  checkpoints = checkpoint.Checkpoints(tmp_path, form=form)
  checkpoints.save(state, {"note": 1}, wait=True)
  checkpoints.close()

  # Plain orbax, no model code: the keys are interop's module names.
  plain = ocp.StandardCheckpointer().restore(tmp_path / checkpoint.LAST / "5" / "state")
  for name, scale in (("params", 1.0), ("ema_params", 0.5), ("grad_sum", 2.0)):
    np.testing.assert_array_equal(plain[name]["model_0"]["conv"]["kernel"],
                                  variables["params"]["model_0"]["conv"]["kernel"] * scale)
  np.testing.assert_array_equal(plain["ema_batch_stats"]["model_0"]["bn"]["mean"],
                                variables["batch_stats"]["model_0"]["bn"]["mean"] + 1)
  momentum = plain["opt_state"][2]["inner_state"]["trace"]
  np.testing.assert_array_equal(momentum["model_2"]["cv1"]["conv"]["kernel"],
                                variables["params"]["model_2"]["cv1"]["conv"]["kernel"] * 3)
  assert int(plain["iteration"]) == 5

  # A new process's manager restores it into the fresh state's layout and shardings exactly.
  fresh = sharding.put_state(jax.device_get(train_state.create(
      variables, host.layout, tx, accumulate=True)), mesh, split)
  checkpoints = checkpoint.Checkpoints(tmp_path, form=form)
  restored, meta = checkpoints.restore_latest(fresh)
  assert meta == {"note": 1}
  for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(host)):
    np.testing.assert_array_equal(got, want)
  assert restored.params.sharding == fresh.params.sharding
  checkpoints.close()


def test_a_checkpoint_of_flat_vectors_from_before_still_resumes(tmp_path, capsys):
  mesh = sharding.make_mesh()
  variables, tx, host = _gelan_t_state(mesh)
  state = sharding.put_state(host, mesh)
  old = checkpoint.Checkpoints(tmp_path)  # no form: the state's flat vectors, as written before
  old.save(state, {"note": "old"}, wait=True)
  old.close()
  checkpoints = checkpoint.Checkpoints(tmp_path, form=train_state.CheckpointForm(tx))
  fresh = sharding.put_state(jax.device_get(train_state.create(
      variables, host.layout, tx, accumulate=True)), mesh)
  restored, meta = checkpoints.restore_latest(fresh)
  assert meta == {"note": "old"}
  for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(host)):
    np.testing.assert_array_equal(got, want)
  assert "holds flat vectors (written before checkpoints held named trees)" in capsys.readouterr().out
  checkpoints.close()
