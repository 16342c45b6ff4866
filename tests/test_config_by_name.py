"""Configs by name or path from any directory: `--config=quickstart` (a shipped config) or a file path, for
every command line; an unknown name is one line listing the shipped ones."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from atlas_jax import config as config_lib

ROOT = pathlib.Path(__file__).parents[1]
SHIPPED = sorted(
  path.stem for path in (ROOT / 'configs').glob('*.py') if path.stem not in ('__init__', 'common')
)


def _run_elsewhere(cwd, *args) -> subprocess.CompletedProcess:
  """`python -m ARGS` from `cwd`, not the repository: only the installed package (or, in a source checkout
  without an install, PYTHONPATH) finds atlas_jax."""
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')]))}
  return subprocess.run(
    [sys.executable, '-m', *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env
  )


def test_the_shipped_configs_are_the_repositorys():
  assert config_lib.config_dir().resolve() == (ROOT / 'configs').resolve()
  assert list(config_lib.shipped_configs()) == SHIPPED
  assert 'quickstart' in SHIPPED and 'atlas_b_1024' in SHIPPED


@pytest.mark.parametrize(
  'spec',
  ['quickstart', 'quickstart.py', 'configs/quickstart.py', 'quickstart:steps=3', 'configs/quickstart.py:x'],
)
def test_a_name_or_the_readmes_path_is_the_shipped_file_from_any_directory(spec, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path, colon, arg = config_lib.resolve_config_path(spec).partition(':')
  assert pathlib.Path(path).resolve() == (ROOT / 'configs' / 'quickstart.py').resolve()
  assert colon + arg == spec.partition(':')[1] + spec.partition(':')[2]


def test_a_file_that_exists_here_is_itself(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'quickstart.py').write_text((ROOT / 'configs' / 'quickstart.py').read_text())
  assert config_lib.resolve_config_path('quickstart.py:steps=3') == 'quickstart.py:steps=3'
  assert config_lib.resolve_config_path(str(ROOT / 'configs' / 'atlas_t_512.py')) == str(
    ROOT / 'configs' / 'atlas_t_512.py'
  )


def test_the_command_line_check_and_absl_get_the_shipped_file(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config_lib.check_command_line(['--config=quickstart:steps=3', '--config.lr=0.1'])
  with pytest.raises(
    config_lib.ConfigError, match='^--config.lrr: quickstart has no field lrr; did you mean'
  ):
    config_lib.check_command_line(['--config', 'quickstart', '--config.lrr=0.1'])
  shipped = str(ROOT / 'configs' / 'quickstart.py')
  assert config_lib.resolve_command_line(['--config=quickstart:steps=3', '--workdir=w']) == [
    f'--config={shipped}:steps=3',
    '--workdir=w',
  ]
  assert config_lib.resolve_command_line(['--config', 'quickstart']) == ['--config', shipped]


def test_an_unknown_name_is_one_line_listing_the_shipped_names(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.resolve_config_path('atlas_b_1000')
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith('--config=atlas_b_1000: no config file atlas_b_1000 here and no shipped config')
  assert 'did you mean --config=atlas_b_1024?' in message
  assert f'the shipped configs: {", ".join(SHIPPED)}' in message


def test_main_runs_a_config_by_name_outside_the_repository(tmp_path):
  result = _run_elsewhere(
    tmp_path,
    'atlas_jax.main',
    '--config=quickstart',
    '--config.mode=compile',
    '--config.image_size=32',
    '--config.model.pool=2',
    '--config.model.dim=16',
    '--config.model.depths=(1,1)',
    '--config.batch_size=8',
    '--config.compilation_cache_dir=',
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['fits'] is True
  assert not any(tmp_path.iterdir())  # compile writes no workdir


# main by name: the compile run above; convert_torch by name: tests/tools/test_convert_torch.py; benchmark
# parses its flags with the same config.parse_flags as these.
def test_predict_outside_the_repository_lists_the_shipped_names_for_an_unknown_one(tmp_path):
  result = _run_elsewhere(tmp_path, 'atlas_jax.predict', '--config=quikstart', '--checkpoint=run', 'x.png')
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert lines == [lines[-1]] and lines[0].startswith('error: --config=quikstart: no config file'), lines
  assert 'did you mean --config=quickstart?' in lines[0] and ', '.join(SHIPPED) in lines[0]
