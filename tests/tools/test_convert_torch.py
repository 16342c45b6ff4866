"""The PyTorch importer: fixture checkpoints, refusals by name, and the command line end to end."""

import copy
import json
import os
import pathlib
import shlex
import subprocess
import sys

import flax
import jax
import numpy as np
from PIL import Image
import pytest

from atlas_jax import checkpointing
from atlas_jax import workdir as workdir_lib
from atlas_jax.inference import load_image
from atlas_jax.models import build_model
from atlas_jax.models.reference_names import ReferenceMismatchError, variables_from_reference
from atlas_jax.tools.convert_torch import ConversionError, convert
from atlas_jax.tools.torch_checkpoint import UnsafeCheckpointError, load_state_dict
from configs import common
from tests.reference_fixtures import FIXTURES, fixture_config, load_fixture
from tests.tools.torch_writer import write_torch_checkpoint
from tests.train_configs import run_module

ROOT = pathlib.Path(__file__).parents[2]
# The fixture's model through the command line: configs/atlas_t_512.py with the tiny dims.
TINY_OVERRIDES = [
  '--config.model.dim=32',
  '--config.model.num_heads=2',
  '--config.model.stem_width=8',
  '--config.model.depths=(1,1)',
  '--config.model.num_classes=10',
]


@pytest.fixture(scope='module')
def tiny():
  meta, state_dict, _ = load_fixture('atlas_tiny_512')
  config = fixture_config(meta, 'raster')
  model = build_model(config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 512, 512, 3), np.float32))
  return config, state_dict, abstract


def _flat(tree):
  return flax.traverse_util.flatten_dict(jax.device_get(tree))


@pytest.mark.parametrize('checkpoint', ['atlas_tiny_512_trainer.ckpt', 'atlas_tiny_512_state_dict.pt'])
def test_fixture_checkpoints_convert_to_the_npz_parameters(tiny, checkpoint, tmp_path):
  config, state_dict, abstract = tiny
  expected = _flat(variables_from_reference(state_dict, abstract))
  written = convert(FIXTURES / checkpoint, config, tmp_path / 'workdir')
  restored, step = checkpointing.restore_inference_variables(tmp_path / 'workdir', abstract)
  assert step == 0 and written['parent_window'] == 'raster'
  got = _flat(restored)
  assert got.keys() == expected.keys()
  for path in expected:
    np.testing.assert_array_equal(got[path], expected[path])
  assert workdir_lib.read_config(tmp_path / 'workdir').model.parent_window == 'raster'


