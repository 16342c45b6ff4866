"""The reference's train and eval transforms (docs/model.md) on the host: numpy and PIL only, no JAX.

Train (`train_transform`), as timm's `create_transform(is_training=True)` with the recipe's settings:
  random resized crop (scale 0.08-1 of the area, aspect ratio 3/4-4/3 log-uniform, 10 attempts, then a
  centre crop; bicubic) -> horizontal flip (p 0.5) -> RandAugment `rand-m9-mstd0.5-inc1` (2 operations
  drawn with replacement from the 15 "increasing" ones, each applied with p 0.5, magnitude
  N(9, 0.5) clipped to [0, 10], geometric ones bicubic with the ImageNet mean as fill)
then the loader normalises with ImageNet's mean and std, and random erasing (p 0.25, per-pixel normal
values) acts on the normalised batch inside the train step (`atlas_jax/augment.py`).

Where the upsampling happens: with `data.augment.host_max_side = S > 0` and an image size larger than S,
the crop is resized to the image size scaled down to S pixels on its longer side (`host_image_size`), flipped
and augmented there, and the accelerator resizes the normalised batch to the image size (bicubic,
`atlas_jax/augment.py`). The host then does the same work at every resolution and sends (S / side)^2 of
the pixels; docs/data.md has the measurements that chose this. `host_max_side = 0` resizes to the full size
here, in exactly the reference's order.

Aspect ratio (`data.augment.aspect`): 'squash' (default, the reference's) resizes the crop box to the host
canvas whatever its shape. 'keep' resizes it by one factor, min(canvas_h / box_h, canvas_w / box_w), so it
fits inside the canvas, flips and augments it at that size (fills and flips act on the crop alone) and
places it at the canvas's top-left, the rest zeros; the example gets 'size', int32 (2,), the valid (height,
width) in canvas pixels, which the model masks by (`model.apply(..., sizes=)`). Every canvas of a run has
one shape, so training compiles once.

Eval (`eval_transform`, `eval_resize`), as `data.resize` says: 'squash' (default), a bicubic resize to the
image size without keeping the aspect ratio, as the reference; or 'crop', timm's eval transform: bicubic
resize, aspect kept, of the shorter side to floor(side / `data.crop_pct`), then the centre crop of the
image size; or 'none', each image at its own size (the decoder's `data.max_pixels` reduction aside), which
the eval loader pads to a canvas per batch and marks with 'size' (pipeline.EvalLoader's `canvas_multiple`).
Predict and the inference API use the same function. The synthetic task gets no transform
(None): its images already have the size and must not be augmented.

A transform is `transform(example, rng) -> example` (pipeline.Transform): `example['image']` is uint8
(h, w, 3) of any size (or a PIL RGB image), the returned one uint8 (H, W, 3) (with 'keep' also its 'size';
with resize 'none' of the image's own size); every random choice comes from `rng`, which the loader
derives from (seed, epoch, index) only. The `sample_*` functions are the random draws on their own, so
tests can measure their distributions.
"""

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from atlas_jax.data.sources import image_size_pair
from atlas_jax.normalization import IMAGENET_MEAN

BICUBIC = Image.Resampling.BICUBIC
# timm fills the area uncovered by rotate/shear/translate with the normalisation mean in uint8.
FILL = tuple(round(255 * mean) for mean in IMAGENET_MEAN)  # (124, 116, 104)

# timm's `_RAND_INCREASING_TRANSFORMS`: the RandAugment operations whose strength grows with magnitude.
RAND_AUGMENT_OPS = (
  'AutoContrast',
  'Equalize',
  'Invert',
  'Rotate',
  'PosterizeIncreasing',
  'SolarizeIncreasing',
  'SolarizeAdd',
  'ColorIncreasing',
  'ContrastIncreasing',
  'BrightnessIncreasing',
  'SharpnessIncreasing',
  'ShearX',
  'ShearY',
  'TranslateXRel',
  'TranslateYRel',
)
MAGNITUDE_SCALE = 10.0  # magnitude m means strength m / 10 of each operation's range
CROP_ATTEMPTS = 10
RESIZE_MODES = ('squash', 'crop', 'none')  # data.resize
ASPECT_MODES = ('squash', 'keep')  # data.augment.aspect


