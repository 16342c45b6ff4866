"""Tests for atlas_jax.data.transforms, the host side: each augmentation's draws against its definition over
many samples (crop scale and ratio, flip rate, RandAugment's two operations and magnitude), the operations
against their definitions, eval resize = PIL bicubic, and determinism. The part inside the train step is
tests/test_augment.py; the augment fields' range checks are tests/test_config.py."""

import math

import numpy as np
from PIL import Image
import pytest

from atlas_jax.data import transforms
from atlas_jax.data.transforms import CropBox, RandAugmentOp
from configs import common
from tests.data.image_files import folder_config, photo

SAMPLES = 4000
# 4.5 binomial standard deviations of a rate near 1/2 over SAMPLES draws: a correct draw fails ~1 in 150,000.
RATE_TOLERANCE = 4.5 * math.sqrt(0.25 / SAMPLES)
# The reference's augmentation as the arguments of the sample_* draws (configs/common.py holds the values).
AUGMENT = common.augment_config()
CROP = {'scale': AUGMENT.crop_scale, 'ratio': AUGMENT.crop_ratio}
RAND_AUGMENT = {
  'num_ops': AUGMENT.randaug_num_ops,
  'magnitude': AUGMENT.randaug_magnitude,
  'magnitude_std': AUGMENT.randaug_magnitude_std,
  'magnitude_max': AUGMENT.randaug_magnitude_max,
  'prob': AUGMENT.randaug_prob,
}


# ---------------------------------------------------------------------------------------------------
# Random resized crop and flip.


def test_crop_boxes_lie_inside_with_the_scale_and_ratio_of_the_definition():
  rng = np.random.default_rng(0)
  height, width = 375, 500
  boxes = np.array([transforms.sample_crop_box(height, width, rng, **CROP) for _ in range(SAMPLES)])
  tops, lefts, box_heights, box_widths = boxes.T
  assert (tops >= 0).all() and (lefts >= 0).all()
  assert (tops + box_heights <= height).all() and (lefts + box_widths <= width).all()
  # Ranges, with one pixel of rounding on each side.
  area = box_heights * box_widths / (height * width)
  assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
  ratio = box_widths / box_heights
  rounding = 2 / box_heights.min()
  assert ratio.min() >= 0.75 * (1 - rounding) and ratio.max() <= 4 / 3 * (1 + rounding)
  # Both ends of both ranges are reached.
  assert area.min() < 0.09 and area.max() > 0.97
  assert ratio.min() < 0.77 and ratio.max() > 1.3


def test_crop_area_is_uniform_and_ratio_log_uniform_where_every_attempt_fits():
  # On a square image, scale <= 0.5 and ratio <= 4/3 keep every side below the image's: no attempt is
  # rejected, so the draws are the definition's distributions themselves.
  rng = np.random.default_rng(1)
  side = 1000
  boxes = np.array(
    [transforms.sample_crop_box(side, side, rng, **{**CROP, 'scale': (0.08, 0.5)}) for _ in range(SAMPLES)]
  )
  area = boxes[:, 2] * boxes[:, 3] / side**2
  log_ratio = np.log(boxes[:, 3] / boxes[:, 2])
  # Uniform quantiles within 0.03 (a Kolmogorov distance far beyond chance at 4000 samples).
  quantiles = np.linspace(0.1, 0.9, 9)
  np.testing.assert_allclose(np.quantile(area, quantiles), 0.08 + 0.42 * quantiles, atol=0.03 * 0.42)
  log_low, log_high = math.log(3 / 4), math.log(4 / 3)
  np.testing.assert_allclose(
    np.quantile(log_ratio, quantiles),
    log_low + (log_high - log_low) * quantiles,
    atol=0.03 * (log_high - log_low),
  )
  # Positions uniform over the free range: the centre of the boxes averages the image's centre.
  centres = boxes[:, 0] + boxes[:, 2] / 2
  assert abs(centres.mean() - side / 2) < 10


