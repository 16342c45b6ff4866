"""Small trainer configs shared by the trainer tests: the quickstart shrunk to a few milliseconds a step."""

import os
import pathlib
import subprocess
import sys

from configs import quickstart

ROOT = pathlib.Path(__file__).parents[1]

# The quickstart at 32 px: 8 x 8 tokens, windows of 4 x 4, pool 2 -> two scales (2 x 2 windows, 1 window).
TINY = {
  'image_size': (32, 32),
  'model.pool': 2,
  'model.dim': 16,
  'model.depths': (1, 1),
  'batch_size': 8,
  'eval.batch_size': 8,
  'data.synthetic_train_size': 64,
  'data.synthetic_val_size': 12,
  'data.workers': 0,
  'warmup_steps': 2,
  'compilation_cache_dir': '',
}
# tiny_config overrides for a tiny conv stem (patch 16, the reference's, with BatchNorm) at 64 px: 4 x 4
# tokens, one scale.
TINY_CONV_STEM = dict(
  image_size=(64, 64), model__patch_size=16, model__stem_width=8, model__stem_in_dim=8, model__depths=(1,)
)
# Every part of the recipe on: drop path, Mixup/CutMix with label smoothing, accumulation, EMA.
FULL_RECIPE = {
  'model.drop_path_rate': 0.1,
  'mixup.mixup_alpha': 0.8,
  'mixup.cutmix_alpha': 1.0,
  'mixup.label_smoothing': 0.1,
  'grad_accum_steps': 2,
  'ema.decay': 0.9,
}


def tiny_config(steps: int = 6, **overrides):
  """The tiny quickstart; overrides name fields with '__' for '.', e.g. model__dtype='bfloat16'."""
  config = quickstart.get_config(f'steps={steps}')
  config.lock()  # refuses a misspelt field instead of adding it
  config.update_from_flattened_dict(
    {**TINY, **{key.replace('__', '.'): value for key, value in overrides.items()}}
  )
  config.unlock()
  return config


def command_line_overrides(**overrides) -> list[str]:
  """TINY plus `overrides` as --config.FIELD=VALUE flags for `python -m atlas_jax.main`."""
  fields = {**TINY, **{key.replace('__', '.'): value for key, value in overrides.items()}}
  flags = []
  for name, value in fields.items():
    if isinstance(value, tuple):
      value = '(' + ','.join(str(item) for item in value) + (',)' if len(value) == 1 else ')')
    flags.append(f'--config.{name}={value}')
  return flags


def run_module(*args, env=None) -> subprocess.CompletedProcess:
  """`python -m ARGS` from the repository root, with the repository importable and `env` added."""
  return subprocess.run(
    [sys.executable, '-m', *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'PYTHONPATH': str(ROOT), **(env or {})},
  )


def random_weights_workdir(workdir, config):
  """A workdir of `config` (resolved) holding step 0 with random weights large enough to give probabilities
  far from uniform: predict and the API read it without any training."""
  import jax
  import numpy as np

  from atlas_jax import checkpointing, run_setup
  from atlas_jax import workdir as workdir_lib
  from atlas_jax.models import build_model

  abstract = run_setup.abstract_variables(build_model(config), config.image_size)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda leaf: (0.3 * rng.normal(size=leaf.shape)).astype(leaf.dtype), abstract)
  workdir_lib.write_config(workdir, config)
  checkpoints = checkpointing.Checkpoints(workdir)
  checkpoints.save(0, {'params': variables['params'], 'batch_stats': variables.get('batch_stats')})
  checkpoints.close()
  return workdir
