"""The quickstart's task, `data.synthetic_task='colour_pairs'` (docs/synthetic_task.md): layout, label,
balanced classes, and the numerical check that neither one window's content nor a sum of per-window
evidence predicts the label, while the two markers together determine it."""

import numpy as np
import pytest

from atlas_jax.data import sources
from atlas_jax.data.sources import DataSourceError
from atlas_jax.data.sources.synthetic import SyntheticColourPairs, SyntheticLongRange
from configs import common

NUM_CLASSES = SyntheticColourPairs.num_classes
WINDOW_PX = 16  # the quickstart's fine windows: 4 x 4 tokens of 4 x 4 pixels


def _data_config(**fields):
  data = common.data_config()
  data.update({'source': 'synthetic', **fields})
  return data


def test_the_config_field_picks_the_task_and_an_unknown_one_is_one_line():
  assert common.data_config().synthetic_task == 'colour_pairs'
  new = sources.make_source(_data_config(synthetic_val_size=4), 64, 'validation', 0)
  assert type(new) is SyntheticColourPairs
  old = sources.make_source(
    _data_config(synthetic_task='markers_v1', synthetic_val_size=4), 64, 'validation', 0
  )
  assert type(old) is SyntheticLongRange
  with pytest.raises(DataSourceError, match='^data.synthetic_task must be one of colour_pairs, markers_v1'):
    sources.make_source(_data_config(synthetic_task='pairs'), 64, 'train', 0)


def _boxes(params):
  """(colour, top, left) of both markers: A (left part), then B (right part)."""
  return [(params.colour_a, params.top_a, params.left_a), (params.colour_b, params.top_b, params.left_b)]


@pytest.mark.parametrize('image_size', [64, (70, 90)])
def test_rendering_matches_the_described_layout_and_label(image_size):
  source = SyntheticColourPairs(image_size, 30, seed=4)
  height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
  for index in range(30):
    params = source.describe(index)
    assert params.label == params.colour_a ^ params.colour_b
    example = source[index]
    assert example['label'] == params.label
    image = example['image'].astype(np.int16)
    outside = np.ones(image.shape[:2], bool)
    for colour, top, left in _boxes(params):
      box = image[top : top + params.side, left : left + params.side]
      assert np.abs(box - SyntheticColourPairs.PALETTE[colour]).max() <= SyntheticColourPairs.NOISE
      outside[top : top + params.side, left : left + params.side] = False
    assert np.abs(image[outside] - SyntheticColourPairs.BACKGROUND).max() <= SyntheticColourPairs.NOISE
    assert params.left_a + params.side <= (3 * width) // 8 and params.left_b >= 5 * width / 8
    assert params.top_a + params.side <= height and params.top_b + params.side <= height
    assert params.left_b + params.side <= width


def _window_contents(params, size=64):
  """(examples, windows): the palette index + 1 of the marker part inside each 16-pixel window, 0 if none;
  (examples, windows) bool: whether the window holds a part of marker A."""
  grid = size // WINDOW_PX
  contents = np.zeros((len(params), grid * grid), np.int64)
  holds_a = np.zeros(contents.shape, bool)
  for row, p in enumerate(params):
    for marker, (colour, top, left) in enumerate(_boxes(p)):
      for window_row in range(top // WINDOW_PX, (top + p.side - 1) // WINDOW_PX + 1):
        for window_col in range(left // WINDOW_PX, (left + p.side - 1) // WINDOW_PX + 1):
          window = window_row * grid + window_col
          assert contents[row, window] == 0  # markers never share a window at this size
          contents[row, window] = colour + 1
          holds_a[row, window] = marker == 0  # marker A
  return contents, holds_a


def _one_hot(values, depth):
  return np.eye(depth)[values]


def _least_squares(features, labels, train, test):
  """Least squares from features (+ a bias) to one-hot labels -> (held-out accuracy, squared error)."""
  design = np.concatenate([features, np.ones((len(features), 1))], axis=1)
  weights, *_ = np.linalg.lstsq(design[train], _one_hot(labels[train], NUM_CLASSES), rcond=None)
  scores = design[test] @ weights
  error = np.mean(np.sum((scores - _one_hot(labels[test], NUM_CLASSES)) ** 2, axis=1))
  return np.mean(np.argmax(scores, axis=1) == labels[test]), error


def test_classes_are_uniform_and_no_window_alone_or_windows_added_predict_the_label():
  examples = 8000
  source = SyntheticColourPairs(64, examples, seed=2)
  params = [source.describe(index) for index in range(examples)]
  labels = np.array([p.label for p in params])
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  assert counts.min() >= 1850 and counts.max() <= 2150, counts  # 2000 expected, ~4.5 binomial sigmas
  contents, holds_a = _window_contents(params)
  # No window ever holds parts of both markers: A's lie in window columns 0-1, B's in 2-3.
  a_columns = np.nonzero(holds_a.reshape(examples, 4, 4).any(axis=(0, 1)))[0]
  b_columns = np.nonzero(((contents > 0) & ~holds_a).reshape(examples, 4, 4).any(axis=(0, 1)))[0]
  assert set(a_columns) == {0, 1} and set(b_columns) == {2, 3}
  # Window-local: the label given any one window's content (which colour it holds, or none) stays uniform:
  # the largest deviation of P(label | window content) from 1/4 over all windows and contents.
  worst = 0.0
  for window in range(contents.shape[1]):
    for value in np.unique(contents[:, window]):
      chosen = labels[contents[:, window] == value]
      if len(chosen) >= 200:
        worst = max(worst, np.abs(np.bincount(chosen, minlength=NUM_CLASSES) / len(chosen) - 0.25).max())
  assert worst < 0.06, worst
  # Window-additive: class scores summed over windows (one-hot content per window) explain nothing held
  # out (the constant 1/4 has squared error 3/4); the two colours jointly
  # determines the label.
  train, test = slice(0, examples // 2), slice(examples // 2, examples)
  additive = np.concatenate([_one_hot(contents[:, w], 5) for w in range(contents.shape[1])], axis=1)
  additive_accuracy, additive_error = _least_squares(additive, labels, train, test)
  assert additive_error > 0.75 - 0.01 and additive_accuracy < 0.31, (additive_accuracy, additive_error)
  joint = _one_hot(np.array([p.colour_a * 4 + p.colour_b for p in params]), 16)
  joint_accuracy, joint_error = _least_squares(joint, labels, train, test)
  assert joint_accuracy == 1.0 and joint_error < 1e-6


def test_the_label_is_which_channels_the_two_colours_share():
  # docs/synthetic_task.md: with the palette at corners of the RGB cube, class 0 shares all three
  # channels' levels, class 1 only blue, class 2 only green, class 3 only red.
  high = SyntheticColourPairs.PALETTE > 128
  shared = {0: (True, True, True), 1: (False, False, True), 2: (False, True, False), 3: (True, False, False)}
  for a in range(4):
    for b in range(4):
      assert tuple(high[a] == high[b]) == shared[a ^ b]
