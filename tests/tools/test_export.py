"""Export for serving: the command line writes model.jax, signature.json and labels.txt, and a process that
never imports atlas_jax reproduces predict's logits from model.jax alone.

The workdir is the tests' tiny quickstart (32 px, two scales) saved with random weights (no training
run: export reads a checkpoint, however it was made), with EMA weights that differ from the raw ones.
"""

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from atlas_jax import checkpointing, inference, run_setup
from atlas_jax import config as config_lib
from atlas_jax import workdir as workdir_lib
from atlas_jax.models import build_model
from atlas_jax.tools import export as export_lib
from tests.train_configs import run_module, tiny_config

STEP = 3

# Run with `python -c` in a fresh process: jax and numpy only, never atlas_jax.
LOADER = textwrap.dedent(
  """
  import sys
  import jax
  import numpy as np
  images = np.load(sys.argv[1])
  results = {}
  for name in sys.argv[3:]:
    with open(name, 'rb') as file:
      exported = jax.export.deserialize(bytearray(file.read()))
    if isinstance(exported.in_avals[0].shape[0], int):  # a fixed batch (1): one image a call
      results[name] = np.concatenate([np.asarray(exported.call(image[None])) for image in images])
    else:  # a symbolic batch: all at once
      results[name] = np.asarray(exported.call(images))
    results[name + ':platforms'] = np.asarray(exported.platforms)
  assert 'atlas_jax' not in sys.modules, sorted(m for m in sys.modules if m.startswith('atlas_jax'))
  np.savez(sys.argv[2], **results)
  """
)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('export') / 'workdir'
  config = config_lib.resolve(tiny_config(ema__decay=0.9))
  # Random weights of the model's shapes: traced only, so no compile of `init` (the test's slowest step).
  abstract = run_setup.abstract_variables(build_model(config), config.image_size)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda leaf: rng.normal(0, 0.2, leaf.shape).astype(leaf.dtype), abstract['params'])
  ema = jax.tree.map(lambda leaf: leaf * 0.5, params)
  workdir_lib.write_config(workdir, config)
  checkpoints = checkpointing.Checkpoints(workdir)
  checkpoints.save(STEP, {'params': params, 'ema_params': ema})
  checkpoints.close()
  return workdir


def test_exported_model_reproduces_predict_without_atlas_jax(workdir, tmp_path):
  fixed, symbolic = tmp_path / 'fixed', tmp_path / 'any_batch'
  exported = run_module('atlas_jax.tools.export', f'--checkpoint={workdir}', f'--output={fixed}')
  assert exported.returncode == 0, exported.stderr[-2000:]
  assert f'step {STEP}' in exported.stdout and 'model.jax' in exported.stdout
  # A symbolic batch dimension and the EMA weights, through the Python API.
  export_lib.export(workdir, symbolic, batch_size=0, use_ema=True)

  signature = json.loads((fixed / 'signature.json').read_text())
  assert signature['inputs'] == [{'name': 'images', 'shape': [1, 32, 32, 3], 'dtype': 'uint8'}]
  assert signature['outputs'][0]['shape'] == [1, 4] and signature['outputs'][0]['dtype'] == 'float32'
  assert signature['image_size'] == [32, 32] and signature['num_classes'] == 4
  assert signature['step'] == STEP and signature['weights'] == 'raw'
  assert signature['jax_version'] == jax.__version__
  assert signature['model']['depths'] == [1, 1] and signature['model']['dim'] == 16
  assert 'cpu' in signature['platforms']
  any_batch = json.loads((symbolic / 'signature.json').read_text())
  assert any_batch['inputs'][0]['shape'] == [None, 32, 32, 3] and any_batch['weights'] == 'ema'

  atlas = inference.load(workdir)
  labels = (fixed / 'labels.txt').read_text().splitlines()
  assert labels == list(atlas.labels) and len(labels) == 4

  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  np.save(tmp_path / 'images.npy', images)
  artifacts = [str(fixed / 'model.jax'), str(symbolic / 'model.jax')]
  loaded = subprocess.run(
    [sys.executable, '-c', LOADER, str(tmp_path / 'images.npy'), str(tmp_path / 'out.npz'), *artifacts],
    cwd=tmp_path,  # not the repository root: atlas_jax is not importable by accident
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert loaded.returncode == 0, loaded.stderr[-2000:]
  results = np.load(tmp_path / 'out.npz')
  assert list(results[artifacts[0] + ':platforms']) == signature['platforms']

  expected = atlas.logits(atlas.prepare(list(images), resize='squash'))
  np.testing.assert_allclose(results[artifacts[0]], expected, atol=1e-4, rtol=0)
  ema = inference.load(workdir, use_ema=True)
  expected_ema = ema.logits(ema.prepare(list(images), resize='squash'))
  np.testing.assert_allclose(results[artifacts[1]], expected_ema, atol=1e-4, rtol=0)
  assert not np.allclose(expected, expected_ema, atol=1e-4)  # the EMA weights were the ones exported


def test_export_mistakes_are_one_line(workdir, tmp_path):
  missing = run_module(
    'atlas_jax.tools.export', f'--checkpoint={tmp_path / "nowhere"}', f'--output={tmp_path}'
  )
  assert missing.returncode == 1
  assert missing.stderr.strip().startswith('error: ') and len(missing.stderr.strip().splitlines()) == 1
  assert 'config.json' in missing.stderr
  with pytest.raises(export_lib.ExportError, match='batch_size'):
    export_lib.export(workdir, tmp_path / 'out', batch_size=-1)
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(export_lib.ExportError, match='is a file'):
    export_lib.export(workdir, tmp_path / 'a_file')
