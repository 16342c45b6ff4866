"""Fine-tuning tools: layer-wise learning-rate decay and training the head alone (docs/finetuning.md)."""

import operator

import jax
import numpy as np
import optax
import pytest

from atlas_jax import config as config_lib
from atlas_jax import optim, run_setup, sharding, train
from atlas_jax import workdir as workdir_lib
from atlas_jax.models import build_model
from tests.train_configs import TINY_CONV_STEM, tiny_config


def _random_tree(abstract, seed):
  """Normal values in the shapes of `abstract` (jax.ShapeDtypeStructs): no model init to compile."""
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(abstract)))
  keys = jax.tree.unflatten(jax.tree.structure(abstract), list(keys))
  return jax.tree.map(lambda leaf, key: jax.random.normal(key, leaf.shape, leaf.dtype), abstract, keys)


@pytest.mark.parametrize('name', ['atlas', 'window_vit'])
def test_layer_ids_count_blocks_across_stages(name):
  config = config_lib.resolve(tiny_config(model__name=name, model__depths=(2, 3)))
  params = run_setup.abstract_variables(build_model(config), (32, 32))['params']
  ids = optim.layer_ids(params)
  assert {np.asarray(i).item() for i in jax.tree.leaves(ids['stem'])} == {0}
  assert {np.asarray(i).item() for i in jax.tree.leaves(ids['readout'])} == {6}  # L + 1, L = 5 blocks
  if name == 'atlas':
    for i in jax.tree.leaves(ids['stage0_blocks']):
      np.testing.assert_array_equal(i, [1, 2])
    for i in jax.tree.leaves(ids['stage1_blocks']):
      np.testing.assert_array_equal(i, [3, 4, 5])
  else:  # one stack of sum(depths) blocks, and the global position with the stem
    assert {np.asarray(i).item() for i in jax.tree.leaves(ids['global_position'])} == {0}
    for i in jax.tree.leaves(ids['stage0_blocks']):
      np.testing.assert_array_equal(i, [1, 2, 3, 4, 5])


def test_layer_decay_scales_each_layers_adamw_update():
  decay = 0.5
  updates, opt_states = {}, {}
  base = dict(model__depths=(2, 2), warmup_steps=0, lr=0.1, weight_decay=0.05)
  config = config_lib.resolve(tiny_config(**base))
  abstract = run_setup.abstract_variables(build_model(config), config.image_size)['params']
  params, grads = _random_tree(abstract, 0), _random_tree(abstract, 1)
  for layer_decay in (1.0, decay):
    tx = optim.make_optimizer(config_lib.resolve(tiny_config(**base, optimizer__layer_decay=layer_decay)))
    step, opt_states[layer_decay] = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
    new = optax.apply_updates(params, step)
    updates[layer_decay] = jax.tree.map(lambda n, p: np.float64(n) - np.float64(p), new, params)
  # Stateless: the same arrays in the optimizer state with or without layer decay.
  assert [leaf.shape for leaf in jax.tree.leaves(opt_states[decay])] == [
    leaf.shape for leaf in jax.tree.leaves(opt_states[1.0])
  ]

  def check(plain_tree, decayed_tree, scale):
    for plain, decayed in zip(jax.tree.leaves(plain_tree), jax.tree.leaves(decayed_tree), strict=True):
      assert np.abs(plain).max() > 0
      np.testing.assert_allclose(decayed, plain * scale, rtol=1e-4, atol=1e-9)

  # L = 4 blocks: stem id 0, stage 0's blocks 1 and 2, stage 1's 3 and 4, readout 5; scale decay^(5 - id).
  plain, decayed = updates[1.0], updates[decay]
  check(plain['stem'], decayed['stem'], decay**5)
  check(plain['readout'], decayed['readout'], 1.0)
  for stage, first_id in (('stage0_blocks', 1), ('stage1_blocks', 3)):
    for block in range(2):  # per slice: the two blocks of a stage get different scales
      plain_block, decayed_block = (
        jax.tree.map(operator.itemgetter(block), tree[stage]) for tree in updates.values()
      )
      check(plain_block, decayed_block, decay ** (5 - first_id - block))


def _head_only_run(config, steps):
  config = config_lib.resolve(config)
  setup = run_setup.train_setup(config, sharding.make_mesh(config, jax.devices()[:1]))
  rng = np.random.default_rng(0)
  with jax.set_mesh(setup.mesh):
    initial = setup.init_state(jax.random.PRNGKey(0))
    # A non-trivial running average, so that keeping it is not keeping the init's zeros and ones.
    initial = initial.replace(batch_stats=jax.tree.map(lambda leaf: leaf + 0.1, initial.batch_stats))
    initial = jax.device_put(initial, setup.state_sharding)
    start = jax.device_get(initial)
    step = train.jit_train_step(setup)
    state = initial
    for _ in range(steps):
      batch = {
        'image': rng.normal(size=(config.batch_size, *config.image_size, 3)).astype(np.float32),
        'label': rng.integers(0, config.model.num_classes, config.batch_size).astype(np.int32),
      }
      state, metrics = step(state, sharding.global_batch(batch, setup.mesh))
  return start, jax.device_get(state), metrics


def test_head_only_trains_the_readout_and_keeps_the_backbone():
  # A conv stem (patch 16): BatchNorm statistics that a train-mode forward would move. Drop path and
  # Mixup on: the backbone must still run deterministic, the head on mixed targets.
  config = tiny_config(
    **TINY_CONV_STEM,
    model__drop_path_rate=0.5,
    mixup__mixup_alpha=0.8,
    grad_accum_steps=2,
    warmup_steps=0,
    optimizer__trainable='head',
    optimizer__layer_decay=0.5,
    ema__decay=0.9,
  )
  start, end, metrics = _head_only_run(config, steps=2)
  assert np.isfinite(metrics['loss']) and metrics['grad_norm'] > 0
  assert jax.tree.leaves(start.batch_stats), 'the conv stem should have BatchNorm statistics'
  for before, after in zip(jax.tree.leaves(start.batch_stats), jax.tree.leaves(end.batch_stats)):
    np.testing.assert_array_equal(after, before)
  for name in start.params:
    moved = [
      np.any(a != b) for a, b in zip(jax.tree.leaves(start.params[name]), jax.tree.leaves(end.params[name]))
    ]
    if name == 'readout':
      assert any(moved), 'the head should train'
    else:
      assert not any(moved), f'{name} is frozen'
  # The optimizer state holds moments for the readout's leaves only (scalars: step counts).
  state_paths = [
    jax.tree_util.keystr(path)
    for path, leaf in jax.tree_util.tree_leaves_with_path(end.opt_state)
    if np.ndim(leaf)
  ]
  assert state_paths and all("['readout']" in path for path in state_paths), state_paths
  assert len(state_paths) == 2 * len(jax.tree.leaves(end.params['readout']))  # mu and nu


def test_resuming_with_another_trainable_is_refused(tmp_path):
  config = config_lib.resolve(tiny_config(optimizer__trainable='head'))
  workdir_lib.write_config(tmp_path, config)
  train.check_resumable(tmp_path, config)  # the same: accepted
  other = config_lib.resolve(tiny_config(optimizer__trainable='all'))
  with pytest.raises(train.ResumeError, match='optimizer.trainable'):
    train.check_resumable(tmp_path, other)