class CropBox(NamedTuple):
  """A crop in pixels of the source image: rows [top, top + height), columns [left, left + width)."""

  top: int
  left: int
  height: int
  width: int


class RandAugmentOp(NamedTuple):
  """One drawn RandAugment operation: which, whether it applies, its magnitude and argument's sign."""

  name: str
  applied: bool
  magnitude: float  # N(magnitude, std) clipped to [0, magnitude_max]
  negate: bool  # signed operations (rotate, shear, translate, enhance) use -argument


class TrainDraw(NamedTuple):
  """Every random choice of one train example."""

  box: CropBox
  flip: bool
  ops: tuple[RandAugmentOp, ...]


def host_image_size(image_size: int | Sequence[int], host_max_side: int) -> tuple[int, int]:
  """The (H, W) the host's train transform produces: `image_size`, scaled down so that its longer side is
  `host_max_side` when that is smaller (0: no limit). The accelerator resizes the rest of the way."""
  height, width = image_size_pair(image_size)
  longer = max(height, width)
  if host_max_side <= 0 or longer <= host_max_side:
    return height, width
  scale = host_max_side / longer
  return max(1, round(height * scale)), max(1, round(width * scale))


# ---------------------------------------------------------------------------------------------------
# Random resized crop and flip.


def sample_crop_box(
  height: int, width: int, rng: np.random.Generator, scale: Sequence[float], ratio: Sequence[float]
) -> CropBox:
  """timm's RandomResizedCrop box for an image of `height` x `width` (`data.augment.crop_scale` and
  `crop_ratio` as `scale` and `ratio`).

  Up to 10 attempts draw an area fraction uniform in `scale` and an aspect ratio (width / height)
  log-uniform in `ratio`, rounded to whole pixels; the first that fits gets a uniform position. If none
  fits, the centre crop of the whole image with its aspect ratio clamped into `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(CROP_ATTEMPTS):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    crop_width = round(math.sqrt(target_area * aspect))
    crop_height = round(math.sqrt(target_area / aspect))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return CropBox(top, left, crop_height, crop_width)
  image_ratio = width / height
  if image_ratio < min(ratio):
    crop_width, crop_height = width, round(width / min(ratio))
  elif image_ratio > max(ratio):
    crop_width, crop_height = round(height * max(ratio)), height
  else:
    crop_width, crop_height = width, height
  return CropBox((height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width)


def keep_aspect_size(height: int, width: int, canvas: Sequence[int]) -> tuple[int, int]:
  """(h, w) of a `height` x `width` box scaled by one factor to fit inside `canvas` (H, W): the factor
  min(H / height, W / width), so one side fills the canvas; each side rounded and kept within [1, canvas]."""
  canvas_height, canvas_width = image_size_pair(canvas)
  scale = min(canvas_height / height, canvas_width / width)
  return (
    min(canvas_height, max(1, round(height * scale))),
    min(canvas_width, max(1, round(width * scale))),
  )


def resized_crop(image: Image.Image, box: CropBox, size: Sequence[int]) -> Image.Image:
  """The `box` of `image` resized to `size` (H, W), bicubic (PIL filters over the box, no copy of it)."""
  height, width = image_size_pair(size)
  return image.resize(
    (width, height), BICUBIC, box=(box.left, box.top, box.left + box.width, box.top + box.height)
  )


# ---------------------------------------------------------------------------------------------------
# RandAugment: timm's increasing operation set, from each operation's definition.


def sample_rand_augment(
  rng: np.random.Generator,
  num_ops: int,
  magnitude: float,
  magnitude_std: float,
  magnitude_max: float,
  prob: float,
) -> tuple[RandAugmentOp, ...]:
  """`num_ops` operations drawn uniformly with replacement, each with its own applied / magnitude / sign
  (the arguments are `data.augment.randaug_*`)."""
  names = rng.integers(0, len(RAND_AUGMENT_OPS), size=num_ops)
  applied = rng.random(num_ops) < prob
  magnitudes = magnitude + magnitude_std * rng.standard_normal(num_ops)
  magnitudes = np.clip(magnitudes, 0.0, magnitude_max)
  negate = rng.random(num_ops) < 0.5
  return tuple(
    RandAugmentOp(RAND_AUGMENT_OPS[name], bool(apply), float(level), bool(sign))
    for name, apply, level, sign in zip(names, applied, magnitudes, negate)
  )


def _signed(value: float, negate: bool) -> float:
  return -value if negate else value


def _enhance_factor(level: float, negate: bool) -> float:
  """The increasing enhance operations: 1 (identity) +- 0.9 * level, kept >= 0.1."""
  return max(0.1, 1.0 + _signed(0.9 * level, negate))


def _affine(image: Image.Image, coefficients: tuple[float, ...]) -> Image.Image:
  """PIL's affine map (output pixel (x, y) reads input (a x + b y + c, d x + e y + f)), bicubic, mean fill."""
  return image.transform(image.size, Image.Transform.AFFINE, coefficients, resample=BICUBIC, fillcolor=FILL)


