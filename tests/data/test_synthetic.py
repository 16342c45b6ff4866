"""Tests for atlas_jax.data.sources: the synthetic long-range task of synthetic.py (determinism, layout,
label, the claim of docs/synthetic_task.md that additive evidence cannot solve it) and make_source's
dispatch and messages."""

import numpy as np
import pytest

from atlas_jax.data import sources
from atlas_jax.data.sources import DataSourceError, SyntheticLongRange
from atlas_jax.errors import AtlasError
from configs import common

NUM_CLASSES = SyntheticLongRange.num_classes


def test_same_index_gives_the_same_bytes_in_any_call_order():
  source = SyntheticLongRange((64, 96), 50, seed=3)
  first = source[7]
  for index in (9, 0, 49):
    source[index]
  again = SyntheticLongRange((64, 96), 50, seed=3)[7]
  assert first['image'].tobytes() == again['image'].tobytes()
  assert first['label'] == again['label']


def test_seed_and_split_change_the_examples():
  image = SyntheticLongRange(64, 10, seed=0)[4]['image']
  assert not np.array_equal(image, SyntheticLongRange(64, 10, seed=1)[4]['image'])
  assert not np.array_equal(image, SyntheticLongRange(64, 10, seed=0, split='validation')[4]['image'])


@pytest.mark.parametrize('image_size', [(32, 48), (128, 128), (256, 192), 40])
def test_any_resolution(image_size):
  source = SyntheticLongRange(image_size, 20)
  height, width = sources.image_size_pair(image_size)
  for index in range(20):
    example = source[index]
    assert example['image'].shape == (height, width, 3) and example['image'].dtype == np.uint8
    assert example['label'].dtype == np.int32 and example['label'].shape == ()


def test_too_small_images_and_bad_indices_are_refused():
  with pytest.raises(DataSourceError, match='at least 32x32'):
    SyntheticLongRange((31, 64), 10)
  source = SyntheticLongRange(32, 10)
  with pytest.raises(IndexError):
    source[10]
  with pytest.raises(IndexError):
    source[-1]


def test_label_formula_and_rendered_markers():
  source = SyntheticLongRange((96, 128), 30, seed=5)
  for index in range(30):
    params = source.describe(index)
    example = source[index]
    assert params.label == (params.colour_a ^ params.colour_b) + 2 * (params.region_a ^ params.region_b)
    assert 0 <= params.label < NUM_CLASSES
    assert example['label'] == params.label
    image = example['image'].astype(np.int16)
    side = params.side
    for colour, top, left in (
      (params.colour_a, params.top_a, params.left_a),
      (params.colour_b, params.top_b, params.left_b),
    ):
      box = image[top : top + side, left : left + side].reshape(-1, 3)
      # Every pixel of a marker is its palette colour up to the background's noise.
      assert np.abs(box - SyntheticLongRange.PALETTE[colour]).max() <= SyntheticLongRange.NOISE
    outside = np.ones(image.shape[:2], bool)
    outside[params.top_a : params.top_a + side, params.left_a : params.left_a + side] = False
    outside[params.top_b : params.top_b + side, params.left_b : params.left_b + side] = False
    assert np.abs(image[outside] - SyntheticLongRange.BACKGROUND).max() <= SyntheticLongRange.NOISE


@pytest.mark.parametrize('image_size', [(32, 32), (32, 48), (200, 120), (256, 512), (33, 35)])
def test_markers_are_far_apart_and_each_in_its_half(image_size):
  height, width = image_size
  source = SyntheticLongRange(image_size, 300)
  for index in range(300):
    params = source.describe(index)
    side = params.side
    assert params.left_a >= 0 and params.left_a + side <= width // 2
    assert params.left_b >= width / 2 and params.left_b + side <= width
    assert params.left_b - (params.left_a + side) >= width / 4
    for top, region in ((params.top_a, params.region_a), (params.top_b, params.region_b)):
      assert (top + side / 2 < height / 2) == bool(region)
      if region:
        assert 0 <= top and top + side <= height // 2
      else:
        assert top >= height / 2 and top + side <= height


def test_classes_are_balanced():
  source = SyntheticLongRange(64, 2000, seed=1)
  counts = np.bincount([source.describe(index).label for index in range(2000)], minlength=NUM_CLASSES)
  # 500 expected per class; 3 standard deviations of a binomial count are about 58.
  assert counts.min() >= 440 and counts.max() <= 560, counts


