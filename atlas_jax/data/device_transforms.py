"""The end of the train transform, inside the jitted train step: upsampling to the model's size, erasing.

The host (transforms.py) crops, flips and runs RandAugment at `transforms.host_image_size(image_size,
data.augment.host_max_side)` and the loader normalises; `train_finish(config)` then, on the accelerator:
  1. resizes the normalised batch to `image_size`, bicubic (Keys' cubic with a = -0.5, PIL's kernel), and
     clips to the normalised images of [0, 255] as PIL's uint8 output is; a no-op when the host already
     made `image_size`. Resizing commutes with the per-channel normalisation, whose weights sum to one.
  2. random erasing as timm's RandomErasing after normalisation: with probability `erase_prob` each image
     gets `erase_count` boxes, each drawn in up to 10 attempts (area uniform in `erase_area` of the image
     divided by the count, height / width log-uniform in `erase_ratio`, rounded; the first that fits
     strictly inside gets a uniform position; none fitting erases nothing), filled with N(0, 1) values per
     pixel and channel ('pixel'), one N(0, 1) colour per box ('rand') or 0 ('const').
Erasing has to follow the upsampling (per-pixel noise at full resolution), so it runs here in both cases,
as in timm's GPU prefetch loader. Its randomness comes from the key the step passes, so it is as
deterministic, and as exact on resume, as Mixup's. JAX only: the train step imports this module.
"""

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax.data.pipeline import IMAGENET_MEAN, IMAGENET_STD

ERASE_MODES = ('pixel', 'rand', 'const')
ERASE_ATTEMPTS = 10
# The normalised values of pixel values 0 and 255, per channel.
_NORMALIZED_LOW = tuple(-mean / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD))
_NORMALIZED_HIGH = tuple((1.0 - mean) / std for mean, std in zip(IMAGENET_MEAN, IMAGENET_STD))


class EraseConfigError(ValueError):
  """A random-erasing field of `data.augment` out of its range."""


def resize_normalized(images: jax.Array, image_size: Sequence[int]) -> jax.Array:
  """Normalised (B, h, w, 3) -> (B, H, W, 3) float32, bicubic, clipped to the normalised [0, 255] range."""
  height, width = image_size
  batch, _, _, channels = images.shape
  # A resize is one matmul per axis with a (mostly zero) dense weight matrix. DEFAULT precision lets GPUs
  # use TF32: ~1e-3 of a normalised unit (< 0.1 of a uint8 level), far below PIL's own 8-bit rounding.
  resized = jax.image.resize(images.astype(jnp.float32), (batch, height, width, channels), method='cubic',
                             precision=jax.lax.Precision.DEFAULT)
  low, high = jnp.asarray(_NORMALIZED_LOW, jnp.float32), jnp.asarray(_NORMALIZED_HIGH, jnp.float32)
  return jnp.clip(resized, low, high)


def sample_erase_boxes(key: jax.Array, batch: int, height: int, width: int, prob: float = 0.25,
                       area: Sequence[float] = (0.02, 1 / 3), ratio: Sequence[float] = (0.3, 1 / 0.3),
                       count: int = 1) -> jax.Array:
  """The boxes random erasing draws for a batch of `height` x `width` images: int32 (batch, count, 4) of
  (top, left, box_height, box_width); box_height = box_width = 0 where nothing is erased."""
  apply_key, attempts_key = jax.random.split(key)
  applied = jax.random.uniform(apply_key, (batch,)) < prob
  # Every attempt's four uniforms at once: area, log aspect ratio, top, left.
  uniforms = jax.random.uniform(attempts_key, (batch, count, ERASE_ATTEMPTS, 4))
  target_area = (area[0] + (area[1] - area[0]) * uniforms[..., 0]) * (height * width / count)
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_low + (log_high - log_low) * uniforms[..., 1])
  box_heights = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)    # (batch, count, attempts)
  box_widths = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
  fits = (box_heights < height) & (box_widths < width)
  first = jnp.argmax(fits, axis=-1)[..., None]        # the first attempt that fits (0 when none does)

  def of_first(values):
    return jnp.take_along_axis(values, first, axis=-1)[..., 0]                   # (batch, count)

  keep = of_first(fits) & applied[:, None]
  box_height = jnp.where(keep, of_first(box_heights), 0)
  box_width = jnp.where(keep, of_first(box_widths), 0)
  # Uniform integers in [0, side - box]: the floor of a uniform in [0, side - box + 1).
  top = jnp.floor(of_first(uniforms[..., 2]) * (height - box_height + 1)).astype(jnp.int32)
  left = jnp.floor(of_first(uniforms[..., 3]) * (width - box_width + 1)).astype(jnp.int32)
  return jnp.stack([top, left, box_height, box_width], axis=-1)


