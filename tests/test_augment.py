"""Tests for atlas_jax.augment, the augmentation inside the train step: the accelerator's upsampling close to
PIL's, random erasing's rate, boxes and fills against its definition, and Mixup/CutMix's invariants."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from atlas_jax import augment, losses
from atlas_jax import config as config_lib
from atlas_jax.data import pipeline, transforms
from atlas_jax.data.transforms import CropBox
from configs import common
from tests.data.image_files import folder_config, photo

NUM_CLASSES = 5
SAMPLES = 4000
# 4.5 binomial standard deviations of a rate near 1/2 over SAMPLES draws: a correct draw fails ~1 in 150,000.
RATE_TOLERANCE = 4.5 * math.sqrt(0.25 / SAMPLES)


def denormalize(images) -> np.ndarray:
  return (np.asarray(images) * np.asarray(pipeline.IMAGENET_STD) + np.asarray(pipeline.IMAGENET_MEAN)) * 255


def test_the_synthetic_task_gets_no_finish():
  config = common.base_config('T', 64)
  config.data.source = 'synthetic'
  assert augment.train_finish(config_lib.resolve(config)) is None


# ---------------------------------------------------------------------------------------------------
# The end of the train transform: upsampling and random erasing.


def test_accelerator_upsampling_stays_close_to_pil_bicubic():
  source = Image.fromarray(photo(45, 60))
  finish = jax.jit(augment.train_finish(folder_config((256, 256), erase_prob=0.0)))
  for box in (CropBox(5, 7, 30, 40), CropBox(0, 0, 45, 60), CropBox(10, 20, 12, 9)):
    host = np.asarray(transforms.resized_crop(source, box, (64, 64)))
    images, sizes = finish(jax.random.key(0), pipeline.normalize_image(host)[None])
    assert sizes is None
    upsampled = denormalize(images)[0]
    assert upsampled.shape == (256, 256, 3)
    # The same resize as PIL's (Keys' cubic, a = -0.5), in float instead of PIL's 8-bit passes.
    pil_upsampled = np.asarray(Image.fromarray(host).resize((256, 256), Image.Resampling.BICUBIC), np.float32)
    assert np.abs(upsampled - pil_upsampled).mean() < 0.5 and np.abs(upsampled - pil_upsampled).max() < 2.0
    # Against the reference's single resize of the crop to the full size: within a uint8 unit on average.
    direct = np.asarray(transforms.resized_crop(source, box, (256, 256)), np.float32)
    assert np.abs(upsampled - direct).mean() < 1.0


def test_erasing_rate_and_boxes_follow_the_definition():
  height, width = 32, 48
  boxes = np.asarray(
    jax.jit(augment.sample_erase_boxes, static_argnums=(1, 2, 3))(jax.random.key(10), SAMPLES, height, width)
  )[:, 0]  # (SAMPLES, 4), count 1
  erased = boxes[:, 2] > 0
  assert abs(erased.mean() - 0.25) < RATE_TOLERANCE
  tops, lefts, box_heights, box_widths = boxes[erased].T
  assert (tops >= 0).all() and (lefts >= 0).all()
  assert (tops + box_heights <= height).all() and (lefts + box_widths <= width).all()
  assert (box_heights < height).all() and (box_widths < width).all()
  area = box_heights * box_widths / (height * width)
  ratio = box_heights / box_widths
  # Ranges with rounding to whole pixels; both ends reached.
  assert 0.01 < area.min() < 0.03 and 0.3 < area.max() < 0.40
  assert 0.25 < ratio.min() < 0.4 and 2.5 < ratio.max() < 3.9
  # Positions uniform over the free range.
  assert abs(np.mean(tops / np.maximum(height - box_heights, 1)) - 0.5) < 0.05


def test_erasing_fills_exactly_the_boxes_with_standard_normal_values():
  images = np.full((400, 24, 24, 3), 7.0, np.float32)

  @jax.jit
  def erase_all_modes(key):
    box_key, _ = jax.random.split(key)  # random_erase's own first split draws the boxes
    return (
      {mode: augment.random_erase(key, images, prob=0.5, mode=mode) for mode in augment.ERASE_MODES},
      augment.sample_erase_boxes(box_key, 400, 24, 24, prob=0.5)[:, 0],
    )

  erased, boxes = jax.device_get(erase_all_modes(jax.random.key(11)))
  inside = np.zeros(images.shape[:3], bool)
  for index, (top, left, box_height, box_width) in enumerate(boxes):
    inside[index, top : top + box_height, left : left + box_width] = True
  for mode in augment.ERASE_MODES:
    np.testing.assert_array_equal(erased[mode][~inside], 7.0)
  values = erased['pixel'][inside]
  assert values.size > 10_000 and abs(values.mean()) < 0.05 and abs(values.std() - 1.0) < 0.05
  np.testing.assert_array_equal(erased['const'][inside], 0.0)
  # 'rand': one colour per box.
  index = int(np.flatnonzero(boxes[:, 2] > 1)[0])
  box_pixels = erased['rand'][index][inside[index]]  # (pixels, 3)
  np.testing.assert_array_equal(box_pixels, np.broadcast_to(box_pixels[0], box_pixels.shape))
  # Same key, same output.
  again, _ = jax.device_get(erase_all_modes(jax.random.key(11)))
  np.testing.assert_array_equal(again['pixel'], erased['pixel'])


def test_several_boxes_share_the_area():
  boxes = np.asarray(
    jax.jit(augment.sample_erase_boxes, static_argnums=(1, 2, 3, 5, 6, 7))(
      jax.random.key(12), 2000, 40, 40, 1.0, (0.02, 1 / 3), (0.3, 1 / 0.3), 3
    )
  )  # (2000, 3, 4)
  assert boxes.shape == (2000, 3, 4) and (boxes[..., 2] > 0).mean() > 0.99
  # Each of 3 boxes draws its area from (0.02, 1/3) / 3 of the image.
  assert (boxes[..., 2] * boxes[..., 3]).max() / 1600 < 0.14


# ---------------------------------------------------------------------------------------------------
# Mixup and CutMix.


# The Beta sampler is slow to compile on CPU: every hyperparameter goes in positionally as a traced
# scalar, so one compilation per image dtype serves every test.
_jitted_mixup_cutmix = jax.jit(augment.mixup_cutmix, static_argnums=3)


def mix(
  rng, images, labels, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1
):
  mixed, targets = _jitted_mixup_cutmix(
    rng, images, labels, num_classes, mixup_alpha, cutmix_alpha, switch_prob, label_smoothing
  )
  return np.asarray(mixed), np.asarray(targets)  # numpy from here: eager jax ops compile one by one


def example_batch(batch=4, size=8):
  images = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
  labels = np.arange(batch) % NUM_CLASSES  # labels[i] != labels[::-1][i] for even batch < 2 * classes
  return images, labels


def implied_lam(targets, labels, smoothing):
  """lam from targets[i, labels[i]] = lam * on + (1 - lam) * off (labels differ from the partner's)."""
  off = smoothing / NUM_CLASSES
  on = 1 - smoothing + off
  return (targets[0, labels[0]] - off) / (on - off)


@pytest.mark.parametrize('seed', range(4))
def test_mixup_forced_blends_with_flipped_batch(seed):
  images, labels = example_batch()
  mixed, targets = mix(jax.random.key(seed), images, labels, NUM_CLASSES, switch_prob=0.0)
  lam = implied_lam(targets, labels, 0.1)
  assert 0.0 <= lam <= 1.0
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-5)
  smoothed = np.full((len(labels), NUM_CLASSES), 0.02)
  smoothed[np.arange(len(labels)), labels] = 0.92
  expected_targets = lam * smoothed + (1 - lam) * smoothed[::-1]
  np.testing.assert_allclose(targets, expected_targets, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('seed', range(8))
def test_cutmix_forced_pastes_a_box_and_corrects_lam(seed):
  images, labels = example_batch()
  mixed, targets = mix(jax.random.key(seed), images, labels, NUM_CLASSES, switch_prob=1.0)
  from_self = np.all(mixed == images, axis=-1)  # (B, H, W)
  from_partner = np.all(mixed == images[::-1], axis=-1)
  assert np.all(from_self ^ from_partner)  # every pixel from exactly one source
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  lam = implied_lam(targets, labels, 0.1)
  np.testing.assert_allclose(lam, from_self[0].mean(), rtol=1e-5, atol=1e-6)
  # The pasted region is one axis-aligned box, the same for every image.
  pasted = ~from_self[0]
  assert np.all(~from_self == pasted)
  if pasted.any():
    rows, cols = np.nonzero(pasted.any(1))[0], np.nonzero(pasted.any(0))[0]
    assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    assert pasted.sum() == len(rows) * len(cols)


def test_cutmix_only_and_mixup_only_alphas():
  images, labels = example_batch()
  mixed, _ = mix(jax.random.key(5), images, labels, NUM_CLASSES, mixup_alpha=0.0, switch_prob=0.0)
  assert np.all((mixed == images).all(-1) ^ (mixed == images[::-1]).all(-1))
  assert not np.all(mixed == images)
  mixed, targets = mix(jax.random.key(5), images, labels, NUM_CLASSES, cutmix_alpha=0.0, switch_prob=1.0)
  lam = implied_lam(targets, labels, 0.1)
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-5)


