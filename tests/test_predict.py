"""Inference for users: predict on a folder through the command line, the features API, class labels.

One workdir of the tests' tiny quickstart (32 px, two scales), trained for 2 steps through
`python -m atlas_jax.main`, serves every test that needs a checkpoint.
"""

import io
import json
import os

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from atlas_jax import inference, predict, run_setup
from atlas_jax import workdir as workdir_lib
from atlas_jax.config import resolve
from atlas_jax.errors import AtlasError
from atlas_jax.models import build_model
from atlas_jax.models.msa import windows_from_map
from configs import common
from tests.train_configs import ROOT, command_line_overrides, run_module, tiny_config


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('quickstart') / 'workdir'
  trained = run_module(
    'atlas_jax.main',
    '--config=configs/quickstart.py:steps=2',
    f'--workdir={workdir}',
    *command_line_overrides(),
  )
  assert trained.returncode == 0, trained.stderr[-2000:]
  return workdir


@pytest.fixture(scope='module')
def atlas(workdir):
  return inference.load(workdir)


def _image_folder(root):
  """Images of several formats, modes and sizes (one nested), a broken file, and a file that is no image."""
  rng = np.random.default_rng(0)
  folder = root / 'images'
  (folder / 'nested').mkdir(parents=True)
  pixels = lambda height, width: rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  Image.fromarray(pixels(64, 64)).save(folder / 'a.png')
  Image.fromarray(pixels(300, 200)).save(folder / 'b.jpg', quality=90)
  Image.fromarray(pixels(17, 41)).convert('L').save(folder / 'c.bmp')
  rgba = np.concatenate([pixels(50, 90), pixels(50, 90)[..., :1]], axis=-1)
  Image.fromarray(rgba, 'RGBA').save(folder / 'd.webp')
  Image.fromarray(pixels(33, 33)).convert('P').save(folder / 'nested' / 'e.gif')
  Image.fromarray(pixels(48, 20)).save(folder / 'nested' / 'f.tiff')
  (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\nnot really a png')
  (folder / 'notes.txt').write_text('not an image, and skipped by its suffix')
  readable = ['a.png', 'b.jpg', 'c.bmp', 'd.webp', 'nested/e.gif', 'nested/f.tiff']
  return folder, [folder / name for name in readable]


def test_predict_a_folder_on_two_devices_through_the_command_line(workdir, atlas, tmp_path):
  folder, readable = _image_folder(tmp_path)
  output = tmp_path / 'predictions.jsonl'
  # Two CPU devices: each batch of 4 is split 2 + 2; 7 files make 2 batches (progress bar on).
  two_devices = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'
  predicted = run_module(
    'atlas_jax.predict',
    f'--checkpoint={workdir}',
    f'--output={output}',
    '--top_k=3',
    '--batch_size=4',
    '--dtype=float32',
    str(folder),
    env={'XLA_FLAGS': two_devices},
  )
  assert predicted.returncode == 0, predicted.stderr[-2000:]
  assert 'broken.png' in predicted.stderr and '6 images' in predicted.stderr
  assert '1 unreadable' in predicted.stderr and 'on 2 cpu device(s)' in predicted.stderr
  assert 'predict: 100%' in predicted.stderr and '7/7 [' in predicted.stderr  # tqdm's bar
  assert predicted.stdout == ''
  lines = [json.loads(line) for line in output.read_text().splitlines()]
  assert [line['path'] for line in lines] == [str(path) for path in sorted(readable)]
  for line in lines:
    assert set(line) == {'path', 'top_k', 'logits'} and len(line['logits']) == 4
    assert [set(entry) for entry in line['top_k']] == [{'index', 'label', 'prob'}] * 3
    assert all(entry['label'] == atlas.labels[entry['index']] for entry in line['top_k'])
    probabilities = np.exp(line['logits']) / np.sum(np.exp(line['logits']))
    np.testing.assert_allclose(
      [entry['prob'] for entry in line['top_k']], np.sort(probabilities)[::-1][:3], rtol=1e-5
    )
  # The same logits as the Python API on one device, from the same files (one at a time: one compiled shape).
  logits = [
    atlas.logits(
      inference.load_image(
        line['path'], atlas.image_size, atlas.config.data.max_pixels, atlas.config.data.max_decode_bytes
      )[None]
    )[0]
    for line in lines
  ]
  np.testing.assert_allclose([line['logits'] for line in lines], logits, rtol=1e-5, atol=1e-5)


def test_classify_takes_arrays_and_pil_images_of_any_size(atlas):
  rng = np.random.default_rng(1)
  photo = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
  as_pil = atlas.classify([Image.fromarray(photo)], top_k=10)
  assert len(as_pil) == 1 and len(as_pil[0]) == 4  # top_k capped at the number of classes
  assert as_pil == atlas.classify(photo, top_k=10)
  float_photo = atlas.classify(photo.astype(np.float32) / 255.0, top_k=10)[0]
  np.testing.assert_allclose(
    [entry['prob'] for entry in float_photo], [entry['prob'] for entry in as_pil[0]], atol=1e-6
  )
  assert set(atlas.labels) == set(inference.SYNTHETIC_CLASS_NAMES)
  with pytest.raises(inference.InferenceError, match=r'values in \[0, 1\]'):
    atlas.classify(photo.astype(np.float32))
  with pytest.raises(inference.InferenceError, match='uint8 or float'):
    atlas.classify(photo.astype(np.int64))


def test_features_are_the_last_tokens_of_each_scale(atlas):
  """The trained tiny quickstart (two scales, two stages): scale 0 after stage 0, scale 1 after stage 1."""
  rng = np.random.default_rng(2)
  photos = rng.integers(0, 256, (3, 40, 24, 3), dtype=np.uint8)
  maps = atlas.features(photos)
  model, variables, config = atlas
  _, stages = jax.jit(lambda images: model.apply(variables, images, method='encode'))(atlas.prepare(photos))
  assert [feature_map.shape for feature_map in maps] == [(3, 8, 8, 16), (3, 4, 4, 16)]
  assert [feature_map.shape for feature_map in maps] == inference.feature_shapes(config, batch_size=3)
  np.testing.assert_allclose(windows_from_map(maps[0], 4, 4), stages[0][0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(windows_from_map(maps[1], 4, 4), stages[1][0], rtol=1e-5, atol=1e-5)


def test_scales_the_last_stage_keeps_come_from_the_last_stage():
  """Three scales (16, 8 and 4 tokens a side) in two stages: scale 0 from stage 0, which drops it; scales 1
  and 2 from stage 1. Random weights, one compiled forward."""
  model = build_model(resolve(tiny_config(image_size=(64, 64))))
  images = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype(np.float32)
  rng = np.random.default_rng(4)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)
  variables = jax.tree.map(lambda leaf: (0.2 * rng.normal(size=leaf.shape)).astype(leaf.dtype), abstract)

  @jax.jit
  def stages_and_maps(images):
    stages = model.apply(variables, images, method='encode')[1]
    return stages, model.apply(variables, stages, method='scale_maps')

  stages, maps = stages_and_maps(images)
  assert [feature_map.shape for feature_map in maps] == [(2, 16, 16, 16), (2, 8, 8, 16), (2, 4, 4, 16)]
  for scale, (stage, index) in enumerate([(0, 0), (1, 0), (1, 1)]):
    np.testing.assert_array_equal(windows_from_map(maps[scale], 4, 4), stages[stage][index])
  assert np.abs(windows_from_map(maps[1], 4, 4) - stages[0][1]).max() > 1e-3  # stage 1 did change scale 1


# The shapes documented in atlas_jax/inference.py and the README, at batch 1.
DOCUMENTED_SHAPES = {
  ('S', 1024): [(1, 64, 64, 384), (1, 16, 16, 384)],
  ('S', 2048): [(1, 128, 128, 384), (1, 32, 32, 384), (1, 8, 8, 384)],
  ('B', 1024): [(1, 64, 64, 768), (1, 16, 16, 768)],
  ('B', 2048): [(1, 128, 128, 768), (1, 32, 32, 768), (1, 8, 8, 768)],
}


@pytest.mark.parametrize('variant, size', list(DOCUMENTED_SHAPES))
def test_feature_shapes_are_the_documented_ones(variant, size):
  shapes = inference.feature_shapes(common.base_config(variant, size))
  assert shapes == DOCUMENTED_SHAPES[variant, size]
  documented = '   '.join(f'({", ".join(map(str, shape))})' for shape in shapes)
  row = f'atlas_{variant.lower()}_{size}'
  assert any(
    line.split()[0] == row and ' '.join(line.split()[1:]) == ' '.join(documented.split())
    for line in inference.__doc__.splitlines()
    if line.strip().startswith(row)
  )
  assert all(f'`{shape}`' in (ROOT / 'README.md').read_text() for shape in map(str, shapes))


def test_class_labels_give_readable_names_to_wordnet_ids(tmp_path):
  config = common.base_config('T', 512)
  names, labels = inference.class_names(config), inference.class_labels(config)
  assert len(labels) == 100 and names == sorted(names)
  assert labels[names.index('n01749939')] == 'green mamba' and len(set(labels)) == 100
  (tmp_path / 'classes.txt').write_text('n02123045\nzebra_crossing\n')
  config.data.classes, config.model.num_classes = str(tmp_path / 'classes.txt'), 2
  assert inference.class_labels(config) == ['tabby cat', 'zebra_crossing']
  for name in ('n02119022', 'cars', '.hidden'):  # an image folder's classes: the sorted subfolders of train/
    (tmp_path / 'data' / 'train' / name).mkdir(parents=True)
  config.data.update(classes=None, source='folder', data_dir=str(tmp_path / 'data'))
  assert inference.class_labels(config) == ['cars', 'red fox']


def test_checkpoint_origin_reads_the_workdir(workdir, tmp_path):
  assert 'synthetic long-range task' in inference.checkpoint_origin(workdir)
  converted = tmp_path / 'converted'
  config = common.base_config('S', 1024)
  config.model.parent_window = 'raster'
  workdir_lib.write_config(converted, config)
  assert inference.checkpoint_origin(converted).startswith('a converted reference checkpoint')
  assert 'parent_window=raster' in inference.checkpoint_origin(converted)
  (converted / 'metrics.jsonl').write_text('')
  assert inference.checkpoint_origin(converted).startswith('a run of atlas_jax: atlas')


def test_dtype_is_float32_on_cpu_unless_asked(workdir):
  model, _, config = inference.load(workdir, dtype='bfloat16')
  assert model.dtype == jax.numpy.bfloat16 and config.model.dtype == 'float32'  # the quickstart's own
  assert run_setup.compute_dtype(config) == 'float32'
  config.model.dtype = 'bfloat16'
  assert run_setup.compute_dtype(config) == 'float32'  # on CPU, whatever the config says
  assert run_setup.compute_dtype(config, 'bfloat16') == 'bfloat16'
  with pytest.raises(AtlasError, match='dtype must be one of'):
    run_setup.compute_dtype(config, 'int8')


class _UniformPredictor:
  """What predict.run needs of a Predictor: equal logits for every image, batches of 2."""

  batch_size, image_size, labels = 2, (8, 8), ['cat', 'dog']
  config = ml_collections.ConfigDict(
    {'data': {'max_pixels': 10_000, 'max_decode_bytes': 1 << 30, 'resize': 'squash', 'crop_pct': 0.875}}
  )

  def logits(self, images, pad_to=None):
    return np.zeros((len(images), len(self.labels)), np.float32)


def _progress_updates(stderr: str) -> list[str]:
  return [update for update in stderr.replace('\n', '\r').split('\r') if update.startswith('predict:')]


def test_progress_bar_counts_every_image_and_redraws_a_log_about_every_tenth(tmp_path):
  paths = []
  for index in range(41):
    paths.append(tmp_path / f'{index:02d}.png')
    Image.fromarray(np.full((8, 8, 3), index, np.uint8)).save(paths[-1])
  paths[3].write_bytes(b'not a png')
  stdout, stderr = io.StringIO(), io.StringIO()  # not terminals
  classified, unreadable = predict.run(_UniformPredictor(), paths, stdout=stdout, stderr=stderr)
  assert (classified, unreadable) == (40, 1) and len(stdout.getvalue().splitlines()) == 40
  updates = _progress_updates(stderr.getvalue())
  assert updates[0].startswith('predict:   0%') and '0/41' in updates[0]
  assert updates[-1].startswith('predict: 100%') and '41/41 [' in updates[-1] and 'images/s' in updates[-1]
  assert 3 <= len(updates) <= 13  # 21 batches, drawn only after 5 more images (ceil(41 / 10))
  assert '\npredict: skipping ' + str(paths[3]) in '\n' + stderr.getvalue().replace('\r', '\n')
  # One batch: no bar.
  stderr = io.StringIO()
  predict.run(_UniformPredictor(), paths[:2], stdout=io.StringIO(), stderr=stderr)
  assert stderr.getvalue() == ''


def test_a_folder_without_image_files_is_refused(tmp_path):
  (tmp_path / 'notes.txt').write_text('no image here')
  with pytest.raises(predict.PredictError, match='no image files in'):
    predict.image_paths([tmp_path])
