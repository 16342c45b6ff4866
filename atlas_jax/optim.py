"""Optimizer, learning-rate schedule, gradient accumulation and weight EMA for training Atlas.

The reference recipe (a PyTorch trainer on timm): AdamW with decoupled weight decay on weight matrices
and conv kernels only; linear warmup from 0 to `lr`, then cosine decay to `min_lr`, evaluated per
optimizer step; optional global-norm gradient clipping; gradients averaged over micro-batches; an
optional EMA of the weights. Everything here is a pure function of (config, arrays) and jits.

Config fields read, from a resolved config (atlas_jax.config checks their ranges): lr, min_lr, warmup_steps,
total_steps (optimizer steps, not micro-batches), weight_decay (on ndim > 1 leaves only),
optimizer.{b1, b2, eps, clip_grad_norm (0 = off), layer_decay (1 = off), trainable ('all' | 'head')},
ema.decay (0 = off). docs/finetuning.md: layer decay and head-only training.

Inside a jitted train step (sketch):
  micro_batches = split_micro_batches(batch, config.grad_accum_steps)
  (batch_stats, rng), loss, aux, grads = accumulated_grads(grad_fn, micro_batches, (batch_stats, rng), params)
  updates, opt_state = tx.update(grads, opt_state, params)  # tx = make_optimizer(config)
  params = optax.apply_updates(params, updates)
  ema_params = ema_update(ema_params, params, config.ema.decay)  # when ema_enabled(config)
"""

from collections.abc import Mapping
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from atlas_jax.models import param_tree

PyTree = Any


# ---------------------------------------------------------------------------------------------------
# Learning rate and optimizer.


