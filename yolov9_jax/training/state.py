"""The train state: everything a run needs to continue exactly, as one pytree.

Parameters, BatchNorm statistics, their EMA, the momentum and the gradient sum are each kept as
one flat float32 vector (``Layout`` maps them to and from the model's variable trees). The
optimizer and the EMA are then a handful of vector operations instead of a few per leaf: for
gelan-t's 1,117 leaves that cuts the train step's compile time by more than half, and a flat
vector is also the simplest thing to shard.
"""
import dataclasses
import functools
import re
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

_CLASS_BRANCH = re.compile(r"^cv[35]_\d+_\d+$")  # the heads' class convs, official cv3/cv5.<level>.<k>


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """How the flat vectors map to the variable trees, and which entries are in which group."""
  unravel_params: Callable
  unravel_batch_stats: Callable
  padded_size: int         # the flat parameter vectors' length: padded to split evenly (FSDP)
  bias_leaves: tuple       # official group 0: every bias (BatchNorm beta and conv biases)
  kernel_leaves: tuple     # official group 1: conv kernels, the only ones with weight decay
  params_shapes: Any       # ShapeDtypeStruct trees of the unravelled forms
  batch_stats_shapes: Any

  @property
  def leaf_sizes(self):
    """The parameter leaves' sizes, in ravel order."""
    return tuple(leaf.size for leaf in jax.tree.leaves(self.params_shapes))

  @property
  def parameter_count(self):
    """The flat parameter vectors' length before padding."""
    return sum(self.leaf_sizes)

  @classmethod
  def of(cls, variables, pad_to=1):
    """``pad_to``: the flat parameter vectors' length is made a multiple of it (the number of
    devices they are split over), with zeros that no weight reads."""
    _, unravel_params = ravel_pytree(variables["params"])
    _, unravel_batch_stats = ravel_pytree(variables["batch_stats"])
    paths = jax.tree_util.tree_leaves_with_path(variables["params"])
    last = [path[-1].key for path, _ in paths]
    sizes = tuple(int(np.size(x)) for _, x in paths)
    shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)
    return cls(unravel_params, unravel_batch_stats, -(-sum(sizes) // pad_to) * pad_to,
               tuple(name == "bias" for name in last), tuple(name == "kernel" for name in last),
               shapes(variables["params"]), shapes(variables["batch_stats"]))

  def flatten_params(self, params):
    flat, _ = ravel_pytree(params)
    return jnp.pad(flat, (0, self.padded_size - flat.size))

  def masks(self):
    """(bias, kernel) boolean vectors over the flat parameters. They live in the state, not in
    the compiled step: as constants XLA would spend minutes folding them."""
    padding = self.padded_size - self.parameter_count
    per_entry = lambda flags: np.pad(np.repeat(np.asarray(flags), self.leaf_sizes), (0, padding))
    return per_entry(self.bias_leaves), per_entry(self.kernel_leaves)

  def variables(self, params, batch_stats):
    """The variable trees of flat vectors: NumPy views of NumPy vectors (the evaluation's EMA
    weights, a checkpoint read for export), else jax.numpy (inside the jitted step). Eagerly, jnp
    would compile a program of ~1,000 slices for what is a copy (gelan-t: 12 s on this CPU)."""
    if isinstance(params, np.ndarray) and isinstance(batch_stats, np.ndarray):
      return {"params": _split_on_host(params, self.params_shapes),
              "batch_stats": _split_on_host(batch_stats, self.batch_stats_shapes)}
    return {"params": self.unravel_params(params[:self.parameter_count]),
            "batch_stats": self.unravel_batch_stats(batch_stats)}


def _split_on_host(flat, shapes):
  """``shapes``' tree (ShapeDtypeStruct leaves) cut from the front of the NumPy vector ``flat``
  in ravel_pytree's order (the tree's leaf order)."""
  leaves, treedef = jax.tree.flatten(shapes)
  ends = np.cumsum([leaf.size for leaf in leaves], dtype=np.int64)
  pieces = np.split(flat[:sum(leaf.size for leaf in leaves)], ends[:-1])
  return treedef.unflatten([piece.reshape(leaf.shape).astype(leaf.dtype, copy=False)
                            for piece, leaf in zip(pieces, leaves)])


class TrainState(flax.struct.PyTreeNode):
  iteration: jax.Array          # train steps done (global batches); the data position
  params: jax.Array             # flat, see Layout
  batch_stats: jax.Array
  opt_state: tuple
  grad_sum: jax.Array           # gradients summed since the last update (None: no accumulation)
  last_update_iteration: jax.Array  # the official last_opt_step, -1 before the first update
  ema_params: jax.Array
  ema_batch_stats: jax.Array
  ema_updates: jax.Array        # optimizer updates so far (drives the EMA decay ramp)
  nonfinite_steps: jax.Array    # steps skipped for a non-finite loss or gradient, in total
  consecutive_nonfinite: jax.Array
  bias_mask: jax.Array          # official group 0 entries of the flat parameters (Layout.masks)
  kernel_mask: jax.Array        # official group 1 entries: conv kernels, with weight decay
  layout: Layout = flax.struct.field(pytree_node=False)


def create(variables, layout, tx, accumulate):
  """A fresh state from model variables (``layout = Layout.of(variables)``, ``tx`` from
  ``optimizer.make_optimizer``); ``accumulate`` allocates the gradient sum."""
  params = layout.flatten_params(variables["params"])
  batch_stats, _ = ravel_pytree(variables["batch_stats"])
  int32 = lambda v: jnp.asarray(v, jnp.int32)
  bias_mask, kernel_mask = layout.masks()
  return TrainState(
      iteration=int32(0), params=params, batch_stats=batch_stats, opt_state=tx.init(params),
      grad_sum=jnp.zeros_like(params) if accumulate else None, last_update_iteration=int32(-1),
      ema_params=params, ema_batch_stats=batch_stats, ema_updates=int32(0),
      nonfinite_steps=int32(0), consecutive_nonfinite=int32(0), bias_mask=bias_mask,
      kernel_mask=kernel_mask, layout=layout)


def parameter_shaped(state, tx):
  """A tree of bools like ``state``: True at its flat parameter-length vectors (the weights, their
  EMA, the gradient sum and the optimizer's per-parameter state, the momentum, as ``tx`` says),
  which ``shard_state`` splits over the devices; False elsewhere."""
  marks = jax.tree.map(lambda _: False, state)
  vectors = {name: jax.tree.map(lambda _: True, getattr(state, name)) for name in _PARAMETER_VECTORS}
  return marks.replace(**vectors, opt_state=optax.tree_map_params(
      tx, lambda _: True, state.opt_state, transform_non_params=lambda _: False))


def _is_class_head_leaf(path):
  """A leaf of a head's class branch: its last conv has one channel per class, and its width is
  max(channels, min(2 * classes, 128)) (``heads.head_widths``, FACTS.md §1.4), so small models'
  whole branch may change."""
  return any(_CLASS_BRANCH.match(str(getattr(p, "key", p))) for p in path)


def transfer(pretrained, fresh):
  """``fresh`` variables with every leaf that ``pretrained`` has at the same path and shape
  copied over: fine-tuning with another number of classes keeps everything but the class head.
  Returns (variables, paths kept fresh). A mismatch anywhere else is an error naming the leaves
  (the checkpoint is of another architecture)."""
  flat_pre = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(pretrained)}
  reinitialised, foreign = [], []

  def pick(path, fresh_leaf):
    key = jax.tree_util.keystr(path)
    old = flat_pre.get(key)
    if old is not None and np.shape(old) == np.shape(fresh_leaf):
      return jnp.asarray(old, fresh_leaf.dtype)
    (reinitialised if _is_class_head_leaf(path) else foreign).append(
        f"{key}: checkpoint {None if old is None else np.shape(old)}, model {np.shape(fresh_leaf)}")
    return fresh_leaf

  out = jax.tree_util.tree_map_with_path(pick, fresh)
  if foreign:
    raise ValueError("the checkpoint does not fit this architecture outside the class head: " +
                     "; ".join(foreign[:10]) + (f" (and {len(foreign) - 10} more)" if len(foreign) > 10 else ""))
  return out, reinitialised


