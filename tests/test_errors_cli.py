"""Issue 21's user errors through the command lines where a user meets them: one `error:` line on stderr,
exit code 1, nothing written or lost; and a corrupt tfds record is a bad example the run trains past.

One tiny training run (a tfds dataset with a corrupt record) gives the workdir that mode=eval and the
Python API then restore with another model's config.
"""

import pathlib
import shutil

import numpy as np
from PIL import Image
import pytest

from atlas_jax import checkpointing, inference
from atlas_jax import workdir as workdir_lib
from tests.data import tiny_tfds
from tests.train_configs import command_line_overrides, run_module, tiny_config

CONFIG = '--config=configs/quickstart.py:steps=2'


def assert_one_line(result, starts: str) -> str:
  """The run failed with exit code 1 and printed exactly one line, `error: ...` beginning `starts`."""
  assert result.returncode == 1, result.stderr[-3000:]
  assert result.stderr.count('\n') == 1 and result.stderr.startswith(f'error: {starts}'), result.stderr[
    -3000:
  ]
  return result.stderr


def files_of(directory: pathlib.Path) -> dict[str, bytes]:
  return {
    str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob('*') if path.is_file()
  }


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  """The tiny tfds dataset (ArrayRecord) whose train record 0 has a corrupted byte inside its image."""
  data_dir = tmp_path_factory.mktemp('tfds')
  tiny_tfds.prepare(data_dir, 'array_record')
  shard = next((data_dir / tiny_tfds.NAME / '1.0.0').glob('*-train.array_record-*'))
  data = bytearray(shard.read_bytes())
  data[data.index(b'\x89PNG') + 20] ^= 0xFF  # record 0's chunk no longer matches its hash
  shard.write_bytes(bytes(data))
  return data_dir


def tfds_flags(data_dir, **overrides) -> list[str]:
  return command_line_overrides(
    data__source='tfds',
    data__name=tiny_tfds.NAME,
    data__data_dir=str(data_dir),
    data__max_bad_fraction=0.5,  # record 0 and the truncated JPEG of record BAD_TRAIN_RECORD: 2 of 9
    model__num_classes=3,
    **overrides,
  )


@pytest.fixture(scope='module')
def trained(tfds_dir, tmp_path_factory) -> pathlib.Path:
  """A workdir trained 2 steps on the tfds dataset with a corrupt record: the run skips it and finishes."""
  workdir = tmp_path_factory.mktemp('run') / 'workdir'
  result = run_module('atlas_jax.main', CONFIG, f'--workdir={workdir}', *tfds_flags(tfds_dir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'tfds tiny_classes/1.0.0 train[0]: corrupt record' in result.stderr, result.stderr[-3000:]
  assert 'skipping bad example 0' in result.stderr
  assert checkpointing.Checkpoints(workdir).all_steps() == [2]
  return workdir


def test_a_corrupt_tfds_record_is_a_bad_example_the_run_trains_past(trained):
  assert (trained / 'config.json').is_file()


def test_mode_eval_with_another_models_config_is_one_line(trained, tfds_dir):
  before = files_of(trained)
  result = run_module(
    'atlas_jax.main',
    CONFIG,
    f'--workdir={trained}',
    '--config.mode=eval',
    *tfds_flags(tfds_dir, model__dim=24),
  )
  message = assert_one_line(result, f'the checkpoint at {trained / "checkpoints" / "2"} holds a model of a')
  assert '(16,) in the checkpoint vs (24,) in the config' in message
  assert f'({trained / "config.json"}) is the one to use' in message
  assert files_of(trained) == before  # nothing written, nothing lost


def test_the_python_api_with_another_models_config_is_one_line(trained):
  config = tiny_config(steps=2, model__dim=24, model__num_classes=3)
  with pytest.raises(checkpointing.CheckpointError, match='in the checkpoint vs') as caught:
    inference.load(trained, config=config)
  assert '\n' not in str(caught.value) and str(trained / 'config.json') in str(caught.value)
  assert inference.load(trained).step == 2  # its own config.json restores


def test_a_missing_tfds_shard_is_one_line_naming_it(tfds_dir, tmp_path):
  data_dir = tmp_path / 'tfds'
  shutil.copytree(tfds_dir, data_dir)
  shard = next((data_dir / tiny_tfds.NAME / '1.0.0').glob('*-validation.array_record-*'))
  shard.unlink()
  workdir = tmp_path / 'run'
  result = run_module('atlas_jax.main', CONFIG, f'--workdir={workdir}', *tfds_flags(data_dir))
  assert_one_line(result, f'{shard} is missing')
  assert not workdir_lib.checkpoints_dir(workdir).exists()


def test_an_image_folder_class_of_looping_links_only_is_one_line(tmp_path):
  for split in ('train', 'val'):
    for name in ('a', 'b'):
      (tmp_path / 'images' / split / name).mkdir(parents=True)
      Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / 'images' / split / name / 'x.png')
  looping = tmp_path / 'images' / 'train' / 'b'
  (looping / 'x.png').unlink()
  (looping / 'x.png').symlink_to('x.png')
  workdir = tmp_path / 'run'
  flags = command_line_overrides(
    data__source='folder', data__data_dir=str(tmp_path / 'images'), model__num_classes=2
  )
  result = run_module('atlas_jax.main', CONFIG, f'--workdir={workdir}', *flags)
  message = assert_one_line(result, f'{looping} holds no image file, only symlinks that do not resolve')
  assert 'x.png' in message
  assert not workdir_lib.checkpoints_dir(workdir).exists()


def test_a_bad_override_value_is_one_line(tmp_path):
  result = run_module('atlas_jax.main', CONFIG, f'--workdir={tmp_path / "run"}', '--config.lr=abc')
  assert_one_line(result, "--config.lr=abc: could not convert string to float: 'abc'")
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize(
  'module, flags, starts',
  [
    (
      'atlas_jax.benchmark',
      ['--config.model.dimm=8'],
      '--config.model.dimm: configs/quickstart.py has no field',
    ),
    ('atlas_jax.benchmark', ['--config.lr=0.1', '--config.lr=0.2'], '--config.lr is given twice'),
    (
      'atlas_jax.tools.convert_torch',
      ['--config.lrr=0.1'],
      '--config.lrr: configs/quickstart.py has no field lrr',
    ),
    ('atlas_jax.tools.convert_torch', ['--config.lr=1', '--config.lr=2'], '--config.lr is given twice'),
    (
      'atlas_jax.predict',
      ['--config.lrr=0.1', 'x.png'],
      '--config.lrr: configs/quickstart.py has no field lrr',
    ),
    ('atlas_jax.predict', ['--top_k=abc', 'x.png'], '--top_k=abc: invalid literal for int()'),
  ],
)
def test_benchmark_and_convert_torch_refuse_a_misspelt_or_repeated_override_in_one_line(
  tmp_path, module, flags, starts
):
  extra = (
    [f'--output={tmp_path / "out"}', f'--checkpoint={tmp_path / "x.pth"}'] if 'convert' in module else []
  )
  if 'predict' in module:
    extra = [f'--checkpoint={tmp_path / "run"}', f'--output={tmp_path / "out"}']
  result = run_module(module, '--config=configs/quickstart.py', *extra, *flags)
  assert_one_line(result, starts)
  assert not (tmp_path / 'out').exists()