def _solarize_add(image: Image.Image, amount: int, threshold: int = 128) -> Image.Image:
  """Adds `amount` to values below `threshold`, saturating at 255."""
  lut = [min(255, value + amount) if value < threshold else value for value in range(256)]
  return image.point(lut * len(image.getbands()))


def _posterize(image: Image.Image, bits: int) -> Image.Image:
  """Keeps the `bits` high bits of every value; 0 bits gives black (Pillow's posterize refuses 0)."""
  mask = (0xFF << (8 - bits)) & 0xFF
  return image.point([value & mask for value in range(256)] * len(image.getbands()))


def apply_rand_augment_op(image: Image.Image, op: RandAugmentOp) -> Image.Image:
  """One operation on an RGB image, its argument from `op.magnitude` by the operation's range."""
  if not op.applied:
    return image
  level = op.magnitude / MAGNITUDE_SCALE
  name = op.name
  if name == 'AutoContrast':
    return ImageOps.autocontrast(image)
  if name == 'Equalize':
    return ImageOps.equalize(image)
  if name == 'Invert':
    return ImageOps.invert(image)
  if name == 'Rotate':  # up to 30 degrees either way
    return image.rotate(_signed(30.0 * level, op.negate), resample=BICUBIC, fillcolor=FILL)
  if name == 'PosterizeIncreasing':  # keeps 4 bits at magnitude 0 down to 0 at 10
    return _posterize(image, 4 - int(4 * level))
  if name == 'SolarizeIncreasing':  # inverts values >= 256 (none) down to >= 0 (all)
    return ImageOps.solarize(image, 256 - int(256 * level))
  if name == 'SolarizeAdd':  # adds up to 110 below 128
    return _solarize_add(image, int(110 * level))
  if name == 'ColorIncreasing':
    return ImageEnhance.Color(image).enhance(_enhance_factor(level, op.negate))
  if name == 'ContrastIncreasing':
    return ImageEnhance.Contrast(image).enhance(_enhance_factor(level, op.negate))
  if name == 'BrightnessIncreasing':
    return ImageEnhance.Brightness(image).enhance(_enhance_factor(level, op.negate))
  if name == 'SharpnessIncreasing':
    return ImageEnhance.Sharpness(image).enhance(_enhance_factor(level, op.negate))
  if name == 'ShearX':  # shear factor up to 0.3 either way
    return _affine(image, (1.0, _signed(0.3 * level, op.negate), 0.0, 0.0, 1.0, 0.0))
  if name == 'ShearY':
    return _affine(image, (1.0, 0.0, 0.0, _signed(0.3 * level, op.negate), 1.0, 0.0))
  if name == 'TranslateXRel':  # up to 45% of the width either way
    return _affine(image, (1.0, 0.0, _signed(0.45 * level, op.negate) * image.width, 0.0, 1.0, 0.0))
  if name == 'TranslateYRel':
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, _signed(0.45 * level, op.negate) * image.height))
  raise ValueError(f'unknown RandAugment operation {name!r}; known: {", ".join(RAND_AUGMENT_OPS)}')


# ---------------------------------------------------------------------------------------------------
# The transforms.


def _is_rgb_uint8(image: Any) -> bool:
  return (
    isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
  )


