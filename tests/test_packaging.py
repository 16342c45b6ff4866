"""The repository keeps its own rules: the code formatted and linted by ruff as pyproject.toml configures it,
the `test` extra equal to requirements-dev.txt, and a wheel that ships the configs inside atlas_jax (no
top-level `configs` package to clash with another project's)."""

import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def _ruff(*args) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, '-m', 'ruff', *args], cwd=ROOT, capture_output=True, text=True, timeout=120
  )


def test_the_code_is_formatted_as_configured():
  result = _ruff('format', '--check', '.')
  assert result.returncode == 0, f'run `ruff format .`:\n{result.stdout[-3000:]}{result.stderr[-1000:]}'


def test_the_linter_passes():
  result = _ruff('check', '.')
  assert result.returncode == 0, f'run `ruff check --fix .`:\n{result.stdout[-3000:]}{result.stderr[-1000:]}'


def test_the_test_extra_is_requirements_dev():
  extra = tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['optional-dependencies']['test']
  lines = [line.split('#', 1)[0].strip() for line in (ROOT / 'requirements-dev.txt').read_text().splitlines()]
  requirements = [line for line in lines if line and not line.startswith('-r')]
  assert sorted(extra) == sorted(requirements)


def test_the_package_list_names_every_package_and_ships_the_configs_inside_atlas_jax():
  setuptools = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']
  packages = {
    '.'.join(init.parent.relative_to(ROOT).parts) for init in (ROOT / 'atlas_jax').rglob('__init__.py')
  }
  assert sorted(setuptools['packages']) == sorted(packages | {'atlas_jax.configs'})
  assert setuptools['package-dir'] == {'atlas_jax.configs': 'configs'}
  assert not any(name == 'configs' or name.startswith('configs.') for name in setuptools['packages'])


# Loads configs by name from the installed package with no top-level `configs` importable.
_LOAD_BY_NAME = """
import sys

class NoTopLevelConfigs:
  @staticmethod
  def find_spec(name, path=None, target=None):
    if name == 'configs' or name.startswith('configs.'):
      raise ModuleNotFoundError(f'No module named {name!r}', name=name)

sys.meta_path.insert(0, NoTopLevelConfigs)
import atlas_jax
from atlas_jax import config as config_lib
config = config_lib.resolve(config_lib.load_config_file('quickstart:steps=3', 'config'))
config_lib.resolve(config_lib.load_config_file('atlas_b_1024', 'config'))
print(atlas_jax.__file__)
print(config_lib.config_dir())
print(config.total_steps, config_lib.defaults().model.variant)
"""


def test_the_wheel_ships_the_configs_under_atlas_jax_and_no_top_level_configs(tmp_path):
  source = tmp_path / 'source'
  source.mkdir()
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(ROOT / name, source / name)
  for folder in ('atlas_jax', 'configs'):
    shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
  built = subprocess.run(
    [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--quiet', '-w', str(tmp_path / 'dist'), str(source)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  if built.returncode and 'No matching distribution found' in built.stdout + built.stderr:
    pytest.skip('pip cannot reach an index for the build backend (setuptools)')
  assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
  (wheel,) = (tmp_path / 'dist').glob('atlas_jax-*.whl')
  with zipfile.ZipFile(wheel) as archive:
    names = archive.namelist()
    top_level = archive.read(next(name for name in names if name.endswith('.dist-info/top_level.txt')))
  assert {name.split('/', 1)[0] for name in names if not name.split('/', 1)[0].endswith('.dist-info')} == {
    'atlas_jax'
  }
  assert top_level.decode().split() == ['atlas_jax']
  shipped = sorted(name.rsplit('/', 1)[1] for name in names if name.startswith('atlas_jax/configs/'))
  assert shipped == sorted(path.name for path in (ROOT / 'configs').glob('*.py'))

  site = tmp_path / 'site'
  with zipfile.ZipFile(wheel) as archive:
    archive.extractall(site)
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  loaded = subprocess.run(
    [sys.executable, '-c', _LOAD_BY_NAME],
    cwd=elsewhere,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'PYTHONPATH': str(site)},
  )
  assert loaded.returncode == 0, loaded.stderr[-3000:]
  package, configs, values = loaded.stdout.strip().splitlines()[-3:]
  assert pathlib.Path(package).parent == site / 'atlas_jax'
  assert pathlib.Path(configs) == site / 'atlas_jax' / 'configs'
  assert values == '3 S'
