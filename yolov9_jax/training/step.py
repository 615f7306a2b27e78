"""The train step: one global batch -> gradients of the main + auxiliary (PGI) loss -> maybe an
optimizer update (when ``accumulate`` steps are summed) -> EMA. A pure function of (state, batch);
jit it once with the shardings of ``yolov9_jax.sharding``."""
import functools

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from yolov9_jax import losses
from yolov9_jax.training import optimizer as optim


def train_step(state, batch, *, model, tx, num_classes, loss_config, recipe, steps_per_epoch,
               total_epochs, global_batch_size):
  """batch: "images" (B, S, S, 3) uint8, "boxes" (B, M, 4) xyxy pixels, "classes" (B, M) int32,
  "valid" (B, M) bool. Returns (new state, metrics: scalar jax arrays, not yet on the host)."""
  layout = state.layout
  image_size = batch["images"].shape[1:3]
  images = batch["images"].astype(model.dtype) / 255  # normalised on the device, as officially

  def loss_fn(params):
    maps, updates = model.apply(layout.variables(params, state.batch_stats), images, train=True,
                                mutable=["batch_stats"])
    total, parts = losses.compute_loss(maps, batch, num_classes=num_classes, image_size=image_size,
                                       config=loss_config)
    batch_stats, _ = ravel_pytree(updates["batch_stats"])
    return total, (parts, batch_stats)

  (total, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  finite = jnp.isfinite(total) & jnp.all(jnp.isfinite(grads))
  hyper = optim.hyperparameters(state.iteration, recipe, steps_per_epoch, total_epochs,
                                global_batch_size)
  grad_sum = grads if state.grad_sum is None else state.grad_sum + grads
  update_due = finite & optim.update_due(state.iteration, state.last_update_iteration,
                                          hyper["accumulate"])

  updates, opt_state = tx.update(grad_sum, optim.with_momentum(state.opt_state, hyper["momentum"]),
                                 state.params, kernel_mask=state.kernel_mask)
  params = state.params + optim.scale_by_lr(updates, hyper["lr_bias"], hyper["lr_weights"],
                                            state.bias_mask)
  # A finite gradient can still push weights to inf (a learning rate far too high): such an
  # update is refused and the step counts as non-finite.
  params_finite = jnp.all(jnp.isfinite(params))
  update_now = update_due & params_finite
  finite = finite & (params_finite | ~update_due)
  ema_updates = state.ema_updates + 1
  decay = optim.ema_decay(ema_updates, recipe)
  # BatchNorm statistics move with every finite step; the EMA averages them like the weights.
  batch_stats = jnp.where(finite, batch_stats, state.batch_stats)

  new_state = state.replace(
      iteration=state.iteration + 1,
      params=jnp.where(update_now, params, state.params),
      batch_stats=batch_stats,
      opt_state=jax.tree.map(lambda new, old: jnp.where(update_now, new, old), opt_state,
                             state.opt_state),
      grad_sum=None if state.grad_sum is None else jnp.where(
          update_now, 0.0, jnp.where(finite, grad_sum, state.grad_sum)),
      last_update_iteration=jnp.where(update_now, state.iteration, state.last_update_iteration),
      ema_params=jnp.where(update_now, decay * state.ema_params + (1 - decay) * params,
                           state.ema_params),
      ema_batch_stats=jnp.where(update_now, decay * state.ema_batch_stats + (1 - decay) * batch_stats,
                                state.ema_batch_stats),
      ema_updates=jnp.where(update_now, ema_updates, state.ema_updates),
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
      consecutive_nonfinite=jnp.where(finite, 0, state.consecutive_nonfinite + 1),
  )
  metrics = {"loss": total, **{k: v for k, v in parts.items() if not k.endswith("positives")},
             "lr": hyper["lr_weights"], "lr_bias": hyper["lr_bias"], "momentum": hyper["momentum"],
             "grad_norm": jnp.linalg.norm(grads), "finite": finite, "updated": update_now,
             "consecutive_nonfinite": new_state.consecutive_nonfinite}
  return new_state, metrics


def make_train_step(model, tx, *, num_classes, loss_config, recipe, steps_per_epoch, total_epochs,
                    global_batch_size):
  """``train_step`` with its static settings bound: f(state, batch) -> (state, metrics)."""
  return functools.partial(train_step, model=model, tx=tx, num_classes=num_classes,
                           loss_config=loss_config, recipe=recipe, steps_per_epoch=steps_per_epoch,
                           total_epochs=total_epochs, global_batch_size=global_batch_size)