# How a checkpoint holds a TrainState: each flat vector as the model's variable tree, by name
# (``params/model_0/conv/kernel``, the key names of ``interop``), so that any orbax user reads
# the weights without this package's layout; the flat vectors stay the step's business.
_PARAMETER_VECTORS = ("params", "ema_params", "grad_sum")
_STATISTICS_VECTORS = ("batch_stats", "ema_batch_stats")
_FROM_LAYOUT = ("bias_mask", "kernel_mask")  # rebuilt from the model, not saved


class _ParameterSlot:
  """Marks where the optimizer state holds a parameter-shaped vector (a pytree leaf)."""


def _identity(tree):
  return tree


@functools.lru_cache(maxsize=16)
def _placer(structure, sharding_leaves):
  return jax.jit(_identity, out_shardings=jax.tree.unflatten(structure, sharding_leaves))


def _placed(tree, shardings):
  """``tree``'s arrays laid out by ``shardings`` (the same tree of ``jax.sharding.Sharding``s)."""
  sharding_leaves, structure = jax.tree.flatten(shardings)
  if all(leaf.sharding == want for leaf, want in zip(jax.tree.leaves(tree), sharding_leaves)):
    return tree
  return _placer(structure, tuple(sharding_leaves))(tree)


def _replicated_like(tree):
  return jax.tree.map(
      lambda x: jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec()), tree)