def random_erase(key: jax.Array, images: jax.Array, prob: float = 0.25, mode: str = 'pixel',
                 area: Sequence[float] = (0.02, 1 / 3), ratio: Sequence[float] = (0.3, 1 / 0.3),
                 count: int = 1) -> jax.Array:
  """Normalised (B, H, W, C) -> the same with random erasing (module doc) applied per image."""
  if mode not in ERASE_MODES:
    raise EraseConfigError(f'data.augment.erase_mode must be one of {ERASE_MODES}, got {mode!r}')
  batch, height, width, channels = images.shape
  box_key, fill_key = jax.random.split(key)
  boxes = sample_erase_boxes(box_key, batch, height, width, prob, area, ratio, count)   # (B, count, 4)
  rows, columns = jnp.arange(height), jnp.arange(width)
  for index, box_fill_key in enumerate(jax.random.split(fill_key, count)):
    top, left, box_height, box_width = (boxes[:, index, field, None] for field in range(4))   # (B, 1) each
    inside = (((rows >= top) & (rows < top + box_height))[:, :, None]
              & ((columns >= left) & (columns < left + box_width))[:, None, :])             # (B, H, W)
    if mode == 'pixel':
      fill = jax.random.normal(box_fill_key, images.shape, images.dtype)
    elif mode == 'rand':
      fill = jax.random.normal(box_fill_key, (batch, 1, 1, channels), images.dtype)
    else:
      fill = jnp.zeros((1, 1, 1, channels), images.dtype)
    images = jnp.where(inside[..., None], fill, images)
  return images


def _check_erase_config(augment) -> None:
  if not 0.0 <= augment.erase_prob <= 1.0:
    raise EraseConfigError(f'data.augment.erase_prob must be a probability in [0, 1], '
                           f'got {augment.erase_prob}')
  if augment.erase_mode not in ERASE_MODES:
    raise EraseConfigError(f'data.augment.erase_mode must be one of {ERASE_MODES}, '
                           f'got {augment.erase_mode!r}')
  low, high = augment.erase_area
  if not 0.0 < low <= high <= 1.0:
    raise EraseConfigError(f'data.augment.erase_area must be (low, high) with 0 < low <= high <= 1, '
                           f'got {tuple(augment.erase_area)}')
  low, high = augment.erase_ratio
  if not 0.0 < low <= high:
    raise EraseConfigError(f'data.augment.erase_ratio must be (low, high) with 0 < low <= high, '
                           f'got {tuple(augment.erase_ratio)}')
  if augment.erase_count < 1:
    raise EraseConfigError(f'data.augment.erase_count must be >= 1, got {augment.erase_count}')


def train_finish(config) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
  """`finish(key, images)` for the train step: normalised (B, h, w, 3) from the loader -> (B, H, W, 3) at
  `config.image_size`, upsampled and randomly erased (module doc). None for the synthetic task, which has
  no transform. Configuration errors are raised here, before anything is compiled."""
  if config.data.source == 'synthetic':
    return None
  augment = config.data.augment
  _check_erase_config(augment)
  image_size = tuple(int(side) for side in np.broadcast_to(config.image_size, (2,)))
  erase = dict(prob=float(augment.erase_prob), mode=str(augment.erase_mode),
               area=tuple(float(value) for value in augment.erase_area),
               ratio=tuple(float(value) for value in augment.erase_ratio), count=int(augment.erase_count))

  def finish(key: jax.Array, images: jax.Array) -> jax.Array:
    if tuple(images.shape[1:3]) != image_size:
      images = resize_normalized(images, image_size)
    if erase['prob'] > 0:
      images = random_erase(key, images, **erase)
    return images

  return finish
