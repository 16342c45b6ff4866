"""The package's arrows point one way: no import cycles in atlas_jax/, models/ knows nothing of training, data
or orbax, data/ knows nothing of JAX (docs/design.md)."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = ROOT / 'atlas_jax'


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict[str, set[str]]:
  """Module -> the atlas_jax modules it imports anywhere in its source (function bodies included)."""
  modules = {module_name(path): path for path in PACKAGE.rglob('*.py')}
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from atlas_jax import train` imports the module atlas_jax.train; `from a.b import f` imports a.b.
        targets = [
          f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules else node.module
          for alias in node.names
        ]
      else:
        continue
      edges.update(target for target in targets if target in modules and target != name)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state = {}  # module -> 'open' while on the path, 'done' after

  def visit(module, path):
    state[module] = 'open'
    for imported in sorted(graph[module]):
      if state.get(imported) == 'open':
        return path[path.index(imported) :] + [imported]
      if imported not in state:
        cycle = visit(imported, path + [imported])
        if cycle:
          return cycle
    state[module] = 'done'
    return None

  for module in sorted(graph):
    if module not in state:
      cycle = visit(module, [module])
      if cycle:
        return cycle
  return None


def test_the_import_graph_has_no_cycles():
  graph = import_graph()
  assert 'atlas_jax.train' in graph and graph['atlas_jax.train'], 'the graph should see the package'
  assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
  graph = {**import_graph(), 'atlas_jax.evaluate': import_graph()['atlas_jax.evaluate'] | {'atlas_jax.train'}}
  cycle = find_cycle(graph)
  assert cycle and cycle[0] == cycle[-1] and 'atlas_jax.train' in cycle


def test_models_import_nothing_of_training_data_or_orbax_statically():
  for module, imported in import_graph().items():
    if module.startswith('atlas_jax.models'):
      outside = {name for name in imported if not name.startswith('atlas_jax.models')} - {'atlas_jax.errors'}
      assert not outside, f'{module} imports {sorted(outside)}'


def _loaded_after(statement: str) -> set[str]:
  """The modules a fresh interpreter holds after running `statement`."""
  script = f'import sys\n{statement}\nprint("\\n".join(sorted(sys.modules)))'
  result = subprocess.run(
    [sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return set(result.stdout.split())


def test_importing_models_loads_nothing_of_training_data_or_orbax():
  submodules = sorted(module_name(path) for path in (PACKAGE / 'models').glob('*.py'))
  loaded = _loaded_after('\n'.join(f'import {name}' for name in submodules))
  assert 'atlas_jax.models.atlas' in loaded and 'flax' in loaded
  ours = {name for name in loaded if name.startswith('atlas_jax.')}
  assert ours <= set(submodules) | {'atlas_jax.models', 'atlas_jax.errors'}, sorted(ours)
  for library in ('orbax', 'optax', 'tensorflow_datasets', 'PIL', 'tensorboardX'):
    assert library not in loaded, f'importing atlas_jax.models loads {library}'


@pytest.mark.parametrize('boundary', ['data'])
def test_importing_every_module_of_data_loads_no_jax(boundary):
  submodules = sorted(module_name(path) for path in (PACKAGE / boundary).rglob('*.py'))
  loaded = _loaded_after('\n'.join(f'import {name}' for name in submodules))
  assert set(submodules) <= loaded and 'numpy' in loaded
  for library in ('jax', 'jaxlib', 'flax', 'optax', 'orbax'):
    assert library not in loaded, f'importing atlas_jax.{boundary} loads {library}'
  assert not {name for name in loaded if name.startswith('atlas_jax.models')}
