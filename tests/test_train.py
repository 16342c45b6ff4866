"""The train step and loop in process: accumulation, precision, decay mask, divergence, init_from, eval."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax import checkpointing, evaluate, optim, run_setup, sharding, train, transfer
from atlas_jax import config as config_lib
from atlas_jax.data import sources
from atlas_jax.models import build_model
from atlas_jax.tools.convert_torch import convert
from tests.reference_fixtures import FIXTURES, fixture_config, load_fixture
from tests.train_configs import ROOT, tiny_config


def _state_and_step(config):
  config = config_lib.resolve(config)
  setup = run_setup.train_setup(config, sharding.make_mesh(config, jax.devices()[:1]))
  with jax.set_mesh(setup.mesh):
    state = setup.init_state(jax.random.PRNGKey(0))
    step = train.jit_train_step(setup)
  return state, step, setup.mesh


def _batch(config, index=0):
  source = sources.make_source(config.data, config.image_size, 'train', 0)
  from atlas_jax.data import pipeline

  with pipeline.TrainLoader(
    source, config.batch_size, seed=index, max_bad_fraction=config.data.max_bad_fraction
  ) as loader:
    return next(loader)


def test_accumulation_of_micro_batches_equals_one_batch():
  # No drop path or mixing (their draws differ per micro-batch); the patchify model has no BatchNorm.
  results = []
  for accum in (1, 4):
    config = tiny_config(grad_accum_steps=accum, model__drop_path_rate=0.0)
    state, step, mesh = _state_and_step(config)
    with jax.set_mesh(mesh):
      state, metrics = step(state, sharding.global_batch(_batch(config), mesh))
    results.append((jax.device_get(state.params), float(metrics['loss']), float(metrics['grad_norm'])))
  (params_1, loss_1, norm_1), (params_4, loss_4, norm_4) = results
  assert loss_4 == pytest.approx(loss_1, rel=1e-5) and norm_4 == pytest.approx(norm_1, rel=1e-4)
  chex.assert_trees_all_close(params_4, params_1, rtol=1e-5, atol=1e-6)


def test_bfloat16_loss_tracks_float32():
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    config = tiny_config(model__dtype=dtype, lr=1e-3)
    state, step, mesh = _state_and_step(config)
    losses[dtype] = []
    with jax.set_mesh(mesh):
      for index in range(4):
        state, metrics = step(state, sharding.global_batch(_batch(config, index), mesh))
        losses[dtype].append(float(metrics['loss']))
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32  # parameters stay float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim)
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], rtol=2e-2)


def test_weight_decay_reaches_kernels_only_on_the_atlas_tree():
  config = config_lib.resolve(tiny_config())
  params = run_setup.abstract_variables(build_model(config), (32, 32))['params']
  decayed = {
    jax.tree_util.keystr(path): flag
    for path, flag in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))
  }
  assert any('position' in path for path in decayed)
  for path, flag in decayed.items():
    assert flag == path.endswith("['kernel']"), path  # never biases, norms, position-MLP biases


def test_a_nan_loss_from_the_first_update_sets_its_checkpoint_aside_and_says_none_is_good(tmp_path):
  """lr 1e30 without warm-up: step 1's update blows the weights up, step 2's loss (from them) is NaN. The
  step-1 checkpoint is set aside, not resumed from (tests/test_workdir_integrity.py: with a good one)."""
  config = tiny_config(
    steps=6,
    lr=1e30,
    warmup_steps=0,
    checkpoint__every_steps=1,
    checkpoint__async_save=False,
    log__every_steps=100,
    eval__every_steps=100,
  )
  with pytest.raises(
    train.TrainingDiverged, match=r'at step 2 \(computed from the weights of step 1\)'
  ) as error:
    train.run(config, tmp_path)
  assert 'No checkpoint is known good: run the same command with a lower --config.lr' in str(error.value)
  assert checkpointing.Checkpoints(tmp_path).all_steps() == []
  assert (tmp_path / 'checkpoints' / '1.diverged').is_dir()


def test_eval_mode_on_a_converted_reference_checkpoint(tmp_path):
  """init_from a converted (raster) checkpoint: the spatial config is refused by name; raster evaluates."""
  meta, _, _ = load_fixture('atlas_tiny_512')
  source_config = fixture_config(meta, 'raster')
  convert(FIXTURES / 'atlas_tiny_512_state_dict.pt', source_config, tmp_path / 'converted')
  config = fixture_config(meta, 'spatial')
  config.init_from = str(tmp_path / 'converted')
  config.data.update(source='synthetic', synthetic_val_size=3, workers=0)
  config.eval.batch_size = 2
  with pytest.raises(transfer.InitFromError, match=r"model.parent_window='raster'"):
    evaluate.run(config, tmp_path / 'eval')
  config.model.parent_window = 'raster'
  results = evaluate.run(config, tmp_path / 'eval')
  assert results['raw']['examples'] == 3 and 0 <= results['raw']['top1'] <= 1


def test_init_from_reinitializes_a_head_of_another_size(tmp_path):
  meta, state_dict, _ = load_fixture('atlas_tiny_512')
  source_config = fixture_config(meta, 'raster')
  convert(FIXTURES / 'atlas_tiny_512_state_dict.pt', source_config, tmp_path / 'converted')
  config = fixture_config(meta, 'raster')
  config.model.num_classes = 4
  config.init_from = str(tmp_path / 'converted')
  config = config_lib.resolve(config)
  model = build_model(config)
  fresh = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 512, 512, 3)))
  loaded, step = transfer.load(config, fresh)
  assert step == 0
  np.testing.assert_array_equal(
    loaded['params']['readout']['head']['kernel'], fresh['params']['readout']['head']['kernel']
  )
  source, _ = checkpointing.restore_inference_variables(
    tmp_path / 'converted',
    run_setup.abstract_variables(build_model(config_lib.resolve(source_config)), (512, 512)),
  )
  np.testing.assert_array_equal(
    loaded['params']['stem']['conv1']['kernel'], source['params']['stem']['conv1']['kernel']
  )
  config.model.window = 8
  with pytest.raises(transfer.InitFromError, match='model.window'):
    transfer.load(config, fresh)


def test_data_parallel_and_fsdp_on_8_devices_match_1_device_and_restore_on_fewer():
  """One step with BatchNorm in train mode (conv stem), mixing, drop path and accumulation, in a subprocess
  that fakes 8 CPU devices."""
  env = {
    **os.environ,
    'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0',
    'PYTHONPATH': str(ROOT),
  }
  result = subprocess.run(
    [sys.executable, str(ROOT / 'tests' / 'data_parallel_check.py')],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['devices'] == 8
  assert report['max_relative_difference'] < 1e-5, report
  # 2 data x 4 FSDP: most parameter bytes are split over fsdp, and the step is the same.
  assert report['fsdp_split_fraction'] > 0.8 and report['fsdp_max_relative_difference'] < 1e-5, report
  # Its checkpoint restores on 4 devices (2 x 2) and on 1, and the next step matches the 8-device one.
  assert report['restored_on_4'] < 1e-5 and report['restored_on_1'] < 1e-5, report


def test_a_profile_window_writes_a_trace(tmp_path):
  config = tiny_config(
    steps=3,
    profile__start_step=1,
    profile__num_steps=1,
    checkpoint__async_save=False,
    log__every_steps=10,
    eval__every_steps=10,
  )
  train.run(config, tmp_path)
  assert list((tmp_path / 'profile').rglob('*.xplane.pb'))
