"""The official recipe's schedule, the train step, and its sharding over simulated devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import train_step_tests

from yolov9_jax import losses
from yolov9_jax.training import optimizer as optim
from yolov9_jax.training import sharding, state as train_state, step as train_step_lib


def _official_lr_momentum(ni, nb, epochs, batch, lr0=0.01, lrf=0.01):
  """FACTS.md §6.4 written out as the official loop does it, with numpy."""
  epoch = ni // nb
  lf = (1 - epoch / epochs) * (1.0 - lrf) + lrf
  nw = max(round(3.0 * nb), 100)
  lrs = [lr0 * lf] * 3  # bias, weights, BN gamma
  momentum, accumulate = 0.937, max(round(64 / batch), 1)
  if ni <= nw:
    accumulate = max(1, np.interp(ni, [0, nw], [1, 64 / batch]).round())
    lrs = [np.interp(ni, [0, nw], [0.1 if j == 0 else 0.0, lr0 * lf]) for j in range(3)]
    momentum = np.interp(ni, [0, nw], [0.8, 0.937])
  return lrs[0], lrs[1], momentum, accumulate


@pytest.mark.parametrize("batch", [16, 64, 128])
def test_schedule_equals_the_official_formulas(batch):
  recipe = optim.default_config()
  nb, epochs = 50, 20  # warm-up: max(150, 100) iterations
  for ni in [0, 1, 37, 99, 100, 149, 150, 151, 499, 500, 999]:
    got = optim.hyperparameters(ni, recipe, nb, epochs, batch)
    lr_bias, lr_weights, momentum, accumulate = _official_lr_momentum(ni, nb, epochs, batch)
    np.testing.assert_allclose(float(got["lr_bias"]), lr_bias, rtol=1e-6, err_msg=str(ni))
    np.testing.assert_allclose(float(got["lr_weights"]), lr_weights, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(got["momentum"]), momentum, rtol=1e-6)
    assert int(got["accumulate"]) == accumulate, (ni, batch)
  assert optim.scaled_weight_decay(recipe, batch) == {16: 5e-4, 64: 5e-4, 128: 1e-3}[batch]


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
    updates, opt_state = tx.update(grads, optim.with_momentum(opt_state, momentum), (params, kernel_mask))
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


def _step_fn(model, tx, batch_size, recipe=None):
  return train_step_lib.make_train_step(
      model, tx, num_classes=20, loss_config=losses.default_config(),
      recipe=recipe or optim.default_config(), steps_per_epoch=10, total_epochs=3,
      global_batch_size=batch_size)


@train_step_tests
@pytest.mark.parametrize("shard_state", [False, True], ids=["replicated", "fsdp"])
def test_a_step_sharded_over_8_devices_equals_the_single_device_step(gelan_t_20_classes, shard_state):
  model, variables = gelan_t_20_classes
  batch = _batch(8, 64)
  tx = optim.make_optimizer(optim.default_config(), 8)
  results = []
  for devices, sharded in ((jax.devices()[:1], False), (jax.devices(), shard_state)):
    mesh = sharding.make_mesh(devices)
    layout = train_state.Layout.of(variables, pad_to=mesh.size if sharded else 1)
    state = sharding.put_state(train_state.create(variables, layout, tx, accumulate=True), mesh, sharded)
    if sharded:
      assert state.params.sharding.shard_shape(state.params.shape)[0] == layout.padded_size // 8
    step = sharding.jit_train_step(_step_fn(model, tx, 8), state, mesh, sharded)
    # At iteration 100 (end of warm-up) batch 8 accumulates 8 steps per update: the first step
    # updates (8 since the last), the second only adds its gradients to the sum.
    state = state.replace(iteration=jnp.asarray(100), last_update_iteration=jnp.asarray(92))
    updated = []
    for _ in range(2):
      state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
      updated.append(bool(metrics["updated"]))
    assert updated == [True, False] and bool(metrics["finite"])
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (single, single_metrics), (sharded, sharded_metrics) = results
  size = sum(single.layout.leaf_sizes)
  np.testing.assert_allclose(sharded_metrics["loss"], single_metrics["loss"], rtol=1e-5)
  for name in ("params", "batch_stats", "ema_params", "grad_sum"):
    np.testing.assert_allclose(getattr(sharded, name)[:size], getattr(single, name)[:size],
                               rtol=1e-5, atol=1e-6, err_msg=name)
  fresh = train_state.create(variables, single.layout, tx, False)
  assert not np.allclose(single.params, fresh.params)


@train_step_tests
def test_a_nonfinite_step_changes_nothing_but_the_counters(gelan_t_20_classes):
  model, variables = gelan_t_20_classes
  tx = optim.make_optimizer(optim.default_config(), 8)
  layout = train_state.Layout.of(variables)
  mesh = sharding.make_mesh()
  state = sharding.put_state(train_state.create(variables, layout, tx, accumulate=True), mesh)
  step = sharding.jit_train_step(_step_fn(model, tx, 8), state, mesh)
  batch = jax.device_put(_batch(8, 64), sharding.batch_sharding(mesh))
  good = jax.device_get(state.replace(iteration=jnp.asarray(100), last_update_iteration=jnp.asarray(92)))
  poisoned = good.replace(params=good.params.at[0].set(np.nan))
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