def _one_hot(values, depth):
  return np.eye(depth)[values]


def _least_squares_fit(train_features, train_labels, test_features, test_labels):
  """Least squares from features (+ a bias) to one-hot labels -> (test accuracy, test squared error)."""
  design = np.concatenate([train_features, np.ones((len(train_features), 1))], axis=1)
  weights, *_ = np.linalg.lstsq(design, _one_hot(train_labels, NUM_CLASSES), rcond=None)
  test_design = np.concatenate([test_features, np.ones((len(test_features), 1))], axis=1)
  scores = test_design @ weights  # (examples, classes)
  squared_error = np.mean(np.sum((scores - _one_hot(test_labels, NUM_CLASSES)) ** 2, axis=1))
  return np.mean(np.argmax(scores, axis=1) == test_labels), squared_error


def test_additive_evidence_stays_near_chance_and_joint_evidence_solves_it():
  """docs/synthetic_task.md (i): scores u(A) + v(B) cannot represent the label; the joint one-hot can."""
  source = SyntheticLongRange(64, 8000, seed=2)
  params = [source.describe(index) for index in range(8000)]
  marker_a = np.array([p.colour_a * 2 + p.region_a for p in params])  # all the label uses of A
  marker_b = np.array([p.colour_b * 2 + p.region_b for p in params])  # ... and of B
  labels = np.array([p.label for p in params])
  additive = np.concatenate([_one_hot(marker_a, 4), _one_hot(marker_b, 4)], axis=1)
  joint = _one_hot(marker_a * 4 + marker_b, 16)
  train, test = slice(0, 4000), slice(4000, 8000)
  additive_accuracy, additive_error = _least_squares_fit(
    additive[train], labels[train], additive[test], labels[test]
  )
  joint_accuracy, joint_error = _least_squares_fit(joint[train], labels[train], joint[test], labels[test])
  # The additive scores explain nothing: held out, they do no better than the constant 1/4 per class
  # (squared error 3/4). Their argmax only breaks near-ties by sampling noise, hence near chance.
  constant_error = 1 - 1 / NUM_CLASSES
  assert additive_error > constant_error - 0.005, additive_error
  assert additive_accuracy < 0.4, additive_accuracy
  assert joint_accuracy == 1.0 and joint_error < 1e-6


# make_source


def data_config(**fields):
  """The data fields of configs/common.py (every field, as a resolved config has), synthetic."""
  data = common.data_config()
  data.update({'source': 'synthetic', **fields})
  return data


def test_make_source_synthetic_defaults_and_sizes():
  train = sources.make_source(data_config(), 64, 'train', seed=1)
  validation = sources.make_source(data_config(), (64, 96), 'validation', seed=1)
  assert len(train) == common.data_config().synthetic_train_size
  assert len(validation) == common.data_config().synthetic_val_size
  assert validation.image_shape == (64, 96, 3) and validation.split == 'validation'
  sized = sources.make_source(data_config(synthetic_train_size=100, synthetic_val_size=10), 64, 'train', 0)
  assert len(sized) == 100
  assert len(sources.make_source(data_config(synthetic_val_size=10), 64, 'validation', 0)) == 10


def test_make_source_with_the_common_config():
  config = common.base_config('T', 64)
  config.data.source = 'synthetic'
  source = sources.make_source(config.data, config.image_size, 'train', config.seed)
  assert source.image_shape == (64, 64, 3)


@pytest.mark.parametrize('name', ['tfds', 'folder'])
def test_make_source_without_data_dir_says_what_to_set(name):
  data = common.data_config()
  data.source = name
  with pytest.raises(DataSourceError) as error:
    sources.make_source(data, 64, 'train', 0)
  message = str(error.value)
  assert '\n' not in message
  assert f"data.source='{name}'" in message
  assert 'data_dir=None' in message  # where it looked: nowhere was given
  assert '--config.data.data_dir=' in message and '--config.data.source=synthetic' in message


def test_make_source_refuses_unknown_names_and_splits():
  with pytest.raises(DataSourceError, match='known: synthetic, tfds, folder'):
    sources.make_source(data_config(source='imagenet'), 64, 'train', 0)
  with pytest.raises(DataSourceError, match='split'):
    sources.make_source(data_config(), 64, 'test', 0)
  assert issubclass(DataSourceError, ValueError) and issubclass(DataSourceError, AtlasError)