def _as_rgb_image(image: Any) -> Image.Image:
  if isinstance(image, Image.Image):
    return image if image.mode == 'RGB' else image.convert('RGB')
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
      f'the transforms take uint8 (h, w, 3) RGB images, got {image.dtype}{list(image.shape)}: '
      'decode to RGB in the source'
    )
  return Image.fromarray(image)


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """The train transform of the module doc up to RandAugment; a plain picklable object (worker processes).

  `output_size` is `host_image_size(image_size, host_max_side)`, the canvas; the other fields are
  `data.augment`'s. With `aspect='keep'` the crop keeps its aspect ratio at the canvas's top-left and the
  example gets its valid 'size' (module doc).
  """

  output_size: tuple[int, int]
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  hflip: float
  randaug_num_ops: int
  randaug_magnitude: float
  randaug_magnitude_std: float
  randaug_magnitude_max: float
  randaug_prob: float
  aspect: str = 'squash'

  def __post_init__(self):
    if self.aspect not in ASPECT_MODES:
      raise ValueError(f'aspect must be one of {", ".join(ASPECT_MODES)}; got {self.aspect!r}')

  def valid_size(self, box: CropBox) -> tuple[int, int]:
    """(h, w) the crop `box` covers on the canvas: all of it, or with 'keep' its aspect-kept fit."""
    if self.aspect == 'keep':
      return keep_aspect_size(box.height, box.width, self.output_size)
    return tuple(self.output_size)

  def draw(self, height: int, width: int, rng: np.random.Generator) -> TrainDraw:
    """Every random choice for a source image of `height` x `width`, in the order __call__ makes them."""
    box = sample_crop_box(height, width, rng, self.crop_scale, self.crop_ratio)
    flip = bool(rng.random() < self.hflip)
    ops = sample_rand_augment(
      rng,
      self.randaug_num_ops,
      self.randaug_magnitude,
      self.randaug_magnitude_std,
      self.randaug_magnitude_max,
      self.randaug_prob,
    )
    return TrainDraw(box, flip, ops)

  def apply(self, image: Any, draw: TrainDraw) -> np.ndarray:
    """uint8 (h, w, 3) or PIL image -> uint8 `output_size` + (3,), with the choices of `draw`; with 'keep'
    the crop fills `valid_size(draw.box)` at the top-left and the rest is zeros."""
    size = self.valid_size(draw.box)
    result = resized_crop(_as_rgb_image(image), draw.box, size)
    if draw.flip:
      result = result.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for op in draw.ops:
      result = apply_rand_augment_op(result, op)
    if size == tuple(self.output_size):
      return np.asarray(result)
    canvas = np.zeros((*self.output_size, 3), np.uint8)
    canvas[: size[0], : size[1]] = np.asarray(result)
    return canvas

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    image = _as_rgb_image(example['image'])
    draw = self.draw(image.height, image.width, rng)
    example = {**example, 'image': self.apply(image, draw)}
    if self.aspect == 'keep':
      example['size'] = np.asarray(self.valid_size(draw.box), np.int32)
    return example


def eval_scale_size(image_size: int | Sequence[int], crop_pct: float) -> tuple[int, int]:
  """timm's `scale_size` of the crop eval: floor(side / crop_pct) for each side of `image_size` (H, W)."""
  height, width = image_size_pair(image_size)
  return math.floor(height / crop_pct), math.floor(width / crop_pct)


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
  """torchvision's Resize(size) (an int) with bicubic: the shorter side becomes `size` and the longer one
  int(size * longer / shorter) (its `_compute_resized_output_size`); an image already that size is kept."""
  width, height = image.size
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  new_size = (new_short, new_long) if width <= height else (new_long, new_short)  # (width, height)
  return image if new_size == image.size else image.resize(new_size, BICUBIC)


def resize_to_cover(image: Image.Image, size: Sequence[int]) -> Image.Image:
  """timm's ResizeKeepRatio(size) (longest=0) with bicubic: scaled by one factor so that it covers `size`
  (H, W), one side equal to it, each side round(side / min(height / H, width / W))."""
  target_height, target_width = image_size_pair(size)
  ratio = min(image.height / target_height, image.width / target_width)
  new_size = (round(image.width / ratio), round(image.height / ratio))
  return image if new_size == image.size else image.resize(new_size, BICUBIC)


