"""Augmentation inside the jitted train step: the end of the train transform, and Mixup/CutMix.

The host (data/transforms.py) crops, flips and runs RandAugment at `transforms.host_image_size(image_size,
data.augment.host_max_side)` and the loader normalises; `train_finish(config)` then, on the accelerator:
  1. resizes the normalised batch to `image_size`, bicubic (Keys' cubic with a = -0.5, PIL's kernel), and
     clips to the normalised images of [0, 255] as PIL's uint8 output is; a no-op when the host already
     made `image_size`. Resizing commutes with the per-channel normalisation, whose weights sum to one.
     With `data.augment.aspect='keep'` the batch's valid sizes (B, 2) scale by the same factors (rounded,
     within [1, side]); the padding around them may blur into their last pixel or two, which stays valid.
  2. random erasing as timm's RandomErasing after normalisation: with probability `erase_prob` each image
     gets `erase_count` boxes, each drawn in up to 10 attempts (area uniform in `erase_area` of the image
     divided by the count, height / width log-uniform in `erase_ratio`, rounded; the first that fits
     strictly inside gets a uniform position; none fitting erases nothing), filled with N(0, 1) values per
     pixel and channel ('pixel'), one N(0, 1) colour per box ('rand') or 0 ('const').
Erasing has to follow the upsampling (per-pixel noise at full resolution), so it runs here in both cases,
as in timm's GPU prefetch loader. Then `mixup_cutmix` mixes the batch and makes its soft targets (timm's
Mixup); with sizes, a mixed example is valid over the smallest top-left box holding both of its images.
Every draw comes from the key the step passes, so all of it is deterministic and exact on resume.
This is JAX; data/ stays free of it.
"""

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from atlas_jax.losses import one_hot_smoothed
from atlas_jax.normalization import IMAGENET_MEAN, IMAGENET_STD

ERASE_MODES = ('pixel', 'rand', 'const')
ERASE_ATTEMPTS = 10
# The normalised values of pixel values 0 and 255, per channel.
_NORMALIZED_LOW = tuple(-mean / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD))
_NORMALIZED_HIGH = tuple((1.0 - mean) / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD))


def resize_normalized(images: jax.Array, image_size: Sequence[int]) -> jax.Array:
  """Normalised (B, h, w, 3) -> (B, H, W, 3) float32, bicubic, clipped to the normalised [0, 255] range."""
  height, width = image_size
  batch, _, _, channels = images.shape
  # A resize is one matmul per axis with a (mostly zero) dense weight matrix. DEFAULT precision lets GPUs
  # use TF32: ~1e-3 of a normalised unit (< 0.1 of a uint8 level), far below PIL's own 8-bit rounding.
  resized = jax.image.resize(
    images.astype(jnp.float32),
    (batch, height, width, channels),
    method='cubic',
    precision=jax.lax.Precision.DEFAULT,
  )
  low, high = jnp.asarray(_NORMALIZED_LOW, jnp.float32), jnp.asarray(_NORMALIZED_HIGH, jnp.float32)
  return jnp.clip(resized, low, high)


def sample_erase_boxes(
  key: jax.Array,
  batch: int,
  height: int,
  width: int,
  prob: float = 0.25,
  area: Sequence[float] = (0.02, 1 / 3),
  ratio: Sequence[float] = (0.3, 1 / 0.3),
  count: int = 1,
) -> jax.Array:
  """The boxes random erasing draws for a batch of `height` x `width` images: int32 (batch, count, 4) of
  (top, left, box_height, box_width); box_height = box_width = 0 where nothing is erased."""
  apply_key, attempts_key = jax.random.split(key)
  applied = jax.random.uniform(apply_key, (batch,)) < prob
  # Every attempt's four uniforms at once: area, log aspect ratio, top, left.
  uniforms = jax.random.uniform(attempts_key, (batch, count, ERASE_ATTEMPTS, 4))
  target_area = (area[0] + (area[1] - area[0]) * uniforms[..., 0]) * (height * width / count)
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_low + (log_high - log_low) * uniforms[..., 1])
  box_heights = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)  # (batch, count, attempts)
  box_widths = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
  fits = (box_heights < height) & (box_widths < width)
  first = jnp.argmax(fits, axis=-1)[..., None]  # the first attempt that fits (0 when none does)

  def of_first(values):
    return jnp.take_along_axis(values, first, axis=-1)[..., 0]  # (batch, count)

  keep = of_first(fits) & applied[:, None]
  box_height = jnp.where(keep, of_first(box_heights), 0)
  box_width = jnp.where(keep, of_first(box_widths), 0)
  # Uniform integers in [0, side - box]: the floor of a uniform in [0, side - box + 1).
  top = jnp.floor(of_first(uniforms[..., 2]) * (height - box_height + 1)).astype(jnp.int32)
  left = jnp.floor(of_first(uniforms[..., 3]) * (width - box_width + 1)).astype(jnp.int32)
  return jnp.stack([top, left, box_height, box_width], axis=-1)


