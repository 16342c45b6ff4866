"""Every config file: loads, round-trips through config.json, builds its model, takes overrides."""

import pathlib
import sys

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import pytest

from atlas_jax import workdir as workdir_lib
from atlas_jax.config import resolve
from atlas_jax.models import build_model
from configs import common

ROOT = pathlib.Path(__file__).parents[1]
# The model family; the quickstart (explicit small dims, 4 classes) has its own test.
CONFIG_FILES = sorted(
  str(path)
  for path in (ROOT / 'configs').glob('*.py')
  if path.name not in ('__init__.py', 'common.py', 'quickstart.py')
)


def _parse(config_file, *overrides):
  """The config as `--config=FILE OVERRIDES` gives it, through config_flags itself."""
  argv = ['prog', f'--config={config_file}', *overrides]
  saved_argv, sys.argv = sys.argv, argv  # config_flags finds the override flags in sys.argv
  try:
    return _parse_argv(argv)
  finally:
    sys.argv = saved_argv


def _parse_argv(argv):
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
    'config', None, 'config', flag_values=flag_values, lock_config=True
  )
  flag_values(argv)
  return holder.value


def test_the_expected_config_files_exist():
  names = {pathlib.Path(path).stem for path in CONFIG_FILES}
  assert {
    'atlas_t_512',
    'atlas_s_1024',
    'atlas_s_2048',
    'atlas_s_4096',
    'atlas_b_1024',
    'atlas_b_2048',
    'atlas_b_4096',
    'atlas_b_16384',
  } <= names


@pytest.mark.parametrize('config_file', CONFIG_FILES)
def test_config_file(config_file, tmp_path):
  config = _parse(config_file)
  assert config.model.num_classes == 100
  assert f'--config=configs/{pathlib.Path(config_file).name}' in open(config_file).read().split('"""')[1]
  resolved = resolve(config)
  workdir_lib.write_config(tmp_path, resolved)
  restored = workdir_lib.read_config(tmp_path)
  assert restored.to_dict() == resolved.to_dict()
  assert isinstance(restored.image_size, tuple) and isinstance(restored.model.depths, tuple)
  restored.init_from = '/still/overridable'  # a placeholder stays a typed placeholder

  model = build_model(resolved)
  images = jax.ShapeDtypeStruct((1,) + resolved.image_size + (3,), jnp.float32)
  logits = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros(images.shape))[0])
  assert logits.shape == (1, 100)

  depths = resolve(_parse(config_file, '--config.model.depths=(1,1,1)', '--config.image_size=(2048,2048)'))
  assert depths.model.depths == (1, 1, 1)
  assert _parse(config_file, '--config.init_from=/some/dir').init_from == '/some/dir'
  small = resolve(_parse(config_file, '--config.model.variant=S'))
  assert (small.model.dim, small.model.num_heads, small.model.stem_width) == (384, 6, 96)
  bigger = resolve(_parse(config_file, '--config.image_size=(2048,2048)'))
  assert bigger.image_size == (2048, 2048) and bigger.model.depths == (2, 2, 8)
  square = resolve(_parse(config_file, '--config.image_size=1024'))
  assert square.image_size == (1024, 1024) and square.model.depths == (2, 10)


def test_parse_arg():
  parsed = common.parse_arg('variant=B,runlocal', variant='S', runlocal=False, size=1024)
  assert (parsed.variant, parsed.runlocal, parsed.size) == ('B', True, 1024)
  with pytest.raises(ValueError, match='unknown config argument'):
    common.parse_arg('nope=1', variant='S')


def test_quickstart_config():
  config = _parse(str(ROOT / 'configs' / 'quickstart.py'))
  assert '--config=configs/quickstart.py' in open(ROOT / 'configs' / 'quickstart.py').read()
  resolved = resolve(config)
  assert (
    resolved.image_size == (64, 64) and resolved.model.num_classes == 4 and config.data.source == 'synthetic'
  )
  baseline = _parse(str(ROOT / 'configs' / 'quickstart.py') + ':model=window_vit,steps=10')
  assert baseline.model.name == 'window_vit' and baseline.total_steps == 10