def test_crop_falls_back_to_the_centre_with_the_ratio_clamped():
  rng = np.random.default_rng(2)
  # Much wider than 4/3: no attempt fits, the centre crop is as high as the image and 4/3 as wide.
  assert transforms.sample_crop_box(10, 1000, rng, **CROP) == CropBox(0, (1000 - 13) // 2, 10, 13)
  assert transforms.sample_crop_box(1000, 10, rng, **CROP) == CropBox((1000 - 13) // 2, 0, 13, 10)


def test_flip_rate_is_one_half_and_flips_the_crop():
  transform = transforms.train_transform(folder_config(randaug_num_ops=0))
  rng = np.random.default_rng(3)
  flips = np.array([transform.draw(375, 500, rng).flip for _ in range(SAMPLES)])
  assert abs(flips.mean() - 0.5) < RATE_TOLERANCE
  image = photo(75, 100)
  draw = transform.draw(75, 100, np.random.default_rng(4))
  unflipped = transform.apply(image, draw._replace(flip=False))
  np.testing.assert_array_equal(transform.apply(image, draw._replace(flip=True)), unflipped[:, ::-1])


# ---------------------------------------------------------------------------------------------------
# RandAugment.


def test_rand_augment_draws_two_operations_of_the_increasing_set_with_magnitude_around_9():
  rng = np.random.default_rng(5)
  draws = [transforms.sample_rand_augment(rng, **RAND_AUGMENT) for _ in range(SAMPLES)]
  assert all(len(ops) == 2 for ops in draws)
  ops = [op for drawn in draws for op in drawn]
  names = [op.name for op in ops]
  assert set(names) == set(transforms.RAND_AUGMENT_OPS) and len(transforms.RAND_AUGMENT_OPS) == 15
  counts = np.array([names.count(name) for name in transforms.RAND_AUGMENT_OPS])
  expected = len(ops) / 15
  assert np.abs(counts - expected).max() < 4.5 * math.sqrt(expected)  # uniform choice
  # With replacement, as timm: both operations the same one time in 15.
  same = np.mean([first.name == second.name for first, second in draws])
  assert abs(same - 1 / 15) < 4.5 * math.sqrt(1 / 15 * 14 / 15 / SAMPLES)
  assert abs(np.mean([op.applied for op in ops]) - 0.5) < RATE_TOLERANCE / math.sqrt(2)
  assert abs(np.mean([op.negate for op in ops]) - 0.5) < RATE_TOLERANCE / math.sqrt(2)
  magnitudes = np.array([op.magnitude for op in ops])
  assert magnitudes.min() >= 0.0 and magnitudes.max() <= 10.0
  # N(9, 0.5) clipped at 10 (2 sigma): mean 8.99, standard deviation 0.49.
  assert abs(magnitudes.mean() - 8.99) < 0.03 and abs(magnitudes.std() - 0.49) < 0.03


def test_rand_augment_magnitude_is_clipped_to_10():
  rng = np.random.default_rng(6)
  magnitudes = np.array(
    [
      op.magnitude
      for _ in range(SAMPLES)
      for op in transforms.sample_rand_augment(rng, **{**RAND_AUGMENT, 'magnitude': 9.8})
    ]
  )
  assert magnitudes.max() == 10.0
  # P(N(9.8, 0.5) > 10) = P(z > 0.4) = 0.345 of the draws sit exactly on the bound.
  assert abs(np.mean(magnitudes == 10.0) - 0.3446) < RATE_TOLERANCE / math.sqrt(2)


def apply_op(image: np.ndarray, name: str, magnitude: float = 9.0, negate: bool = False) -> np.ndarray:
  return np.asarray(
    transforms.apply_rand_augment_op(Image.fromarray(image), RandAugmentOp(name, True, magnitude, negate))
  )


def test_operations_follow_their_definitions():
  image = photo(40, 40, seed=7)
  wide = image.astype(np.int32)
  np.testing.assert_array_equal(apply_op(image, 'Invert'), 255 - image)
  # Magnitude 9: posterize keeps 4 - int(3.6) = 1 bit; solarize inverts from 256 - int(230.4) = 26;
  # solarize-add adds int(99) below 128; enhance factors 1 +- 0.81.
  np.testing.assert_array_equal(apply_op(image, 'PosterizeIncreasing'), image & 0x80)
  np.testing.assert_array_equal(apply_op(image, 'PosterizeIncreasing', 10.0), 0)  # 0 bits: black
  np.testing.assert_array_equal(apply_op(image, 'PosterizeIncreasing', 0.0), image & 0xF0)
  np.testing.assert_array_equal(
    apply_op(image, 'SolarizeIncreasing'), np.where(image >= 26, 255 - image, image)
  )
  np.testing.assert_array_equal(
    apply_op(image, 'SolarizeAdd'), np.where(wide < 128, np.minimum(wide + 99, 255), wide)
  )
  brighter = np.clip(np.round(wide * 1.81), 0, 255)
  assert np.abs(apply_op(image, 'BrightnessIncreasing') - brighter).max() <= 1
  darker = np.round(wide * 0.19)
  assert np.abs(apply_op(image, 'BrightnessIncreasing', negate=True) - darker).max() <= 1
  # The factor never falls below 0.1: magnitude 10 darkens to 0.1, not 0.
  assert np.abs(apply_op(image, 'BrightnessIncreasing', 10.0, negate=True) - np.round(wide * 0.1)).max() <= 1
  assert (apply_op(image, 'AutoContrast').reshape(-1, 3).min(0) == 0).all()
  # Translate by 0.45 * 40 = 18 px at magnitude 10: whole-pixel shifts copy exactly; the rest is the fill.
  shifted = apply_op(image, 'TranslateXRel', 10.0)
  np.testing.assert_array_equal(shifted[:, :22], image[:, 18:])
  assert (shifted[:, 22:] == transforms.FILL).all()
  shifted = apply_op(image, 'TranslateYRel', 10.0, negate=True)
  np.testing.assert_array_equal(shifted[18:], image[:22])
  assert (shifted[:18] == transforms.FILL).all()
  # Rotate 30 degrees and shear 0.3: the corners leave the image and take the fill.
  for name in ('Rotate', 'ShearX', 'ShearY'):
    moved = apply_op(image, name, 10.0)
    assert (moved[0, 0] == transforms.FILL).all() or (moved[-1, -1] == transforms.FILL).all(), name
  # Not applied: the image unchanged.
  skipped = RandAugmentOp('Invert', False, 9.0, False)
  unchanged = transforms.apply_rand_augment_op(Image.fromarray(image), skipped)
  np.testing.assert_array_equal(np.asarray(unchanged), image)


def test_every_operation_runs_over_the_whole_magnitude_range():
  image = Image.fromarray(photo(16, 24, seed=8))
  for name in transforms.RAND_AUGMENT_OPS:
    for magnitude in (0.0, 10.0):
      for negate in (False, True):
        result = transforms.apply_rand_augment_op(image, RandAugmentOp(name, True, magnitude, negate))
        assert result.mode == 'RGB' and result.size == image.size, (name, magnitude, negate)


# ---------------------------------------------------------------------------------------------------
# The transforms as the loader calls them.


def test_train_transform_is_deterministic_in_its_rng_and_makes_the_host_size():
  image = photo(75, 100)
  full = transforms.train_transform(folder_config((96, 128), host_max_side=0))
  first = full({'image': image, 'label': 3}, np.random.default_rng(8))
  assert first['image'].shape == (96, 128, 3) and first['image'].dtype == np.uint8 and first['label'] == 3
  np.testing.assert_array_equal(
    full({'image': image, 'label': 3}, np.random.default_rng(8))['image'], first['image']
  )
  other_seed = full({'image': image, 'label': 3}, np.random.default_rng(9))['image']
  assert not np.array_equal(other_seed, first['image'])
  # __call__ is draw then apply, with the rng's draws in that order.
  draw = full.draw(75, 100, np.random.default_rng(8))
  np.testing.assert_array_equal(full.apply(image, draw), first['image'])
  # Above host_max_side the host makes the image size scaled to it; a PIL image is taken as well.
  scaled = transforms.train_transform(folder_config((96, 128), host_max_side=64))
  from_pil = scaled({'image': Image.fromarray(image), 'label': 0}, np.random.default_rng(8))['image']
  assert from_pil.shape == (48, 64, 3)
  assert transforms.host_image_size((1024, 2048), 512) == (256, 512)
  assert transforms.host_image_size(2048, 0) == (2048, 2048)
  assert transforms.host_image_size(256, 512) == (256, 256)


def test_the_synthetic_task_gets_no_transform():
  config = common.base_config('T', 64)
  config.data.source = 'synthetic'
  assert transforms.train_transform(config) is None and transforms.eval_transform(config) is None


def test_eval_resize_is_pil_bicubic():
  image = photo(37, 53)
  expected = np.asarray(Image.fromarray(image).resize((48, 64), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(transforms.eval_resize(image, (64, 48)), expected)
  np.testing.assert_array_equal(transforms.eval_resize(Image.fromarray(image), (64, 48)), expected)
  assert transforms.eval_resize(expected, (64, 48)) is expected
  transform = transforms.eval_transform(folder_config((64, 48)))
  np.testing.assert_array_equal(
    transform({'image': image, 'label': 1}, np.random.default_rng(0))['image'], expected
  )


# ---------------------------------------------------------------------------------------------------
# data.resize = 'crop': timm's resize-then-centre-crop eval, against references written from the definitions.


def _reference_square_crop(image: np.ndarray, size: int, crop_pct: float) -> np.ndarray:
  """timm's eval at a square size: Resize(floor(size / crop_pct)) (torchvision: the shorter side to it, the
  longer int(scale * longer / shorter)), PIL bicubic, then CenterCrop(size): top int(round((h - size) / 2))."""
  scale = math.floor(size / crop_pct)
  height, width = image.shape[:2]
  if width <= height:
    new_width, new_height = scale, int(scale * height / width)
  else:
    new_width, new_height = int(scale * width / height), scale
  resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BICUBIC))
  top, left = int(round((new_height - size) / 2.0)), int(round((new_width - size) / 2.0))
  return resized[top : top + size, left : left + size]


def _assert_within_one_level(actual: np.ndarray, expected: np.ndarray) -> None:
  assert actual.shape == expected.shape and actual.dtype == np.uint8
  assert np.abs(actual.astype(np.int16) - expected.astype(np.int16)).max() <= 1


def test_crop_eval_is_resize_shorter_side_then_centre_crop():
  # Landscape, portrait, square, smaller than the crop (upsampled), already the scale size; two crop_pct.
  for (height, width), crop_pct in [
    ((75, 100), 0.875),
    ((120, 50), 0.875),
    ((90, 90), 0.875),
    ((20, 30), 0.875),
    ((73, 81), 0.875),
    ((61, 99), 0.9),
    ((64, 64), 1.0),
  ]:
    image = photo(height, width, seed=height)
    expected = _reference_square_crop(image, 64, crop_pct)
    _assert_within_one_level(transforms.eval_resize(image, 64, 'crop', crop_pct), expected)
    _assert_within_one_level(
      transforms.eval_resize(Image.fromarray(image), (64, 64), 'crop', crop_pct), expected
    )
  assert transforms.eval_scale_size(224, 0.875) == (256, 256)
  assert transforms.eval_scale_size((1024, 1024), 0.875) == (1170, 1170)
  # crop_pct 1 on an image of the size is the identity; squash leaves it alone too.
  image = photo(64, 64)
  np.testing.assert_array_equal(transforms.eval_resize(image, 64, 'crop', 1.0), image)


def test_crop_eval_at_a_non_square_size_covers_the_scale_size_keeping_aspect():
  # timm's ResizeKeepRatio(scale_size): one factor, ratio = min(h / scale_h, w / scale_w), sides rounded.
  image = photo(75, 100)
  scale_height, scale_width = math.floor(48 / 0.875), math.floor(64 / 0.875)  # 54, 73
  ratio = min(75 / scale_height, 100 / scale_width)
  new_height, new_width = round(75 / ratio), round(100 / ratio)
  resized = np.asarray(Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BICUBIC))
  top, left = int(round((new_height - 48) / 2.0)), int(round((new_width - 64) / 2.0))
  expected = resized[top : top + 48, left : left + 64]
  _assert_within_one_level(transforms.eval_resize(image, (48, 64), 'crop', 0.875), expected)


def test_eval_transform_follows_data_resize_and_squash_is_unchanged():
  image = photo(75, 100)
  squash = np.asarray(Image.fromarray(image).resize((64, 64), Image.Resampling.BICUBIC))  # the old eval
  config = folder_config((64, 64))
  assert config.data.resize == 'squash'
  np.testing.assert_array_equal(transforms.eval_transform(config)({'image': image}, None)['image'], squash)
  np.testing.assert_array_equal(transforms.eval_resize(image, 64), squash)
  config.data.resize, config.data.crop_pct = 'crop', 0.8
  transform = transforms.eval_transform(config)
  assert (transform.resize, transform.crop_pct) == ('crop', 0.8)
  _assert_within_one_level(
    transform({'image': image, 'label': 2}, np.random.default_rng(0))['image'],
    _reference_square_crop(image, 64, 0.8),
  )
  for bad in [{'resize': 'pad'}, {'resize': 'crop', 'crop_pct': 0.0}]:
    with pytest.raises(ValueError):
      transforms.eval_resize(image, 64, **bad)
