"""`--config.mode=compile`: the memory verdict (fits, suggestions, exit code), the command line without a
workdir, and that it compiles the step `train.run` jits, on the batches `train.run`'s loader gives.

The tiny config compiles in a few seconds; every report with the same step reuses that compile through the
test session's compilation cache (conftest.py), so only the suggested accumulation compiles again.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from atlas_jax import config as config_lib
from atlas_jax import train
from atlas_jax.data import pipeline, transforms
from tests.train_configs import ROOT, command_line_overrides, run_module, tiny_config

TOO_SMALL_GIB = 1e-4  # the tiny step needs about 3e-3 GiB
ACCUM_SUGGESTION = re.compile(
  r'--config\.grad_accum_steps=(\d+) \(micro-batch (\d+) -> (\d+) per device\): about ([0-9.e+-]+) GiB'
)


@pytest.fixture(scope='module')
def fits_report():
  return train.compile_only(tiny_config(mode='compile', device_memory_gib=1000.0))


@pytest.fixture(scope='module')
def too_small_report():
  return train.compile_only(tiny_config(mode='compile', device_memory_gib=TOO_SMALL_GIB))


def test_a_large_device_fits_with_no_suggestions(fits_report):
  report = fits_report
  assert report['devices'] == 1 and report['mesh'] == {'data': 1, 'fsdp': 1, 'spatial': 1}
  assert report['peak_gib_per_device'] > 0 and report['temp_gib'] > 0
  assert report['device_memory_gib'] == 1000.0 and report['device_memory_source'] == 'config'
  assert report['memory_backend'] == 'cpu'
  assert report['fits'] is True and report['suggestions'] == []
  assert 'order of magnitude' in report['note']  # planned for a device, analysed by XLA's CPU backend


def test_on_cpu_the_default_plan_is_host_memory_per_device():
  host_gib = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30
  gib, source = train.device_memory(config_lib.resolve(tiny_config(mode='compile')))
  assert source == 'host' and gib == pytest.approx(host_gib / len(jax.local_devices()))


def test_a_small_device_does_not_fit_and_gets_suggestions(too_small_report):
  report = too_small_report
  assert report['fits'] is False and report['peak_gib_per_device'] > TOO_SMALL_GIB
  suggestions = report['suggestions']
  # Micro-batch 8 -> 1 is the most accumulation the batch allows; it does not fit either, and says so.
  accum = ACCUM_SUGGESTION.search(suggestions[0])
  assert accum and accum.groups()[:3] == ('8', '8', '1'), suggestions
  assert 'still over' in suggestions[0]
  assert any(text.startswith('--config.model.remat=block:') for text in suggestions), suggestions
  # One device: how many devices of this size the step would take instead (here: not even 8).
  assert any('--config.mesh.fsdp=8' in text for text in suggestions), suggestions
  assert any('grad_accum_steps=8 --config.model.remat=block together' in text for text in suggestions)


def test_the_accumulation_estimate_is_near_a_compile_of_it(too_small_report):
  accum = ACCUM_SUGGESTION.search(too_small_report['suggestions'][0])
  steps, estimate = int(accum.group(1)), float(accum.group(4))
  compiled = train.compile_only(tiny_config(mode='compile', grad_accum_steps=steps, device_memory_gib=1000.0))
  assert compiled['micro_batch_per_device'] == int(accum.group(3))
  assert estimate == pytest.approx(compiled['peak_gib_per_device'], rel=0.25)


def test_the_command_line_compiles_without_a_workdir_and_exits_1_when_it_does_not_fit(tmp_path):
  flags = command_line_overrides(mode='compile', device_memory_gib=TOO_SMALL_GIB)
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'atlas_jax.main',
      f'--config={ROOT / "configs" / "quickstart.py"}:steps=6',
      *flags,
    ],
    cwd=tmp_path,  # nothing may appear here: mode=compile writes no workdir
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'PYTHONPATH': str(ROOT)},
  )
  assert result.returncode == 1, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for field in ('compile_s', 'argument_gib', 'output_gib', 'temp_gib', 'alias_gib', 'peak_gib_per_device'):
    assert report[field] >= 0, field
  assert report['device_memory_gib'] == TOO_SMALL_GIB and report['device_memory_source'] == 'config'
  assert report['memory_backend'] == 'cpu' and report['fits'] is False and report['note']
  assert any('--config.grad_accum_steps=' in text for text in report['suggestions'])
  assert not result.stderr.strip().startswith('error:')
  assert list(tmp_path.iterdir()) == []


def test_training_still_requires_a_workdir():
  result = run_module('atlas_jax.main', '--config=configs/quickstart.py', *command_line_overrides())
  assert result.returncode == 1
  assert (
    result.stderr.strip().splitlines()[-1].startswith('error: --workdir is required for mode=train; pass')
  )


def test_device_memory_gib_is_checked_and_defaults_in_old_configs():
  with pytest.raises(config_lib.ConfigError, match='device_memory_gib must be a finite number >= 0'):
    config_lib.resolve(tiny_config(device_memory_gib=-1.0))
  old = tiny_config()
  del old['device_memory_gib']  # a config.json written before the field existed
  assert config_lib.resolve(old).device_memory_gib == 0.0


@pytest.mark.parametrize('source', ['synthetic', 'folder'])
def test_the_loader_gives_the_batch_compile_only_compiles(source):
  """train.run feeds its jitted step the TrainLoader's batches: the same shapes and dtypes as
  `abstract_batch`, also on real data, where the host's images are smaller than image_size."""
  config = config_lib.resolve(tiny_config(data__source=source, data__augment__host_max_side=16))
  if source == 'synthetic':
    from atlas_jax.data import sources

    data = sources.make_source(config.data, config.image_size, 'train', config.seed)
  else:
    data = [{'image': np.zeros((40, 48, 3), np.uint8), 'label': i % 4} for i in range(config.batch_size)]
  loader = pipeline.TrainLoader(
    data,
    config.batch_size,
    seed=config.seed,
    transform=transforms.train_transform(config),
    max_bad_fraction=config.data.max_bad_fraction,
  )
  try:
    batch = next(loader)
  finally:
    loader.close()
  expected = train.abstract_batch(config, config.batch_size)
  assert {key: (value.shape, value.dtype) for key, value in batch.items()} == {
    key: (value.shape, value.dtype) for key, value in expected.items()
  }
  assert expected['image'].shape[1:3] == ((16, 16) if source == 'folder' else (32, 32))
