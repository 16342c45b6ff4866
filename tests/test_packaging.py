"""The repository keeps its own rules: the code formatted and linted by ruff as pyproject.toml configures it,
and the `test` extra equal to requirements-dev.txt."""

import pathlib
import subprocess
import sys
import tomllib

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
