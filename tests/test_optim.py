"""Tests for atlas_jax.optim: schedule values, decay mask, AdamW step, accumulation, EMA, overview."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from atlas_jax import optim


def make_config(**overrides):
  config = ml_collections.ConfigDict()
  config.lr = 1e-3
  config.min_lr = 1e-5
  config.warmup_steps = 10
  config.total_steps = 110
  config.weight_decay = 0.24
  config.grad_accum_steps = 1
  config.optimizer = ml_collections.ConfigDict(
    dict(b1=0.9, b2=0.999, eps=1e-8, clip_grad_norm=0.0, layer_decay=1.0, trainable='all')
  )
  config.ema = ml_collections.ConfigDict(dict(decay=0.0))
  for name, value in overrides.items():
    target = config
    *groups, field = name.split('__')
    for group in groups:
      target = getattr(target, group)
    setattr(target, field, value)
  return config


class TinyNet(nn.Module):
  """Conv + BatchNorm + LayerNorm + Dense: every kind of leaf the Atlas tree has."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name='conv')(x)
    x = nn.BatchNorm(use_running_average=not train, name='bn')(x)
    x = nn.LayerNorm(name='norm')(x.mean(axis=(1, 2)))
    return nn.Dense(3, name='head')(x)


def tiny_params():
  """TinyNet's parameter tree filled with ones; eval_shape avoids compiling the init on CPU."""
  shapes = jax.eval_shape(TinyNet().init, jax.random.key(0), jnp.zeros((1, 4, 4, 2)))['params']
  return jax.tree.map(lambda s: np.ones(s.shape, np.float32), shapes)


# --- learning rate schedule --------------------------------------------------------------------------


def closed_form_lr(step, lr=1e-3, min_lr=1e-5, warmup=10, total=110):
  if step < warmup:
    return lr * step / warmup
  progress = min((step - warmup) / (total - warmup), 1.0)
  return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize('step', [0, 1, 5, 9, 10, 11, 35, 60, 85, 109, 110, 111, 500])
def test_schedule_matches_closed_form(step):
  schedule = optim.learning_rate_schedule(make_config())
  np.testing.assert_allclose(float(schedule(step)), closed_form_lr(step), rtol=1e-6, atol=1e-12)


def test_schedule_landmarks_and_jit():
  schedule = jax.jit(optim.learning_rate_schedule(make_config()))
  assert float(schedule(jnp.int32(0))) == 0.0
  np.testing.assert_allclose(float(schedule(jnp.int32(10))), 1e-3, rtol=1e-7)
  np.testing.assert_allclose(float(schedule(jnp.int32(60))), (1e-3 + 1e-5) / 2, rtol=1e-6)  # cosine midpoint
  np.testing.assert_allclose(float(schedule(jnp.int32(110))), 1e-5, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(jnp.int32(10_000))), 1e-5, rtol=1e-6)
  assert schedule(jnp.int32(3)).dtype == jnp.float32


def test_schedule_without_warmup_starts_at_lr():
  schedule = optim.learning_rate_schedule(make_config(warmup_steps=0, total_steps=100))
  np.testing.assert_allclose(float(schedule(0)), 1e-3, rtol=1e-7)
  np.testing.assert_allclose(float(schedule(50)), (1e-3 + 1e-5) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(100)), 1e-5, rtol=1e-6)


# --- weight decay mask and optimizer -----------------------------------------------------------------


def test_weight_decay_mask_is_kernels_only():
  params = tiny_params()
  mask = optim.weight_decay_mask(params)
  flat = {'/'.join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat == {
    'conv/kernel': True,
    'conv/bias': False,
    'bn/scale': False,
    'bn/bias': False,
    'norm/scale': False,
    'norm/bias': False,
    'head/kernel': True,
    'head/bias': False,
  }
  # Works on abstract shapes too, for building masks before initialisation.
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  assert jax.tree.leaves(optim.weight_decay_mask(abstract)) == jax.tree.leaves(mask)


def test_first_adamw_step_matches_torch_formula():
  """One step with bias-corrected moments: p - lr * wd * p * mask - lr * g / (|g| + eps)."""
  config = make_config(warmup_steps=0, total_steps=100)
  params = {'dense': {'kernel': jnp.full((2, 3), 0.5), 'bias': jnp.full((3,), 0.5)}}
  grads = {'dense': {'kernel': jnp.full((2, 3), -2.0), 'bias': jnp.full((3,), 3.0)}}
  tx = optim.make_optimizer(config)
  step = jax.jit(lambda params: optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0]))
  new = step(params)
  lr, wd, eps = 1e-3, 0.24, 1e-8
  np.testing.assert_allclose(new['dense']['kernel'], 0.5 - lr * wd * 0.5 - lr * -2.0 / (2.0 + eps), rtol=1e-6)
  np.testing.assert_allclose(new['dense']['bias'], 0.5 - lr * 3.0 / (3.0 + eps), rtol=1e-6)


def test_lr_follows_schedule_per_optimizer_step():
  """With warmup the first step has lr 0 (params unchanged), the second lr / warmup_steps."""
  config = make_config(weight_decay=0.0)
  params = {'w': jnp.ones((2, 2))}
  grads = {'w': jnp.ones((2, 2))}
  tx = optim.make_optimizer(config)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  np.testing.assert_array_equal(optax.apply_updates(params, updates)['w'], params['w'])
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates['w'], -1e-3 / 10 * 1.0 / (1.0 + 1e-8), rtol=1e-5)


def first_moment(state):
  return optax.tree_utils.tree_get(state, 'mu')


