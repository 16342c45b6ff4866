"""Checkpoints: items present only when non-empty, restore for inference, version check."""

import chex
import jax
import jax.numpy as jnp
import pytest

from atlas_jax import checkpointing
from atlas_jax.config import resolve
from atlas_jax.models import build_model
from configs import common


def _patchify_model():
  config = common.base_config('T', 32)
  config.model.update(
    patch_size=4, dim=16, num_heads=2, stem_width=4, depths=(1, 1), window=4, pool=2, dtype='float32'
  )
  return build_model(resolve(config))


def test_model_without_batchnorm_saves_and_restores(tmp_path):
  model = _patchify_model()
  images = jnp.zeros((1, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), images)
  assert 'batch_stats' not in variables
  checkpoints = checkpointing.Checkpoints(tmp_path)
  checkpoints.save(3, {'params': variables['params'], 'batch_stats': {}})
  checkpoints.close()
  assert sorted(p.name for p in (tmp_path / 'checkpoints' / '3').iterdir() if p.is_dir()) == ['params']
  restored, step = checkpointing.restore_inference_variables(
    tmp_path, jax.eval_shape(model.init, jax.random.key(0), images)
  )
  assert step == 3 and set(restored) == {'params'}
  chex.assert_trees_all_equal(restored, variables)


def test_missing_checkpoint_and_missing_step_are_clear(tmp_path):
  model = _patchify_model()
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(checkpointing.CheckpointError, match='no checkpoint under'):
    checkpointing.restore_inference_variables(tmp_path, abstract)
  checkpoints = checkpointing.Checkpoints(tmp_path)
  checkpoints.save(1, {'params': jax.tree.map(jnp.zeros_like, abstract['params'])})
  checkpoints.close()
  with pytest.raises(checkpointing.CheckpointError, match=r'steps present: \[1\]'):
    checkpointing.restore_inference_variables(tmp_path, abstract, step=5)
  with pytest.raises(checkpointing.CheckpointError, match='no EMA weights'):
    checkpointing.restore_inference_variables(tmp_path, abstract, use_ema=True)


def test_another_parameter_tree_version_is_refused(tmp_path, monkeypatch):
  model = _patchify_model()
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  # A step written by a future atlas_jax whose tree this code does not know.
  monkeypatch.setattr(checkpointing, 'PARAM_TREE_VERSION', max(checkpointing.READABLE_VERSIONS) + 1)
  checkpoints = checkpointing.Checkpoints(tmp_path)
  checkpoints.save(0, {'params': jax.tree.map(jnp.zeros_like, abstract['params'])})
  checkpoints.close()
  monkeypatch.undo()
  with pytest.raises(checkpointing.CheckpointError, match='parameter-tree version'):
    checkpointing.restore_inference_variables(tmp_path, abstract)


def test_the_last_k_and_the_best_step_by_top1_are_kept(tmp_path):
  model = _patchify_model()
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = jax.tree.map(jnp.zeros_like, abstract['params'])
  checkpoints = checkpointing.Checkpoints(tmp_path, keep=2)
  for step, top1 in [(1, 0.5), (2, 0.9), (3, None), (4, 0.1), (5, None)]:
    checkpoints.save(step, {'params': params}, metrics=None if top1 is None else {'top1': top1})
  assert checkpoints.all_steps() == [2, 4, 5] and checkpoints.best_step() == 2
  checkpoints.close()
  # predict and mode=eval read the best step unless told otherwise.
  assert checkpointing.restore_inference_variables(tmp_path, abstract)[1] == 2
  assert checkpointing.restore_inference_variables(tmp_path, abstract, step=5)[1] == 5