def center_crop(image: Image.Image, size: Sequence[int]) -> Image.Image:
  """torchvision's CenterCrop(size (H, W)) of an image at least that large: top = int(round((h - H) / 2)),
  left likewise (Python's round: halves to even)."""
  height, width = image_size_pair(size)
  if image.height < height or image.width < width:
    raise ValueError(f'center_crop of a {image.height}x{image.width} image to {height}x{width}: too small')
  top = int(round((image.height - height) / 2.0))
  left = int(round((image.width - width) / 2.0))
  return image.crop((left, top, left + width, top + height))


def eval_resize(
  image: Any, image_size: int | Sequence[int], resize: str = 'squash', crop_pct: float | None = None
) -> np.ndarray:
  """The evaluation (and predict) preprocessing: uint8 (h, w, 3) or a PIL image -> uint8 (H, W, 3), bicubic.

  `resize` (`data.resize`): 'squash' resizes to `image_size` without keeping the aspect ratio (as the
  reference's Resize((H, W))); 'crop' is timm's eval transform with `crop_pct` (`data.crop_pct`): the image
  resized, aspect kept, to cover `eval_scale_size` (for a square image size: its shorter side to that
  size, torchvision's Resize(int)), then the centre `image_size` (CenterCrop); 'none' keeps the image's own
  size (uint8 (h, w, 3)), for a loader or model that pads and masks.
  """
  height, width = image_size_pair(image_size)
  if resize == 'none':
    return image if _is_rgb_uint8(image) else np.asarray(_as_rgb_image(image))
  if resize == 'squash':
    if isinstance(image, np.ndarray) and image.shape == (height, width, 3) and image.dtype == np.uint8:
      return image
    return np.asarray(_as_rgb_image(image).resize((width, height), BICUBIC))
  if resize != 'crop':
    raise ValueError(f'resize must be one of {", ".join(RESIZE_MODES)}; got {resize!r}')
  if crop_pct is None or not 0 < crop_pct <= 1:
    raise ValueError(f"resize='crop' takes a crop_pct in (0, 1] (data.crop_pct), got {crop_pct!r}")
  scale_height, scale_width = eval_scale_size((height, width), crop_pct)
  image = _as_rgb_image(image)
  if scale_height == scale_width:
    scaled = resize_shorter_side(image, scale_height)
  else:
    scaled = resize_to_cover(image, (scale_height, scale_width))
  return np.asarray(center_crop(scaled, (height, width)))


def eval_resize_options(config) -> dict[str, Any]:
  """`eval_resize`'s `resize` and `crop_pct` from a resolved config's `data.resize` and `data.crop_pct`."""
  return {'resize': str(config.data.resize), 'crop_pct': float(config.data.crop_pct)}


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """`eval_resize` to `image_size` as a loader transform (it draws nothing from rng)."""

  image_size: tuple[int, int]
  resize: str = 'squash'
  crop_pct: float | None = None

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    del rng
    image = eval_resize(example['image'], self.image_size, self.resize, self.crop_pct)
    return {**example, 'image': image}


def train_transform(config) -> TrainTransform | None:
  """The train transform for `config` (its `image_size` and `data.augment`); None for the synthetic task."""
  if config.data.source == 'synthetic':
    return None
  augment = config.data.augment  # checked by atlas_jax.config.resolve
  return TrainTransform(
    output_size=host_image_size(config.image_size, augment.host_max_side),
    crop_scale=tuple(float(value) for value in augment.crop_scale),
    crop_ratio=tuple(float(value) for value in augment.crop_ratio),
    hflip=float(augment.hflip),
    randaug_num_ops=int(augment.randaug_num_ops),
    randaug_magnitude=float(augment.randaug_magnitude),
    randaug_magnitude_std=float(augment.randaug_magnitude_std),
    randaug_magnitude_max=float(augment.randaug_magnitude_max),
    randaug_prob=float(augment.randaug_prob),
    aspect=str(augment.aspect),
  )


def eval_transform(config) -> EvalTransform | None:
  """The eval transform for `config`: `eval_resize` to `image_size` as `data.resize` and `data.crop_pct`
  say (with 'none' each image keeps its size); None for the synthetic task."""
  if config.data.source == 'synthetic':
    return None
  return EvalTransform(image_size_pair(config.image_size), **eval_resize_options(config))
