"""The official recipe's schedule, the train step, and its sharding over simulated devices."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from conftest import REPO_ROOT, slow_test

from configs import common
from yolov9_jax import sharding
from yolov9_jax.training import optimizer as optim
from yolov9_jax.training import program
from yolov9_jax.training import state as train_state


class _OfficialLoop:
  """The official train.py / train_dual.py schedule, transcribed from its loop (FACTS.md §6.4)
  with numpy: LambdaLR semantics (at construction the scheduler steps once to last_epoch 0 and
  sets lr = initial_lr lf(0); the trainer then sets ``last_epoch = start_epoch - 1`` and steps it
  after every epoch), the warm-up ``if ni <= nw`` with np.interp per parameter group, and the
  optimizer step when ``ni - last_opt_step >= accumulate``."""

  def __init__(self, nb, epochs, batch, lr0, lrf=0.01, nbs=64, warmup_floor=100):
    self.nb, self.epochs, self.batch, self.nbs = nb, epochs, batch, nbs
    self.lf = lambda x: (1 - x / epochs) * (1.0 - lrf) + lrf
    self.initial_lr = [lr0] * 3                                  # groups: biases, weights, BN gammas
    self.lr = [initial * self.lf(0) for initial in self.initial_lr]  # LambdaLR's first step
    self.momentum = 0.937
    self.nw = max(round(3.0 * nb), warmup_floor)

  def run(self):
    """Per iteration: (lr of groups 0, 1, 2, momentum, accumulate, optimizer stepped)."""
    last_epoch = -1  # scheduler.last_epoch = start_epoch - 1
    accumulate, last_opt_step, rows = max(round(self.nbs / self.batch), 1), -1, []
    for epoch in range(self.epochs):
      for i in range(self.nb):
        ni = i + self.nb * epoch
        if ni <= self.nw:
          xi = [0, self.nw]
          accumulate = max(1, np.interp(ni, xi, [1, self.nbs / self.batch]).round())
          self.lr = [np.interp(ni, xi, [0.1 if j == 0 else 0.0, initial * self.lf(epoch)])
                     for j, initial in enumerate(self.initial_lr)]
          self.momentum = np.interp(ni, xi, [0.8, 0.937])
        stepped = ni - last_opt_step >= accumulate
        if stepped:
          last_opt_step = ni
        rows.append((*self.lr, self.momentum, accumulate, stepped))
      last_epoch += 1  # scheduler.step()
      self.lr = [initial * self.lf(last_epoch) for initial in self.initial_lr]
    return np.array(rows, np.float64)


RECIPES = {  # name: (batches per epoch, epochs, global batch, lr0, nominal batch, warm-up floor)
    "demo": (64, 16, 8, 0.02, 8, 0),          # configs/shapes_demo.py
    "coco": (1849, 500, 64, 0.01, 64, 100),   # configs/coco.py: COCO train2017 at batch 64
    "coco_batch16": (7393, 8, 16, 0.01, 64, 100),  # accumulation ramps 1 -> 4 in the warm-up
    "short": (30, 30, 32, 0.01, 64, 100),     # the 100-iteration floor: nw = 100, mid-epoch 3
}


@pytest.mark.parametrize("recipe_name", sorted(RECIPES))
def test_schedule_equals_the_official_loop_at_every_iteration(recipe_name):
  nb, epochs, batch, lr0, nbs, floor = RECIPES[recipe_name]
  official = _OfficialLoop(nb, epochs, batch, lr0, nbs=nbs, warmup_floor=floor).run()
  recipe = optim.default_config()
  recipe.update(lr0=lr0, nominal_batch_size=nbs, warmup_min_iterations=floor)
  iterations = np.arange(nb * epochs)
  got = jax.device_get(optim.hyperparameters(iterations, recipe, nb, epochs, batch))
  for column, name in enumerate(("lr_bias", "lr_weights", "lr_weights", "momentum")):
    np.testing.assert_allclose(got[name], official[:, column], rtol=2e-6, atol=1e-9, err_msg=name)
  np.testing.assert_array_equal(got["accumulate"], official[:, 4])
  # The update decisions of the train step (optim.update_due) over the whole run.
  last_update, updated = -1, []
  for iteration, accumulate in zip(iterations, got["accumulate"]):
    updated.append(bool(optim.update_due(iteration, last_update, accumulate)))
    last_update = iteration if updated[-1] else last_update
  np.testing.assert_array_equal(updated, official[:, 5].astype(bool))
  # Resume at any step: the schedule is a function of the iteration alone.
  for start in (1, nb - 1, 3 * nb + 7, len(iterations) - 3):
    resumed = optim.hyperparameters(np.arange(start, start + 3), recipe, nb, epochs, batch)
    np.testing.assert_array_equal(jax.device_get(resumed["lr_weights"]),
                                  got["lr_weights"][start:start + 3])


def test_the_demo_logs_the_official_learning_rates():
  """The official results.csv of the demo recipe at 16 epochs (lr0 0.02, nw = 192 = 3 x 64) logs
  0.016287 at epochs 3 and 4, 0.01505 at epoch 5, ..., 0.002675 at the last epoch 15 (the
  learning rate of each epoch's last iteration): our schedule gives these. The demo now trains
  17 epochs; its own log (train.py logs the step's learning rate every 16 steps, so step
  64 (e + 1) carries epoch e's last iteration) equals the official loop's for its length."""
  from configs import shapes_demo
  config = shapes_demo.get_config()
  nb = config.data.shapes.num_train // config.train.batch_size
  batch, lr0 = config.train.batch_size, config.optimizer.lr0
  last_of_16_epochs = np.arange(1, 17) * nb - 1
  lrs = jax.device_get(optim.hyperparameters(last_of_16_epochs, config.optimizer, nb, 16,
                                             batch))["lr_weights"]
  official = {3: 0.016287, 4: 0.016287, 5: 0.01505, 15: 0.002675}
  for epoch, lr in official.items():
    assert abs(lrs[epoch] - lr) < 6e-7, (epoch, lrs[epoch], lr)
  demo_log = REPO_ROOT / "runs" / "shapes_demo" / "metrics.jsonl"
  if demo_log.exists():  # CI runs the demo before the tests
    epochs = config.train.epochs
    official_run = _OfficialLoop(nb, epochs, batch, lr0, nbs=config.optimizer.nominal_batch_size,
                                 warmup_floor=config.optimizer.warmup_min_iterations).run()
    rows = [json.loads(line) for line in demo_log.read_text().splitlines()]
    logged = {row["step"]: row["train/lr"] for row in rows if "train/lr" in row}
    assert len(logged) == epochs * nb // config.train.log_every_steps
    for step, lr in logged.items():
      np.testing.assert_allclose(lr, official_run[step - 1, 1], rtol=2e-6,
                                 err_msg=f"{demo_log} step {step} (from another version? delete it)")


def test_sgd_update_is_pytorch_nesterov_with_coupled_decay_and_group_lrs():
  variables = {"params": {"conv": {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5])},
                          "bn": {"scale": jnp.array([1.5])}}, "batch_stats": {"mean": jnp.zeros(1)}}
  layout = train_state.Layout.of(variables)
  bias_mask, kernel_mask = layout.masks()
  # ravel order is sorted by key: bn/scale, conv/bias, conv/kernel (2)
  np.testing.assert_array_equal(bias_mask, [False, True, False, False])
  np.testing.assert_array_equal(kernel_mask, [False, False, True, True])
  params = jnp.array([1.5, 0.5, 1.0, -2.0])
  grads = jnp.full(4, 0.1)
  tx = optim.make_optimizer(optim.default_config(), 64)
  opt_state = tx.init(params)
  buffer, expected = np.zeros(4), np.asarray(params, np.float64)
  for momentum, lr_bias, lr in [(0.8, 0.1, 0.0), (0.9, 0.05, 0.01)]:
    updates, opt_state = tx.update(grads, optim.with_momentum(opt_state, momentum), params,
                                   kernel_mask=kernel_mask)
    params = params + optim.scale_by_lr(updates, lr_bias, lr, bias_mask)
    # torch.optim.SGD(nesterov=True): g += wd p (kernels); buf = m buf + g; p -= lr (g + m buf)
    g = 0.1 + 5e-4 * expected * kernel_mask
    buffer = momentum * buffer + g
    expected = expected - np.where(bias_mask, lr_bias, lr) * (g + momentum * buffer)
  np.testing.assert_allclose(params, expected, rtol=1e-6)
  assert layout.variables(params, jnp.zeros(1))["params"]["conv"]["kernel"].shape == (2,)


def _batch(batch_size, size, num_boxes=3, seed=0):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, size * 0.6, (batch_size, num_boxes, 2))
  wh = rng.uniform(size * 0.1, size * 0.4, (batch_size, num_boxes, 2))
  return {"images": rng.integers(0, 256, (batch_size, size, size, 3)).astype(np.uint8),
          "boxes": np.concatenate([xy, xy + wh], -1).astype(np.float32),
          "classes": rng.integers(0, 20, (batch_size, num_boxes)).astype(np.int32),
          "valid": np.ones((batch_size, num_boxes), bool)}


def _program(variables, mesh, shard_state=False):
  """train.py's program for gelan-t with 20 classes in float64, batch 8, 3 epochs of 10 steps."""
  config = common.base()
  config.model.update(name="gelan-t", dtype="float64")
  config.train.update(batch_size=8, epochs=3, shard_state=shard_state)
  return program.build(config, variables, mesh, num_classes=20, steps_per_epoch=10)


@pytest.mark.parametrize("shard_state", [False, pytest.param(True, marks=slow_test)],
                         ids=["replicated", "fsdp"])
def test_a_step_sharded_over_8_devices_equals_the_single_device_step(gelan_t_20_classes, shard_state):
  """Compute in float64: in float32 the two orders of summation in the synchronised BatchNorm's
  backward pass already differ by 5e-4 of the gradient's scale (measured), which says nothing
  about the sharding; in float64 they agree to 4e-8 (the float32 rounding of the results)."""
  _, variables = gelan_t_20_classes
  batch = _batch(8, 64)
  results = []
  with jax.enable_x64(True):
    for devices, sharded in ((jax.devices()[:1], False), (jax.devices(), shard_state)):
      mesh = sharding.make_mesh(devices)
      training = _program(variables, mesh, sharded)
      # At iteration 100 (end of warm-up) batch 8 accumulates 8 steps per update: the first step
      # only adds its gradients to the sum (7 since the last update), the second updates with
      # the sum of both.
      state = training.host_state.replace(iteration=np.int32(100), last_update_iteration=np.int32(93))
      state = sharding.put_state(state, mesh, training.split)
      if sharded:
        padded_size = training.host_state.layout.padded_size
        assert state.params.sharding.shard_shape(state.params.shape)[0] == padded_size // 8
      step = training.step
      seen = []
      for _ in range(2):
        state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
        seen.append((jax.device_get(state.grad_sum), jax.device_get(metrics)))
      assert [bool(m["updated"]) for _, m in seen] == [False, True] and bool(seen[1][1]["finite"])
      assert training.compilations == 1
      results.append((jax.device_get(state), seen))
  (single, single_seen), (sharded, sharded_seen) = results
  size = single.layout.parameter_count
  for (_, metrics), (_, single_metrics) in zip(sharded_seen, single_seen):
    for name in ("loss", "box", "cls", "dfl", "grad_norm"):
      np.testing.assert_allclose(metrics[name], single_metrics[name], rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(sharded_seen[0][0][:size], single_seen[0][0][:size], rtol=1e-5,
                             atol=1e-5 * np.abs(single_seen[0][0]).max(), err_msg="gradients")
  for name in ("params", "batch_stats", "ema_params", "ema_batch_stats"):
    np.testing.assert_allclose(getattr(sharded, name)[:size], getattr(single, name)[:size],
                               rtol=1e-5, atol=1e-7, err_msg=name)
  fresh = train_state.create(variables, single.layout, training.tx, False)
  assert not np.allclose(single.params, fresh.params)


def test_host_vectors_unravel_with_numpy_into_the_trees_jax_unravels(gelan_t_20_classes):
  """The evaluation's EMA weights and a checkpoint read for export are NumPy vectors: cut with
  NumPy (no program compiled), they must give the trees jnp's unravel gives, leaf by leaf."""
  _, variables = gelan_t_20_classes
  layout = train_state.Layout.of(variables, pad_to=8)
  params = np.asarray(layout.flatten_params(variables["params"]))
  params = params + np.arange(params.size, dtype=params.dtype)  # no two entries alike
  batch_stats = np.asarray(ravel_pytree(variables["batch_stats"])[0])
  assert params.size > layout.parameter_count  # padded: the padding is dropped
  on_host = layout.variables(params, batch_stats)
  with_jax = layout.variables(jnp.asarray(params), jnp.asarray(batch_stats))
  assert jax.tree.structure(on_host) == jax.tree.structure(with_jax)
  for host_leaf, jax_leaf in zip(jax.tree.leaves(on_host), jax.tree.leaves(with_jax)):
    assert isinstance(host_leaf, np.ndarray) and host_leaf.dtype == jax_leaf.dtype
    np.testing.assert_array_equal(host_leaf, np.asarray(jax_leaf))


def test_a_nonfinite_step_changes_nothing_but_the_counters(gelan_t_20_classes):
  """In float64 on 8 devices, as the sharded-step test above."""
  _, variables = gelan_t_20_classes
  with jax.enable_x64(True):
    mesh = sharding.make_mesh()
    training = _program(variables, mesh)
    state = training.state_on(mesh)
    step = training.step
    batch = jax.device_put(_batch(8, 64), sharding.batch_sharding(mesh))
    good = jax.device_get(state).replace(iteration=np.int32(100), last_update_iteration=np.int32(92))
    poisoned = good.replace(params=np.concatenate([[np.nan], good.params[1:]]).astype(np.float32))
    state, metrics = step(sharding.put_state(poisoned, mesh), batch)
    after = jax.device_get(state)
    assert not metrics["finite"] and not metrics["updated"]
    assert int(after.nonfinite_steps) == 1 and int(after.consecutive_nonfinite) == 1
    for name in ("batch_stats", "grad_sum", "ema_params", "ema_batch_stats", "last_update_iteration"):
      np.testing.assert_array_equal(getattr(after, name), getattr(poisoned, name), err_msg=name)
    np.testing.assert_array_equal(after.params[1:], poisoned.params[1:])
    assert int(after.iteration) == 101  # the data moves on
    # The next finite step updates again and resets the run of non-finite steps.
    state, metrics = step(sharding.put_state(after.replace(params=good.params), mesh), batch)
    assert metrics["finite"] and metrics["updated"]
    assert int(state.consecutive_nonfinite) == 0 and int(state.nonfinite_steps) == 1
