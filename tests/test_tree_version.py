"""A workdir written before the blocks of a stage were scanned (parameter-tree version 1) still works.

`tests/fixtures/workdir_tree_v1` was written by the commit before the change (`python -m atlas_jax.main`,
the tiny quickstart with depths (2, 2), drop path and EMA, 3 steps) together with the logits that commit's
`inference.load(...).logits` gave for three fixed images, raw and EMA weights.
"""

import json
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from train_configs import run_module, tiny_config

from atlas_jax import checkpointing, inference, run_setup, train, transfer
from atlas_jax import config as config_lib
from atlas_jax import workdir as workdir_lib
from atlas_jax.models import build_model, param_tree

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'workdir_tree_v1'


def test_the_fixture_is_version_1():
  checkpoints = checkpointing.Checkpoints(FIXTURE)
  try:
    assert checkpoints.tree_version(checkpoints.latest_step()) == 1
  finally:
    checkpoints.close()


@pytest.mark.parametrize('use_ema', [False, True])
def test_a_version_1_workdir_predicts_what_it_predicted(use_ema):
  expected = np.load(FIXTURE / 'expected_logits.npz')
  predictor = inference.load(FIXTURE, use_ema=use_ema)
  logits = predictor.logits(predictor.prepare(list(expected['images'])))
  np.testing.assert_allclose(logits, expected['ema_logits' if use_ema else 'logits'], rtol=1e-6, atol=1e-6)


def test_training_resumes_from_a_version_1_workdir_and_writes_version_2(tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(FIXTURE, workdir)
  config = config_lib.resolve(workdir_lib.read_config(workdir))
  config.total_steps = 5
  train.run(config, workdir)
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert max(record['step'] for record in records if 'loss' in record) == 5
  checkpoints = checkpointing.Checkpoints(workdir)
  try:
    assert (
      checkpoints.tree_version(3) == 1 and checkpoints.tree_version(5) == checkpointing.PARAM_TREE_VERSION
    )
  finally:
    checkpoints.close()


def test_init_from_a_version_1_workdir_loads_its_weights():
  config = config_lib.resolve(tiny_config(**{'model.depths': (2, 2), 'init_from': str(FIXTURE)}))
  model = build_model(config)
  fresh = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, *config.image_size, 3)))
  loaded, step = transfer.load(config, fresh)
  assert step == 3
  expected, _ = checkpointing.restore_inference_variables(
    FIXTURE, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *config.image_size, 3)))
  )
  chex.assert_trees_all_equal(loaded, expected)


def test_stacking_and_unstacking_are_inverse_and_keep_every_leaf():
  blocks = {
    f'stage0_block{i}': {'scale0': {'q': {'kernel': np.full((3, 2), i, np.float32)}}} for i in range(3)
  }
  tree = {'params': {**blocks, 'readout': {'head': {'bias': np.zeros(4)}}}}
  stacked = param_tree.stack_blocks(tree)
  assert set(stacked['params']) == {'stage0_blocks', 'readout'}
  kernel = stacked['params']['stage0_blocks']['scale0']['q']['kernel']
  assert kernel.shape == (3, 3, 2) and np.array_equal(kernel[:, 0, 0], [0, 1, 2])
  chex.assert_trees_all_equal(param_tree.unstack_blocks(stacked), tree)


def test_predict_refuses_non_finite_weights_in_one_line(tmp_path):
  """A checkpoint whose weights hold a NaN gives NaN probabilities: predict says so instead, exit 1."""
  workdir = tmp_path / 'run'
  shutil.copytree(FIXTURE, workdir)
  config = config_lib.resolve(workdir_lib.read_config(workdir))
  abstract = run_setup.abstract_variables(build_model(config), config.image_size)
  variables, _ = checkpointing.restore_inference_variables(workdir, abstract)
  params = jax.tree.map(np.asarray, variables['params'])
  params['readout']['head']['bias'] = np.full_like(params['readout']['head']['bias'], np.nan)
  checkpoints = checkpointing.Checkpoints(workdir)
  checkpoints.save(4, {'params': params})
  checkpoints.close()
  image = tmp_path / 'image.png'
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
  result = run_module('atlas_jax.predict', f'--checkpoint={workdir}', '--step=4', str(image))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('error: step 4 of')
  assert "non-finite values in ['params']['readout']['head']['bias']" in result.stderr
