"""notebooks/atlas_inference.ipynb runs headless, every cell, against a quickstart workdir the test writes."""

import jax
from nbclient import NotebookClient
import nbformat
from nbformat.v4 import new_code_cell
import numpy as np

from atlas_jax import checkpointing, inference
from atlas_jax import workdir as workdir_lib
from atlas_jax.config import resolve
from atlas_jax.models import build_model
from tests.train_configs import ROOT, tiny_config

NOTEBOOK = ROOT / 'notebooks' / 'atlas_inference.ipynb'


def _quickstart_workdir(workdir):
  """config.json and checkpoints/0 of the tests' tiny quickstart, as a training run lays them out; random
  weights (nothing compiled here)."""
  config = resolve(tiny_config())
  model = build_model(config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, *config.image_size, 3), np.float32))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda leaf: (0.2 * rng.normal(size=leaf.shape)).astype(leaf.dtype), abstract)
  workdir_lib.write_config(workdir, config)
  checkpoints = checkpointing.Checkpoints(workdir)
  checkpoints.save(0, {'params': variables['params']})
  checkpoints.close()
  return workdir


def _text(cell) -> str:
  return ''.join(output.get('text', '') for output in cell.outputs if output.output_type == 'stream')


def test_the_notebook_runs_every_cell(tmp_path):
  workdir = _quickstart_workdir(tmp_path / 'workdir')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  parameters = [
    index for index, cell in enumerate(notebook.cells) if 'parameters' in cell.metadata.get('tags', [])
  ]
  assert len(parameters) == 1 and "CHECKPOINT = '" in notebook.cells[parameters[0]].source
  # As papermill does: a cell after the parameters overrides them.
  notebook.cells.insert(
    parameters[0] + 1,
    new_code_cell(f'CHECKPOINT = {str(workdir)!r}', metadata={'tags': ['injected-parameters']}),
  )
  # Raises CellExecutionError, naming the cell, when any cell fails.
  client = NotebookClient(
    notebook, timeout=240, kernel_name='python3', resources={'metadata': {'path': str(ROOT)}}
  )  # the kernel starts in the repository
  client.execute()

  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  text = '\n'.join(_text(cell) for cell in code)
  assert 'Not running under Colab' in text
  assert f'{workdir} is a run of atlas_jax on the built-in synthetic long-range task' in text
  assert 'restored step 0 onto 1 cpu device(s)' in text
  # The top 4 of the 4 classes, most probable first, and a map per scale of the documented shape.
  top = [line.split('  ', 1) for line in text.splitlines() if '(class ' in line]  # 'prob  label (class i)'
  assert {label.rsplit(' (class', 1)[0] for _, label in top} == set(inference.SYNTHETIC_CLASS_NAMES)
  probabilities = [float(prob) for prob, _ in top]
  assert len(top) == 4 and probabilities == sorted(probabilities, reverse=True)
  assert 'scale 0: (1, 8, 8, 16)' in text and 'scale 1: (1, 4, 4, 16)' in text
  figures = [output for cell in code for output in cell.outputs if 'image/png' in output.get('data', {})]
  assert len(figures) == 2  # the photograph with its top 5, the feature maps