def random_erase(
  key: jax.Array,
  images: jax.Array,
  prob: float = 0.25,
  mode: str = 'pixel',
  area: Sequence[float] = (0.02, 1 / 3),
  ratio: Sequence[float] = (0.3, 1 / 0.3),
  count: int = 1,
) -> jax.Array:
  """Normalised (B, H, W, C) -> the same with random erasing (module doc) applied per image."""
  if mode not in ERASE_MODES:
    raise ValueError(f'erase mode must be one of {ERASE_MODES}, got {mode!r}')
  batch, height, width, channels = images.shape
  box_key, fill_key = jax.random.split(key)
  boxes = sample_erase_boxes(box_key, batch, height, width, prob, area, ratio, count)  # (B, count, 4)
  rows, columns = jnp.arange(height), jnp.arange(width)
  for index, box_fill_key in enumerate(jax.random.split(fill_key, count)):
    top, left, box_height, box_width = (boxes[:, index, field, None] for field in range(4))  # (B, 1) each
    inside = ((rows >= top) & (rows < top + box_height))[:, :, None] & (
      (columns >= left) & (columns < left + box_width)
    )[:, None, :]  # (B, H, W)
    if mode == 'pixel':
      fill = jax.random.normal(box_fill_key, images.shape, images.dtype)
    elif mode == 'rand':
      fill = jax.random.normal(box_fill_key, (batch, 1, 1, channels), images.dtype)
    else:
      fill = jnp.zeros((1, 1, 1, channels), images.dtype)
    images = jnp.where(inside[..., None], fill, images)
  return images


def resize_sizes(sizes: jax.Array, from_size: Sequence[int], to_size: Sequence[int]) -> jax.Array:
  """Valid (height, width) sizes (B, 2) on a `from_size` canvas -> on the canvas resized to `to_size`: each
  side times the canvas's factor, rounded, kept within [1, side] (int32)."""
  scale = jnp.asarray([to / source for to, source in zip(to_size, from_size)], jnp.float32)
  scaled = jnp.round(sizes.astype(jnp.float32) * scale).astype(jnp.int32)
  return jnp.clip(scaled, 1, jnp.asarray(tuple(to_size), jnp.int32))


def train_finish(
  config,
) -> Callable[[jax.Array, jax.Array, jax.Array | None], tuple[jax.Array, jax.Array | None]] | None:
  """`finish(key, images, sizes=None) -> (images, sizes)` for the train step: normalised (B, h, w, 3) from the
  loader -> (B, H, W, 3) at `config.image_size`, upsampled and randomly erased (module doc), and the valid
  sizes (B, 2) of `data.augment.aspect='keep'` scaled alike (None stays None). None for the synthetic task,
  which has no transform. The config is resolved: atlas_jax.config has checked the fields."""
  if config.data.source == 'synthetic':
    return None
  augment = config.data.augment
  image_size = tuple(config.image_size)
  erase = dict(
    prob=float(augment.erase_prob),
    mode=str(augment.erase_mode),
    area=tuple(float(value) for value in augment.erase_area),
    ratio=tuple(float(value) for value in augment.erase_ratio),
    count=int(augment.erase_count),
  )

  def finish(key: jax.Array, images: jax.Array, sizes: jax.Array | None = None):
    if tuple(images.shape[1:3]) != image_size:
      if sizes is not None:
        sizes = resize_sizes(sizes, images.shape[1:3], image_size)
      images = resize_normalized(images, image_size)
    if erase['prob'] > 0:
      images = random_erase(key, images, **erase)
    return images, sizes

  return finish


# ---------------------------------------------------------------------------------------------------
# Mixup and CutMix.


