"""The official optimisation recipe (FACTS.md §6.3-6.5): SGD with Nesterov momentum, three
parameter groups, per-iteration warm-up, a linear per-epoch decay, gradient accumulation up to the
nominal batch of 64, clipping at norm 10 and an EMA of the weights.

Iterations (``iteration``) count train steps, i.e. global batches, as the official loop counts
its (micro-)batches; the optimizer updates when ``accumulate`` of them have been summed.
"""
import jax.numpy as jnp
import ml_collections
import optax


def default_config() -> ml_collections.ConfigDict:
  """hyp.scratch-high.yaml's optimiser values and the official training-loop constants."""
  return ml_collections.ConfigDict(dict(
      lr0=0.01,               # SGD learning rate at the start of the decay
      lrf=0.01,               # final learning rate = lr0 * lrf (linear decay over the epochs)
      momentum=0.937,         # Nesterov
      weight_decay=5e-4,      # on conv kernels only, scaled by batch * accumulate / 64
      warmup_epochs=3.0,
      warmup_min_iterations=100,  # the official floor on the warm-up length
      warmup_momentum=0.8,
      warmup_bias_lr=0.1,     # biases start high and come down to lr0 during warm-up
      max_grad_norm=10.0,
      ema_decay=0.9999,
      ema_ramp_updates=2000,  # decay(u) = ema_decay * (1 - exp(-u / ramp))
      nominal_batch_size=64,  # the official nbs: images per optimizer update (accumulated)
  ))


def max_accumulate(config, global_batch_size):
  """Train steps summed per optimizer update after warm-up: round(64 / batch), at least 1."""
  return max(round(config.nominal_batch_size / global_batch_size), 1)


def scaled_weight_decay(config, global_batch_size):
  """The official weight decay scaled to the images per optimizer update (batch 128: 1e-3)."""
  return (config.weight_decay * global_batch_size * max_accumulate(config, global_batch_size) /
          config.nominal_batch_size)


def warmup_iterations(config, steps_per_epoch):
  """The official nw: max(round(warmup_epochs x batches per epoch), the 100-iteration floor)."""
  return max(round(config.warmup_epochs * steps_per_epoch), config.warmup_min_iterations)


def linear_factor(epoch, config, total_epochs):
  """The official lf(e) = (1 - e / E)(1 - lrf) + lrf."""
  return (1 - epoch / total_epochs) * (1 - config.lrf) + config.lrf


def hyperparameters(iteration, config, steps_per_epoch, total_epochs, global_batch_size):
  """Learning rates, momentum and the accumulation count at ``iteration`` (int or int array),
  exactly as the official loop sets them (FACTS.md §6.4).

  Returns dict(lr_bias, lr_weights, momentum, accumulate). Iterations 0..nw (nw included, the
  official ``if ni <= nw``) are the warm-up: a linear ramp over [0, nw] from (warmup_bias_lr for
  biases, 0 for the other groups, warmup_momentum, 1 step per update) to (lr0 lf(e), lr0 lf(e),
  momentum, 64 / batch) with e the iteration's epoch. After it the official LambdaLR runs one
  epoch late (``last_epoch = start_epoch - 1``, stepped after each epoch): the rest of the epoch
  w that holds nw keeps the warm-up's last value lr0 lf(w), and every later epoch e trains at
  lr0 lf(e - 1). A pure function of the iteration, so a run resumed at any step continues exactly.
  """
  iteration = jnp.asarray(iteration, jnp.int32)
  epoch = iteration // steps_per_epoch
  warmup = warmup_iterations(config, steps_per_epoch)
  in_warmup = iteration <= warmup
  lr_epoch = jnp.where(in_warmup, epoch, jnp.maximum(epoch - 1, warmup // steps_per_epoch))
  lr = config.lr0 * linear_factor(lr_epoch.astype(jnp.float32), config, total_epochs)
  fraction = (jnp.clip(iteration.astype(jnp.float32) / warmup, 0.0, 1.0) if warmup > 0
              else jnp.ones_like(lr))
  ramp = lambda start, end: jnp.where(in_warmup, start + (end - start) * fraction, end)
  # np.interp(...).round() as the official code: halves to even, as jnp.round.
  accumulate = jnp.maximum(jnp.round(ramp(1.0, config.nominal_batch_size / global_batch_size)), 1.0)
  return dict(lr_bias=ramp(config.warmup_bias_lr, lr), lr_weights=ramp(0.0, lr),
              momentum=ramp(config.warmup_momentum, config.momentum),
              accumulate=accumulate.astype(jnp.int32))


def update_due(iteration, last_update_iteration, accumulate):
  """The official ``ni - last_opt_step >= accumulate``: this step's summed gradients update the
  weights (``last_update_iteration`` is -1 before the first update)."""
  return iteration - last_update_iteration >= accumulate


def make_optimizer(config, global_batch_size):
  """For the flat parameter vector of ``state.TrainState``: clip -> coupled weight decay on conv
  kernels -> Nesterov momentum, as PyTorch's SGD computes it (buffer = m buffer + g;
  update = g + m buffer). The momentum is set every update from the schedule (``with_momentum``);
  learning rates are applied per group by ``scale_by_lr``, after the momentum, exactly where
  PyTorch's SGD applies them. Group 2 (BatchNorm gamma) has neither decay nor the bias warm-up.

  The weight decay reads which entries are conv kernels from an extra argument:
  ``tx.update(grads, opt_state, params, kernel_mask=kernel_mask)``.
  """
  return optax.chain(
      optax.clip_by_global_norm(config.max_grad_norm),
      _kernel_weight_decay(scaled_weight_decay(config, global_batch_size)),
      optax.inject_hyperparams(optax.trace)(decay=config.momentum, nesterov=True),
  )


def _kernel_weight_decay(weight_decay):
  """PyTorch's coupled weight decay (g + wd p) on the entries of the flat parameter vector that
  ``kernel_mask`` marks; optax's own ``masked`` selects whole leaves, not entries of one."""
  def update(updates, state, params, *, kernel_mask, **unused_extra_args):
    return updates + weight_decay * jnp.where(kernel_mask, params, 0.0), state
  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def with_momentum(opt_state, momentum):
  """``opt_state`` of ``make_optimizer`` with the momentum of this update (the trace's injected
  hyperparameter ``decay``, found by name)."""
  return optax.tree_utils.tree_set(opt_state, decay=momentum)


def scale_by_lr(updates, lr_bias, lr_weights, bias_mask):
  """Parameter deltas: -lr x update, with the bias group's own learning rate."""
  return -jnp.where(bias_mask, lr_bias, lr_weights) * updates


def ema_decay(updates_count, config):
  """The official EMA decay after ``updates_count`` optimizer updates (counted before use)."""
  return config.ema_decay * (1 - jnp.exp(-updates_count / config.ema_ramp_updates))