def learning_rate_schedule(config) -> optax.Schedule:
  """Optimizer step (int or int array) -> learning rate (float32 scalar).

  Linear warmup lr * step / warmup_steps over [0, warmup_steps], then
  min_lr + (lr - min_lr) * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2,
  held at min_lr from total_steps on.
  """
  lr, min_lr = float(config.lr), float(config.min_lr)
  warmup_steps, total_steps = int(config.warmup_steps), int(config.total_steps)
  decay_steps = max(total_steps - warmup_steps, 1)  # warmup == total: min_lr from the step after

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warmup = lr * step / max(warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    # (1 + cos(pi p)) / 2 as cos(pi p / 2)^2: no cancellation near p = 1, so min_lr is hit accurately.
    cosine = min_lr + (lr - min_lr) * jnp.cos(0.5 * jnp.pi * progress) ** 2
    return jnp.where(step < warmup_steps, warmup, cosine).astype(jnp.float32)

  return schedule


def weight_decay_mask(params: PyTree) -> PyTree:
  """True for leaves that get weight decay: exactly those whose per-block shape has ndim > 1 (kernels).

  timm's `param_groups_weight_decay` exempts a parameter when `ndim <= 1` or its name ends in
  '.bias' (or it is in the model's no_weight_decay list, which the reference leaves empty). Every
  bias, LayerNorm/BatchNorm scale and bias, and the position-MLP's bias is 1-D there and here, and
  every Linear weight and Conv kernel is >= 2-D, so the shape rule alone reproduces its groups. The
  blocks of a stage are stacked on a leading axis (param_tree), which the rule does not count.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: len(_shape(leaf)) - param_tree.stacked_axes(path) > 1, params
  )


def _shape(leaf) -> tuple[int, ...]:
  """Shape of an array, a jax.ShapeDtypeStruct (from jax.eval_shape) or a python scalar."""
  return tuple(leaf.shape) if hasattr(leaf, 'shape') else np.shape(leaf)


def cast_to_float32() -> optax.GradientTransformation:
  """Casts updates to float32, so that bfloat16 gradients never lower the dtype of state or params."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u: u.astype(jnp.float32), updates))


_FIRST_LAYER = ('stem', 'global_position')  # id 0: everything before the first block
READOUT = 'readout'


def layer_ids(params: PyTree) -> PyTree:
  """The BEiT/timm layer id of every leaf (timm `param_groups_layer_decay`), the same tree.

  With L blocks in all (the stages' depths summed): the stem (and window_vit's `global_position`) 0;
  block j, counted from 1 across the stages in order, j; the readout L + 1. A stacked `stage{k}_blocks`
  leaf gets an int array (depth,), one id per block; other leaves a python int. Works on abstract leaves.
  """
  return _layer_ids(params)[0]


def _layer_ids(params: PyTree) -> tuple[PyTree, int]:
  """(layer_ids(params), L)."""
  depths = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    match = param_tree.STAGE_BLOCKS.fullmatch(_path_name(path[0]))
    if match:
      depths[int(match[1])] = _shape(leaf)[0]
  first_ids, next_id = {}, 1
  for stage in sorted(depths):  # stage order, not the tree's key order
    first_ids[stage], next_id = next_id, next_id + depths[stage]
  num_blocks = next_id - 1

  def leaf_id(path, leaf):
    name = _path_name(path[0])
    if name in _FIRST_LAYER:
      return 0
    if name == READOUT:
      return num_blocks + 1
    match = param_tree.STAGE_BLOCKS.fullmatch(name)
    if match:
      first = first_ids[int(match[1])]
      return np.arange(first, first + depths[int(match[1])])
    raise ValueError(f'layer decay: no layer id for the parameters under {name!r}')

  return jax.tree_util.tree_map_with_path(leaf_id, params), num_blocks


def layer_decay_scales(params: PyTree, layer_decay: float) -> PyTree:
  """layer_decay ** (L + 1 - id) per leaf: float32 scalars, or (depth, 1, ...) arrays for stacked leaves."""
  ids, num_blocks = _layer_ids(params)

  def scale(i, leaf):
    values = np.float32(layer_decay) ** (num_blocks + 1 - np.asarray(i)).astype(np.float32)
    return values.reshape(values.shape + (1,) * (len(_shape(leaf)) - values.ndim))

  return jax.tree.map(scale, ids, params)


def scale_by_layer_decay(layer_decay: float) -> optax.GradientTransformation:
  """Multiplies each leaf's update by its layer's scale. Stateless: the scales follow from the updates' paths
  and shapes (constants under jit). Placed after AdamW it scales the whole step, decoupled weight decay too,
  as timm scales each group's learning rate."""

  def update(updates, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, layer_decay_scales(updates, layer_decay))

  return optax.stateless(update)


def trainable_labels(params: PyTree) -> PyTree:
  """'train' for the readout's leaves, 'frozen' for the rest: optimizer.trainable='head'."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: 'train' if _path_name(path[0]) == READOUT else 'frozen', params
  )


def head_only(config) -> bool:
  """Whether optimizer.trainable='head': the readout trains, the backbone is frozen."""
  return config.optimizer.trainable == 'head'


def make_optimizer(config) -> optax.GradientTransformation:
  """float32 cast -> optional clip by global norm -> AdamW (decay masked to kernels), lr from the schedule
  -> optional layer-wise lr decay. With optimizer.trainable='head' only the readout has this optimizer (and
  state); the other leaves' updates are zero and keep no state."""
  transforms = [cast_to_float32()]
  if config.optimizer.clip_grad_norm:  # 0 = off
    transforms.append(optax.clip_by_global_norm(float(config.optimizer.clip_grad_norm)))
  transforms.append(
    optax.adamw(
      learning_rate=learning_rate_schedule(config),
      b1=float(config.optimizer.b1),
      b2=float(config.optimizer.b2),
      eps=float(config.optimizer.eps),
      mu_dtype=jnp.float32,
      weight_decay=float(config.weight_decay),
      mask=weight_decay_mask,
    )
  )
  layer_decay = float(config.optimizer.layer_decay)
  if layer_decay != 1.0:  # off: nothing added, the state as without it
    transforms.append(scale_by_layer_decay(layer_decay))
  optimizer = optax.chain(*transforms)
  if head_only(config):
    optimizer = optax.multi_transform({'train': optimizer, 'frozen': optax.set_to_zero()}, trainable_labels)
  return optimizer


# ---------------------------------------------------------------------------------------------------
# Gradient accumulation.


def split_micro_batches(batch: PyTree, k: int) -> PyTree:
  """Every leaf (B, ...) -> (k, B / k, ...); micro-batch j holds examples j, j + k, j + 2k, ...

  Strided rather than contiguous: with the batch sharded over devices along B, each device's shard
  splits into k micro-batches locally, so no example crosses devices (needs B / devices divisible by k).
  """
  if int(k) != k or k < 1:
    raise ValueError(f'number of micro-batches must be an integer >= 1, got {k}')

  def split(leaf):
    size = leaf.shape[0] if jnp.ndim(leaf) else None
    if size is None or size % k:
      raise ValueError(
        f'batch size {size} (leaf shape {jnp.shape(leaf)}) is not divisible by grad_accum_steps={k}'
      )
    return jnp.swapaxes(leaf.reshape((size // k, k) + leaf.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def accumulated_grads(grad_fn: Callable, micro_batches: PyTree, carry: PyTree, grads_like: PyTree):
  """Averages loss and gradients over micro-batches with one `lax.scan` (a plain call when there is one).

  Args:
    grad_fn: (carry, micro_batch) -> (carry, (loss, aux), grads); loss a scalar mean over the
      micro-batch. `carry` threads state that must advance once per micro-batch (BatchNorm statistics,
      the RNG: grad_fn should split its key).
    micro_batches: pytree whose leaves are (k, micro_batch_size, ...), e.g. from split_micro_batches.
    carry: initial carry.
    grads_like: a pytree with the gradients' structure and shapes (the parameters, or their abstract
      values): the accumulators are made from it, so `grad_fn` is traced once, not a second time for shapes.

  Returns:
    (carry after k micro-batches, mean loss float32 (), aux stacked along a leading k axis,
    mean grads in float32). Equal micro-batch sizes make these the full-batch mean loss and its grads.
  """
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(micro_batches)}
  if len(sizes) != 1:
    raise ValueError(f'micro_batches leaves must share one leading axis (k), got sizes {sorted(sizes)}')
  k = sizes.pop()
  if k == 1:  # no loop: the same numbers, and XLA sees one straight-line step
    carry, (loss, aux), grads = grad_fn(carry, jax.tree.map(lambda leaf: leaf[0], micro_batches))
    aux = jax.tree.map(lambda leaf: jnp.asarray(leaf)[None], aux)
    return carry, jnp.asarray(loss, jnp.float32), aux, jax.tree.map(lambda g: g.astype(jnp.float32), grads)
  zeros = jax.tree.map(lambda leaf: jnp.zeros(jnp.shape(leaf), jnp.float32), grads_like)

  def step(state, micro_batch):
    carry, grad_sum = state
    carry, (loss, aux), grads = grad_fn(carry, micro_batch)
    grad_sum = jax.tree.map(lambda total, g: total + g.astype(jnp.float32), grad_sum, grads)
    return (carry, grad_sum), (jnp.asarray(loss, jnp.float32), aux)

  (carry, grad_sum), (losses, aux) = jax.lax.scan(step, (carry, zeros), micro_batches)
  mean_grads = jax.tree.map(lambda total: total / k, grad_sum)
  return carry, jnp.mean(losses), aux, mean_grads


# ---------------------------------------------------------------------------------------------------
# Exponential moving average of the weights.


def ema_enabled(config) -> bool:
  """Whether config.ema.decay (0 = off) turns the weight EMA on."""
  return config.ema.decay > 0.0


def ema_update(ema_params: PyTree, params: PyTree, decay) -> PyTree:
  """ema + (1 - decay) * (params - ema) per leaf, in float32 (timm's ModelEmaV2 step).

  decay: python float or float array (e.g. a warmed-up decay computed in the step). Apply it to
  batch_stats too to match timm, which averages the BatchNorm buffers along with the weights.
  """
  decay = jnp.asarray(decay, jnp.float32)

  def update(ema, param):
    ema = ema.astype(jnp.float32)
    return ema + (1.0 - decay) * (param.astype(jnp.float32) - ema)

  return jax.tree.map(update, ema_params, params)


# ---------------------------------------------------------------------------------------------------
# Logging.


def _leaf_size(leaf) -> int:
  return math.prod(int(d) for d in _shape(leaf))  # python ints: exact, no int32 overflow


def param_count(params: PyTree) -> int:
  """Total number of parameters, an exact python int (works on arrays and jax.ShapeDtypeStructs)."""
  return sum(_leaf_size(leaf) for leaf in jax.tree.leaves(params))


def param_overview(params: PyTree) -> str:
  """Table of parameter counts per top-level module, in tree order, then the total.

  Accepts a params tree or a variables dict (then counts its 'params' collection only).
  """
  if isinstance(params, Mapping) and 'params' in params:
    params = params['params']
  counts = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = _path_name(path[0]) if path else '<root>'
    counts[name] = counts.get(name, 0) + _leaf_size(leaf)
  total = sum(counts.values())
  width = max([len('module'), len('total')] + [len(name) for name in counts])
  digits = max(len('params'), len(f'{total:,}'))
  lines = [f'{"module":<{width}}  {"params":>{digits}}']
  lines += [f'{name:<{width}}  {count:>{digits},}' for name, count in counts.items()]
  lines.append(f'{"total":<{width}}  {total:>{digits},}')
  return '\n'.join(lines)


def _path_name(entry) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)