def mixup_cutmix(
  rng,
  images,
  labels,
  num_classes: int,
  mixup_alpha: float = 0.8,
  cutmix_alpha: float = 1.0,
  switch_prob: float = 0.5,
  label_smoothing: float = 0.1,
  sizes=None,
):
  """timm's Mixup in 'batch' mode with mix_prob 1: one mix for the whole batch, partner images[::-1].

  One draw per batch picks CutMix (probability switch_prob when both alphas are > 0, else whichever is
  > 0) or Mixup, then lam ~ Beta(alpha, alpha) with the chosen one's alpha. Mixup blends
  lam * x + (1 - lam) * x[::-1]. CutMix pastes a box of x[::-1] into x (timm's rand_bbox: sides
  floor(H, W * sqrt(1 - lam)), centre uniform over pixels, half-sides floored, clipped to the image)
  and resets lam to the fraction of pixels kept from x.

  With `sizes` (the valid (height, width) of each image at the top-left of its canvas), the mixed example's
  size is the elementwise max of its own and its partner's: the smallest top-left box holding both, since
  either may show through anywhere in it (Mixup's blend, a CutMix box). The rest stays padding.

  Args:
    rng: PRNG key; the same key gives the same result.
    images: (B, H, W, C) float, NHWC.
    labels: (B,) int.
    num_classes: python int (static).
    mixup_alpha, cutmix_alpha, switch_prob, label_smoothing: python numbers or scalar arrays (may be
      traced, so one compiled step serves any setting). Both alphas python 0: no mixing at all.
    sizes: optional (B, 2) int valid sizes.

  Returns:
    (mixed images (B, H, W, C) in images.dtype,
     targets (B, num_classes) float32 = lam * smoothed(labels) + (1 - lam) * smoothed(labels[::-1])),
    and with `sizes` a third item, the mixed sizes (B, 2) (unchanged when both alphas are python 0).
  """
  targets = one_hot_smoothed(labels, num_classes, label_smoothing)
  if _is_zero(mixup_alpha) and _is_zero(cutmix_alpha):
    return (images, targets) if sizes is None else (images, targets, sizes)
  height, width = images.shape[1], images.shape[2]
  switch_key, lam_key, box_key = jax.random.split(rng, 3)

  # Selection with jnp ops rather than python branches, so alphas and switch_prob may also be traced.
  mixup_alpha = jnp.asarray(mixup_alpha, jnp.float32)
  cutmix_alpha = jnp.asarray(cutmix_alpha, jnp.float32)
  use_cutmix = jnp.where(
    mixup_alpha <= 0, True, jnp.where(cutmix_alpha <= 0, False, jax.random.uniform(switch_key) < switch_prob)
  )
  alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
  # Beta(alpha, alpha) as g0 / (g0 + g1) of two Gamma(alpha) draws: one sampler for both mixes (it is
  # costly to compile), in log space as small alphas underflow. alpha 0 means no mix (lam 1).
  log_gammas = jax.random.loggamma(lam_key, jnp.full((2,), jnp.maximum(alpha, 1e-6)))
  lam_drawn = jnp.where(alpha > 0, jax.nn.softmax(log_gammas)[0], 1.0)

  # CutMix box as timm's rand_bbox: integer cut sides, integer centre, half-sides floored, clipped.
  ratio = jnp.sqrt(jnp.clip(1.0 - lam_drawn, 0.0, 1.0))
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  centre_key_y, centre_key_x = jax.random.split(box_key)
  cy = jax.random.randint(centre_key_y, (), 0, height)
  cx = jax.random.randint(centre_key_x, (), 0, width)
  y_low, y_high = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x_low, x_high = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  in_box = (rows >= y_low) & (rows < y_high) & (cols >= x_low) & (cols < x_high)  # (H, W)
  lam_box = 1.0 - jnp.mean(in_box.astype(jnp.float32))

  # One blend covers both: the per-pixel weight of x is lam (Mixup) or 1/0 outside/inside the box
  # (CutMix), where 1 * a + 0 * b copies a pixel exactly. Blending in float32 keeps bfloat16 images exact.
  lam = jnp.where(use_cutmix, lam_box, lam_drawn).astype(jnp.float32)
  weight = jnp.where(use_cutmix, 1.0 - in_box.astype(jnp.float32), lam)[None, :, :, None]
  flipped = images[::-1]
  mixed = weight * images.astype(jnp.float32) + (1.0 - weight) * flipped.astype(jnp.float32)
  mixed_targets = lam * targets + (1.0 - lam) * targets[::-1]
  if sizes is None:
    return mixed.astype(images.dtype), mixed_targets
  return mixed.astype(images.dtype), mixed_targets, jnp.maximum(sizes, sizes[::-1])


def _is_zero(alpha) -> bool:
  """True for a python number <= 0; a traced alpha is handled inside the computation instead."""
  return isinstance(alpha, (int, float)) and alpha <= 0