def test_untrusted_checkpoint_is_refused_without_calling_anything(tiny, tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(os, 'getcwd', lambda: calls.append('getcwd') or '/')
  with pytest.raises(UnsafeCheckpointError, match='getcwd'):
    convert(FIXTURES / 'atlas_tiny_512_untrusted.ckpt', tiny[0], tmp_path / 'workdir')
  assert not calls
  assert not (tmp_path / 'workdir').exists()


@pytest.mark.parametrize(
  'tamper, message',
  [
    (lambda sd: sd.update({'fc.bais': sd.pop('fc.bias')}), r'missing: fc\.bias; unexpected: fc\.bais'),
    (lambda sd: sd.update({'fc.weight': sd['fc.weight'][:, :16]}), r'wrong shape: fc\.weight \(10, 16\)'),
  ],
)
def test_tampered_checkpoint_is_refused_by_name_and_nothing_is_written(tiny, tmp_path, tamper, message):
  state_dict = dict(load_state_dict(FIXTURES / 'atlas_tiny_512_trainer.ckpt'))
  tamper(state_dict)
  write_torch_checkpoint(tmp_path / 'tampered.ckpt', {'model': state_dict, 'epoch': 7})
  with pytest.raises(ReferenceMismatchError, match=message):
    convert(tmp_path / 'tampered.ckpt', tiny[0], tmp_path / 'workdir')
  assert not (tmp_path / 'workdir').exists()


def test_unused_reference_heads_are_skipped_by_rule(tiny):
  _, state_dict, abstract = tiny
  extra = dict(state_dict, **{'atlas_models.0.head.extra': np.zeros(3), 'stray.weight': np.zeros(3)})
  with pytest.raises(ReferenceMismatchError, match=r'unexpected: stray\.weight$'):
    variables_from_reference(extra, abstract)


def test_converting_into_a_workdir_with_checkpoints_is_refused(tiny, tmp_path):
  convert(FIXTURES / 'atlas_tiny_512_state_dict.pt', tiny[0], tmp_path / 'workdir')
  with pytest.raises(ConversionError, match='already holds checkpoints'):
    convert(FIXTURES / 'atlas_tiny_512_state_dict.pt', tiny[0], tmp_path / 'workdir')


def test_convert_then_predict_through_the_command_lines(tiny, tmp_path):
  workdir = tmp_path / 'workdir'
  converted = run_module(
    'atlas_jax.tools.convert_torch',
    f'--checkpoint={FIXTURES / "atlas_tiny_512_trainer.ckpt"}',
    '--config=configs/atlas_t_512.py',
    *TINY_OVERRIDES,
    f'--output={workdir}',
  )
  assert converted.returncode == 0, converted.stderr
  assert 'parent_window: raster' in converted.stdout and 'checkpoints/0' in converted.stdout

  rng = np.random.default_rng(0)
  images = tmp_path / 'images'
  images.mkdir()
  for index in range(3):
    Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(images / f'{index}.png')
  (images / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\nnot really')
  output = tmp_path / 'predictions.jsonl'
  paths = [str(images / f'{index}.png') for index in range(3)] + [str(images / 'broken.png')]
  predicted = run_module('atlas_jax.predict', f'--checkpoint={workdir}', f'--output={output}', *paths)
  assert predicted.returncode == 0, predicted.stderr
  assert 'broken.png' in predicted.stderr and '1 unreadable' in predicted.stderr
  lines = [json.loads(line) for line in output.read_text().splitlines()]
  assert [line['path'] for line in lines] == paths[:3]
  for line in lines:
    assert set(line) == {'path', 'top_k', 'logits'}
    assert len(line['top_k']) == 5 and len(line['logits']) == 10
    assert set(line['top_k'][0]) == {'index', 'label', 'prob'}
    assert line['top_k'][0]['prob'] >= line['top_k'][-1]['prob']

  # The same logits as the model applied directly to the same normalised arrays.
  config, state_dict, abstract = tiny
  variables = variables_from_reference(state_dict, abstract)
  arrays = np.stack(
    [load_image(path, (512, 512), config.data.max_pixels, config.data.max_decode_bytes) for path in paths[:3]]
  )
  pixels = np.stack([np.asarray(Image.open(path), np.float32) / 255 for path in paths[:3]])
  np.testing.assert_allclose(arrays, (pixels - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], atol=1e-6)
  expected = jax.jit(build_model(config).apply)(variables, arrays)
  np.testing.assert_allclose(np.array([line['logits'] for line in lines]), expected, atol=1e-4)


def test_predict_with_no_readable_image_exits_nonzero(tiny, tmp_path):
  convert(FIXTURES / 'atlas_tiny_512_state_dict.pt', tiny[0], tmp_path / 'workdir')
  (tmp_path / 'empty.jpg').write_bytes(b'')
  predicted = run_module(
    'atlas_jax.predict', f'--checkpoint={tmp_path / "workdir"}', str(tmp_path / 'empty.jpg')
  )
  assert predicted.returncode == 1
  assert 'empty.jpg' in predicted.stderr and '0 images' in predicted.stderr


def test_class_names(tmp_path):
  from atlas_jax.inference import class_names

  config = common.base_config('T', 512)
  names = class_names(config)
  assert len(names) == 100 and names == sorted(names) and names[0].startswith('n')
  config.model.num_classes = 3
  assert class_names(config) == ['0', '1', '2']
  (tmp_path / 'classes.txt').write_text('zebra\napple\nmango\n')
  config.data.classes = str(tmp_path / 'classes.txt')
  assert class_names(config) == ['apple', 'mango', 'zebra']
  config.data.classes = str(tmp_path / 'missing.txt')
  with pytest.raises(ValueError, match='does not exist'):
    class_names(config)


def test_a_checkpoint_of_another_model_is_reported_in_a_few_lines_with_the_overrides(tmp_path):
  """From outside the repository, the config by name: what the checkpoint is, what the config is, and the
  overrides; those overrides then convert it, with --labels writing labels.txt."""
  checkpoint = FIXTURES / 'atlas_tiny_512_trainer.ckpt'
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}

  def convert_torch(*flags):
    return subprocess.run(
      [sys.executable, '-m', 'atlas_jax.tools.convert_torch', f'--checkpoint={checkpoint}', *flags],
      cwd=tmp_path,
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
    )

  refused = convert_torch('--config=atlas_b_1024', '--output=workdir')
  assert refused.returncode == 1
  lines = (refused.stdout + refused.stderr).strip().splitlines()
  assert len(lines) <= 5, lines
  assert lines[0] == 'error: the checkpoint holds another model than the config (atlas_b_1024):'
  assert lines[1] == (
    '  checkpoint: dim 32, depths (1, 1), 10 classes, conv stem (patch 16, stem_in_dim 64, stem_width 8), '
    '2 scales, mlp_ratio 4'
  )
  assert lines[2].startswith('  config:     dim 768, depths (2, 10), 100 classes, conv stem (patch 16')
  overrides = shlex.split(lines[3].split('to convert it:', 1)[1].split(' (num_heads', 1)[0])
  assert sorted(overrides) == sorted(TINY_OVERRIDES)
  assert not (tmp_path / 'workdir').exists()

  (tmp_path / 'names.txt').write_text(''.join(f'class {index}\n' for index in range(10)))
  converted = convert_torch('--config=atlas_t_512', *overrides, '--output=workdir', '--labels=names.txt')
  assert converted.returncode == 0, converted.stderr
  assert 'labels.txt: 10 class names' in converted.stdout
  assert workdir_lib.read_labels(tmp_path / 'workdir') == [f'class {index}' for index in range(10)]


def test_labels_of_another_count_are_one_line_and_nothing_is_written(tiny, tmp_path):
  (tmp_path / 'names.txt').write_text('cat\ndog\nfox\n')
  with pytest.raises(ConversionError) as error:
    convert(
      FIXTURES / 'atlas_tiny_512_state_dict.pt', tiny[0], tmp_path / 'workdir', labels=tmp_path / 'names.txt'
    )
  assert str(error.value) == (
    f'--labels={tmp_path / "names.txt"} lists 3 class names but the model has 10 classes (model.num_classes): '
    'one name a line, in index order'
  )
  assert not (tmp_path / 'workdir').exists()


def test_labels_come_from_the_configs_class_list(tiny, tmp_path):
  config = copy.deepcopy(tiny[0])
  names = [f'n{index:08d}' for index in range(10)]
  (tmp_path / 'classes.txt').write_text('\n'.join(reversed(names)) + '\n')
  config.data.classes = str(tmp_path / 'classes.txt')
  written = convert(FIXTURES / 'atlas_tiny_512_state_dict.pt', config, tmp_path / 'workdir')
  assert written['labels'] == tmp_path / 'workdir' / 'labels.txt'
  assert workdir_lib.read_labels(tmp_path / 'workdir') == names  # sorted, as the sources number them
  assert convert(FIXTURES / 'atlas_tiny_512_state_dict.pt', tiny[0], tmp_path / 'other')['labels'] is None


def test_the_readme_names_the_config_and_overrides_of_every_shipped_checkpoint():
  readme = ' '.join((ROOT / 'README.md').read_text().split())
  quoted = [
    flag.replace('=(', "='(") + "'" if '=(' in flag else flag for flag in TINY_OVERRIDES
  ]  # the shell's
  assert ' '.join(['--config=atlas_t_512', *quoted]) in readme
  for checkpoint in sorted([*FIXTURES.glob('*.pt'), *FIXTURES.glob('*.ckpt')]):
    assert f'| `{checkpoint.name}` |' in readme, checkpoint.name