def test_both_alphas_zero_is_identity_with_smoothed_targets():
  images, labels = example_batch()
  mixed, targets = augment.mixup_cutmix(
    jax.random.key(0), images, labels, NUM_CLASSES, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1
  )
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_array_equal(targets, losses.one_hot_smoothed(labels, NUM_CLASSES, 0.1))


def test_deterministic_under_jit():
  images, labels = example_batch()
  first = mix(jax.random.key(7), images, labels, NUM_CLASSES)
  again = mix(jax.random.key(7), images, labels, NUM_CLASSES)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  other = mix(jax.random.key(8), images, labels, NUM_CLASSES)
  assert not np.allclose(first[1], other[1])


def test_both_modes_occur_with_default_switch_prob():
  images, labels = example_batch()
  modes = set()
  for seed in range(16):
    mixed, _ = mix(jax.random.key(seed), images, labels, NUM_CLASSES)
    exact = (mixed == images).all(-1) | (mixed == images[::-1]).all(-1)
    modes.add(bool(np.all(exact)))
  assert modes == {True, False}


def test_bfloat16_images_keep_dtype():
  images, labels = example_batch()
  # eval_shape: dtypes without a second compilation of the sampler.
  mix_bfloat16 = functools.partial(augment.mixup_cutmix, num_classes=NUM_CLASSES)
  mixed, targets = jax.eval_shape(mix_bfloat16, jax.random.key(3), images.astype(jnp.bfloat16), labels)
  assert mixed.dtype == jnp.bfloat16 and mixed.shape == images.shape
  assert targets.dtype == jnp.float32 and targets.shape == (len(labels), NUM_CLASSES)
