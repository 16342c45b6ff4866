"""Issue 17 through the public API and predict: `resize='none'` keeps each image at its own size, padded and
masked, so an image's probabilities and feature maps do not depend on the other images of its batch.

One workdir of the tests' tiny quickstart (32 px, patch 4, windows of 4, two scales) with random weights
saved as a checkpoint (no training: the numbers only have to be informative, not good).
"""

import math

import numpy as np
from PIL import Image
import pytest

from atlas_jax import inference, predict
from atlas_jax.config import resolve
from atlas_jax.data.decode import BadImageError
from tests.train_configs import random_weights_workdir, run_module, tiny_config

# Three sizes no side of which is a whole number of windows; A is larger than the config's 32 x 32.
SIZE_A, SIZE_B, SIZE_C = (45, 70), (21, 37), (50, 19)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """The tiny quickstart's config and random weights large enough to give probabilities far from uniform."""
  config = resolve(tiny_config())
  return random_weights_workdir(tmp_path_factory.mktemp('any_size') / 'workdir', config)


@pytest.fixture(scope='module')
def atlas(workdir):
  return inference.load(workdir)


@pytest.fixture(scope='module')
def photos():
  rng = np.random.default_rng(1)
  return [rng.integers(0, 256, size + (3,), dtype=np.uint8) for size in (SIZE_A, SIZE_B, SIZE_C)]


def _probabilities(predictions) -> np.ndarray:
  """classify's per-image top-k (all classes) -> (images, classes) probabilities in index order."""
  rows = np.zeros((len(predictions), len(predictions[0])))
  for row, top in zip(rows, predictions):
    for entry in top:
      row[entry['index']] = entry['prob']
  return rows


def test_an_image_is_classified_the_same_alone_and_batched_with_other_sizes(atlas, photos):
  alone = _probabilities(atlas.classify([photos[0]], top_k=4, resize='none'))
  batched = _probabilities(atlas.classify(photos, top_k=4, resize='none'))
  assert batched.shape == (3, 4)
  np.testing.assert_allclose(batched[0], alone[0], atol=1e-5, rtol=0)
  assert np.ptp(alone[0]) > 0.02  # informative: not a uniform answer
  assert np.abs(batched[1] - batched[0]).max() > 1e-3  # and the other images do get their own answers
  # Batches of 2: [B, C] on one canvas, then A alone; the answers come back in the order given.
  model, variables, config = atlas
  in_twos = inference.Predictor(model, variables, config, batch_size=2)
  regrouped = _probabilities(in_twos.classify([photos[1], photos[2], photos[0]], top_k=4, resize='none'))
  np.testing.assert_allclose(regrouped, batched[[1, 2, 0]], atol=1e-5, rtol=0)


def test_features_of_an_image_are_the_same_alone_and_batched_and_cropped_to_its_size(atlas, photos):
  config = atlas.config.model
  patch, pool = config.patch_size, config.pool
  alone = atlas.features([photos[0]], resize='none')
  batched = atlas.features(photos, resize='none')
  assert len(alone) == 1 and len(batched) == 3
  for maps, (height, width) in zip(batched, (SIZE_A, SIZE_B, SIZE_C)):
    expected = [
      (math.ceil(height / patch / pool**s), math.ceil(width / patch / pool**s), config.dim) for s in range(2)
    ]
    assert [feature_map.shape for feature_map in maps] == expected
    assert all(feature_map.dtype == np.float32 for feature_map in maps)
  for alone_map, batched_map in zip(alone[0], batched[0]):
    assert (np.abs(alone_map).max(axis=-1) > 0).all()  # every valid token holds features, none is padding
    np.testing.assert_allclose(batched_map, alone_map, atol=1e-5, rtol=0)


def test_paths_are_images_and_a_wrong_type_is_refused(atlas, photos, tmp_path):
  path = tmp_path / 'a.png'
  Image.fromarray(photos[0]).save(path)
  from_array = atlas.classify([photos[0]], top_k=4, resize='none')
  assert atlas.classify(path, top_k=4, resize='none') == from_array  # PNG is lossless: the same pixels
  assert atlas.classify([str(path)], top_k=4, resize='none') == from_array
  for feature_map, expected in zip(
    atlas.features(path, resize='none')[0], atlas.features(photos[:1], 'none')[0]
  ):
    np.testing.assert_array_equal(feature_map, expected)
  with pytest.raises(BadImageError, match='cannot read the file'):
    atlas.classify(tmp_path / 'missing.png', resize='none')
  for wrong in (42, [{'pixels': 1}]):
    with pytest.raises(inference.InferenceError, match=r'\(str or pathlib.Path\), (a )?PIL images? or'):
      atlas.classify(wrong)


def test_an_unknown_resize_is_one_line_naming_the_three(atlas, photos):
  for call in (atlas.classify, atlas.features):
    with pytest.raises(inference.InferenceError) as raised:
      call(photos[0], resize='stretch')
    assert str(raised.value) == "resize must be one of 'squash', 'crop' or 'none', got 'stretch'"
  with pytest.raises(inference.InferenceError, match='prepare_native'):
    atlas.prepare(photos[0], resize='none')


def test_predict_resize_none_classifies_large_images_of_any_shape(workdir, atlas, tmp_path):
  rng = np.random.default_rng(2)
  paths = [tmp_path / 'wide.jpg', tmp_path / 'tall.jpg']
  for path, (height, width) in zip(paths, [(1000, 1500), (600, 400)]):
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)
  predicted = run_module(
    'atlas_jax.predict',
    f'--checkpoint={workdir}',
    '--resize=none',
    '--batch_size=2',
    '--top_k=2',
    *map(str, paths),
  )
  assert predicted.returncode == 0, predicted.stderr[-2000:]
  assert 'classified 2 images' in predicted.stderr and '0 unreadable' in predicted.stderr
  lines = predicted.stdout.splitlines()
  assert [line.split(': ')[0] for line in lines] == list(map(str, paths))
  # The same two images through the API (one batch of two: the same 1008 x 1504 canvas).
  expected = atlas.classify(paths, top_k=2, resize='none')
  for line, top in zip(lines, expected):
    assert line.split(': ', 1)[1] == ', '.join(f'{entry["label"]} {entry["prob"]:.4f}' for entry in top)


def test_predict_refuses_bad_resize_and_crop_pct_in_one_line(workdir, tmp_path):
  result = run_module('atlas_jax.predict', f'--checkpoint={workdir}', '--resize=stretch', str(tmp_path))
  assert result.returncode == 1
  assert result.stderr == "error: --resize must be one of squash, crop or none, got 'stretch'\n"
  for value in ('abc', '0', '1.5', 'nan'):
    with pytest.raises(predict.PredictError, match=r'--crop_pct must be a number in \(0, 1\]'):
      predict.parse_crop_pct(value)
  assert predict.parse_crop_pct('0.9') == 0.9