@pytest.mark.parametrize('clip, expected_norm', [(0.0, 20.0), (1.0, 1.0), (100.0, 20.0)])
def test_clip_by_global_norm(clip, expected_norm):
  config = make_config(optimizer__clip_grad_norm=clip)
  params = {'a': jnp.zeros((4,)), 'b': jnp.zeros((2, 2))}
  grads = {'a': jnp.full((4,), 6.0), 'b': jnp.full((2, 2), 8.0)}  # global norm sqrt(4*36 + 4*64) = 20
  tx = optim.make_optimizer(config)
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  # After one step mu = (1 - b1) * (clipped) grads.
  norm = optax.tree.norm(first_moment(state)) / (1 - 0.9)
  np.testing.assert_allclose(float(norm), expected_norm, rtol=1e-5)


def test_params_and_state_stay_float32_with_bfloat16_grads():
  params = {'kernel': np.ones((2, 3), np.float32), 'bias': np.ones((3,), np.float32)}
  grads = jax.tree.map(lambda p: jnp.ones_like(p, jnp.bfloat16), params)
  tx = optim.make_optimizer(make_config(warmup_steps=0, optimizer__clip_grad_norm=1.0))

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state = step(params, tx.init(params), grads)
  for leaf in jax.tree.leaves((params, state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype


# --- gradient accumulation ---------------------------------------------------------------------------


def linear_problem():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(12, 5)).astype(np.float32), rng.normal(size=(12, 3)).astype(np.float32)
  params = {'w': rng.normal(size=(5, 3)).astype(np.float32), 'b': np.full((3,), 0.1, np.float32)}
  return params, {'x': x, 'y': y}


def mse(params, batch):
  prediction = batch['x'] @ params['w'] + params['b']
  return jnp.mean((prediction - batch['y']) ** 2), prediction


@pytest.mark.parametrize('k', [1, 3])
def test_accumulated_grads_equal_full_batch(k):
  params, batch = linear_problem()
  (full_loss, _), full_grads = jax.jit(jax.value_and_grad(mse, has_aux=True))(params, batch)

  def grad_fn(carry, micro_batch):
    (loss, prediction), grads = jax.value_and_grad(mse, has_aux=True)(params, micro_batch)
    return carry + 1, (loss, prediction), grads

  run = jax.jit(
    lambda batch: optim.accumulated_grads(grad_fn, optim.split_micro_batches(batch, k), 0, params)
  )
  carry, loss, aux, grads = run(batch)
  assert int(carry) == k  # carry threaded once per micro-batch
  assert aux.shape == (k, 12 // k, 3)
  np.testing.assert_allclose(loss, full_loss, rtol=1e-5)
  for name in params:
    assert grads[name].dtype == jnp.float32
    np.testing.assert_allclose(grads[name], full_grads[name], rtol=1e-5, atol=1e-6)


def test_accumulated_grads_sum_low_precision_grads_in_float32():
  micro_batches = {'x': jnp.arange(4.0)[:, None]}

  def grad_fn(carry, micro_batch):
    return carry, (micro_batch['x'].sum(), None), {'g': jnp.full((2,), 1 / 3, jnp.bfloat16)}

  _, loss, _, grads = optim.accumulated_grads(grad_fn, micro_batches, (), {'g': jnp.zeros(2)})
  assert grads['g'].dtype == jnp.float32
  np.testing.assert_allclose(grads['g'], float(jnp.bfloat16(1 / 3)), rtol=1e-7)
  np.testing.assert_allclose(loss, 1.5)


def test_split_micro_batches_layout_and_errors():
  batch = {'image': jnp.arange(6 * 2).reshape(6, 2), 'label': jnp.arange(6)}
  micro = optim.split_micro_batches(batch, 3)
  assert micro['image'].shape == (3, 2, 2)
  # Strided: micro-batch j holds examples j, j + k, ...
  np.testing.assert_array_equal(micro['label'], [[0, 3], [1, 4], [2, 5]])
  np.testing.assert_array_equal(micro['image'][1], batch['image'][1::3])
  with pytest.raises(ValueError, match='not divisible'):
    optim.split_micro_batches(batch, 4)


# --- EMA -------------------------------------------------------------------------------------------


def test_ema_update_closed_form_and_float32():
  ema = {'w': jnp.full((2,), 1.0)}
  params = {'w': jnp.full((2,), 3.0, jnp.bfloat16)}
  new = optim.ema_update(ema, params, 0.9)
  assert new['w'].dtype == jnp.float32
  np.testing.assert_allclose(new['w'], 0.9 * 1.0 + 0.1 * 3.0, rtol=1e-6)
  new = jax.jit(optim.ema_update)(ema, params, jnp.float32(0.5))
  np.testing.assert_allclose(new['w'], 2.0, rtol=1e-6)


def test_ema_enabled():
  assert not optim.ema_enabled(make_config())
  assert optim.ema_enabled(make_config(ema__decay=0.9998))


# --- overview ------------------------------------------------------------------------------------------


def test_param_overview_counts():
  params = tiny_params()
  text = optim.param_overview({'params': params})
  # conv 3*3*2*4 + 4, bn 4 + 4, norm 4 + 4, head 4*3 + 3.
  expected = {'conv': 76, 'bn': 8, 'norm': 8, 'head': 15}
  rows = dict(line.rsplit(None, 1) for line in text.splitlines()[1:])
  assert {name.strip(): int(count.replace(',', '')) for name, count in rows.items()} == {
    **expected,
    'total': 107,
  }
  assert optim.param_count(params) == 107
  big = {'a': jax.ShapeDtypeStruct((100_000, 100_000), jnp.float32)}  # beyond int32: counted exactly
  assert optim.param_count(big) == 10**10
  assert '10,000,000,000' in optim.param_overview(big)