class CheckpointForm:
  """``to_tree(state)`` -> the named-tree checkpoint form; ``from_tree(tree, template)`` -> the
  state again, laid out and sharded as ``template``; ``abstract_tree(template)`` -> what to restore
  into. ``tx`` (the run's optimizer) says which optimizer-state entries are parameter-shaped
  (``optax.tree_map_params``)."""

  def __init__(self, tx):
    self.tx = tx
    self._to_tree = jax.jit(self._unravel)
    self._from_tree = jax.jit(self._ravel)

  def _unravel(self, state):
    layout = state.layout
    unravel_params = lambda flat: layout.unravel_params(flat[:layout.parameter_count])
    tree = {}
    for field in dataclasses.fields(TrainState):
      value = getattr(state, field.name)
      if field.name == "layout" or field.name in _FROM_LAYOUT or value is None:
        continue
      if field.name in _PARAMETER_VECTORS:
        value = unravel_params(value)
      elif field.name in _STATISTICS_VECTORS:
        value = layout.unravel_batch_stats(value)
      elif field.name == "opt_state":
        value = optax.tree_map_params(self.tx, unravel_params, value)
      tree[field.name] = value
    return tree

  def to_tree(self, state):
    # Gathered first: unravelling a vector split over the devices into the model's ~1,000 leaves
    # partitions every slice (gelan-t's FSDP state took 15 min to compile on 8 CPU devices);
    # replicated it is the replicated program. The gather holds one full copy per device while
    # the checkpoint is taken.
    return self._to_tree(_placed(state, _replicated_like(state)))

  def abstract_tree(self, template):
    """ShapeDtypeStructs of ``to_tree(template)``, replicated over ``template``'s mesh."""
    replicated = jax.sharding.NamedSharding(template.params.sharding.mesh,
                                            jax.sharding.PartitionSpec())
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                        jax.eval_shape(self._unravel, template))

  def from_tree(self, tree, template):
    """The TrainState of checkpoint ``tree``, with ``template``'s layout, masks and shardings."""
    # Ravelled replicated, then split as the template is (see ``to_tree``).
    replicated = _placed(template, _replicated_like(template))
    return _placed(self._from_tree(tree, replicated), jax.tree.map(lambda x: x.sharding, template))

  def _ravel(self, tree, template):
    layout = template.layout
    slots = optax.tree_map_params(self.tx, lambda _: _ParameterSlot(), template.opt_state)
    values = {}
    for name, value in tree.items():
      if name in _PARAMETER_VECTORS:
        value = layout.flatten_params(value)
      elif name in _STATISTICS_VECTORS:
        value, _ = ravel_pytree(value)
      elif name == "opt_state":
        value = jax.tree.map(
            lambda slot, sub: layout.flatten_params(sub) if isinstance(slot, _ParameterSlot) else sub,
            slots, value, is_leaf=lambda x: isinstance(x, _ParameterSlot))
      values[name] = value
    return template.replace(**values)
