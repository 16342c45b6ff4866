"""Inference from Python: load a workdir, classify images, extract the multi-scale feature maps.

  from atlas_jax import inference
  atlas = inference.load('/tmp/atlas_quickstart')      # or a converted reference checkpoint's workdir
  model, variables, config = atlas                     # the Flax module, its restored variables, the config
  atlas.classify(images, top_k=5)   # per image: [{'index', 'label', 'prob'}, ...], most probable first
  atlas.features(images)            # per scale, finest first: float32 (batch, height, width, dim)
  atlas.classify(images, resize='none')  # each image at its own size, padded and masked
  atlas.features(images, resize='none')  # per image, per scale: float32 (height, width, dim), its own size

`images` is one image or a sequence of them: paths (str or pathlib.Path, decoded as the data sources decode,
data/decode.py, within `data.max_pixels` and `data.max_decode_bytes`), PIL images, or arrays (H, W, 3) /
(H, W) of uint8, or of floats in [0, 1]; a 4-D uint8 array is a batch. `resize` (default: the config's
`data.resize`) says how an image of any size meets the model:
  'squash'  bicubic resize to the config's size, aspect ratio not kept (the reference's eval transform);
  'crop'    timm's: the shorter side resized to size / `data.crop_pct`, then the centre crop;
  'none'    each image at its own size: images are taken in groups of the batch size, each group padded at
            the bottom and right to its largest height and width rounded up to whole patches of windows
            (patch_size * window pixels, so few canvases compile), and the model masks the padding
            (`sizes`), so an image's result does not depend on the others in its group.
Then ImageNet mean/std. Batches are split over all local devices (one CPU device works the same): by
images, and with `load(..., spatial=K)` also each image's rows over K devices (docs/spatial.md), for images
too large for one device; the local devices then form (data = devices / K, fsdp 1, spatial K).

Feature maps (`Atlas.features`): every scale of the pyramid as a spatial map, each taken at the end of the
last macro-stage that processes it, before the readout's LayerNorm. For the model configs at batch 1:

  config           scale 0            scale 1            scale 2
  atlas_s_1024     (1, 64, 64, 384)   (1, 16, 16, 384)
  atlas_s_2048     (1, 128, 128, 384) (1, 32, 32, 384)   (1, 8, 8, 384)
  atlas_b_1024     (1, 64, 64, 768)   (1, 16, 16, 768)
  atlas_b_2048     (1, 128, 128, 768) (1, 32, 32, 768)   (1, 8, 8, 768)

(`feature_shapes(config)` computes them with jax.eval_shape, without parameters or compute.) With
`resize='none'` an h x w image's map at scale s is ceil(h / patch / pool^s) x ceil(w / patch / pool^s)
(`models.layout.valid_token_sides`), the padding cropped away.
"""

import math
import os
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
from PIL import Image

from atlas_jax import checkpointing, run_setup, sharding, storage
from atlas_jax import config as config_lib
from atlas_jax import workdir as workdir_lib
from atlas_jax.data import sources
from atlas_jax.data.decode import decode_image
from atlas_jax.data.pipeline import normalize_image
from atlas_jax.data.transforms import eval_resize, eval_resize_options
from atlas_jax.errors import AtlasError
from atlas_jax.models import build_model
from atlas_jax.models import geometry as geometry_lib
from atlas_jax.models import layout as layout_lib
from atlas_jax.models.layout import valid_token_sides

RESOURCES = pathlib.Path(__file__).parent / 'resources'
HR_IN100_CLASSES = sources.HR_IN100_CLASSES
IMAGENET_NAMES = RESOURCES / 'imagenet100_names.tsv'
# The default built-in task's class names (docs/synthetic_task.md); a config's own come from
# `synthetic_class_names`.
SYNTHETIC_CLASS_NAMES = sources.synthetic.SyntheticColourPairs.classes
IMAGES_PER_DEVICE = 8
RESIZE_CHOICES = ('squash', 'crop', 'none')  # data.resize, and 'none' whatever the config allows


class InferenceError(AtlasError, ValueError):
  """Inputs or a checkpoint that inference cannot use: bad image values, an unknown dtype, a missing file."""


# ---------------------------------------------------------------------------------------------------
# Class names.


def class_names(config, workdir=None) -> list[str]:
  """Class name of each index: `workdir`'s labels.txt when it has one (written at training start and by
  tools/convert_torch, so the names travel with the model), else from the checkpoint's dataset as its source
  numbers them (sorted names): `data.classes`' names; the synthetic task's four; an image folder's train/
  subfolders when present here; HR-IN100's WordNet IDs for 100 classes; else the index."""
  num_classes = config.model.num_classes
  names = None if workdir is None else workdir_lib.read_labels(workdir)
  if names is not None:
    if len(names) != num_classes:
      raise InferenceError(
        f'{workdir_lib.labels_path(workdir)} lists {len(names)} class names but the model has {num_classes} '
        'classes: it belongs to another model; fix it (one name a line, in index order) or delete it'
      )
    return names
  data = config.data
  folder_train = pathlib.Path(data.data_dir).expanduser() / 'train' if data.data_dir else None
  if data.classes:
    if not storage.isfile(data.classes):
      raise InferenceError(
        f'data.classes names {data.classes}, which does not exist: point it at the '
        'class-list file the model was trained with'
      )
    names, source = sources.read_class_list(data.classes), data.classes
  elif data.source == 'synthetic' and num_classes == len(sources.synthetic.class_names(data)):
    return list(sources.synthetic.class_names(data))
  elif data.source == 'folder' and folder_train is not None and folder_train.is_dir():
    source = folder_train
    names = sorted(
      entry.name for entry in source.iterdir() if entry.is_dir() and not entry.name.startswith('.')
    )
  elif num_classes == 100:
    names, source = sources.read_class_list(HR_IN100_CLASSES), HR_IN100_CLASSES
  else:
    return [str(index) for index in range(num_classes)]
  if len(names) != num_classes:
    raise InferenceError(f'{source} lists {len(names)} classes but the model has {num_classes}')
  return names


def readable_names() -> dict[str, str]:
  """WordNet ID -> a readable name, for the HR-IN100 classes."""
  pairs = (line.split('\t') for line in IMAGENET_NAMES.read_text().splitlines() if line.strip())
  return {wnid: name for wnid, name in pairs}


def class_labels(config, workdir=None, names: Sequence[str] | None = None) -> list[str]:
  """What predictions call each class: the readable name of a WordNet ID where known, else its class name
  (`names`, default `class_names(config, workdir)`)."""
  readable = readable_names()
  return [readable.get(name, name) for name in (class_names(config, workdir) if names is None else names)]


# ---------------------------------------------------------------------------------------------------
# Images.


def check_resize(resize) -> str:
  """`resize` when it is one of RESIZE_CHOICES; else one InferenceError line naming them."""
  if not isinstance(resize, str) or resize not in RESIZE_CHOICES:
    raise InferenceError(f"resize must be one of 'squash', 'crop' or 'none', got {resize!r}")
  return resize


def load_image(
  path,
  image_size,
  max_pixels: int,
  max_decode_bytes: int,
  resize: str = 'squash',
  crop_pct: float | None = None,
) -> np.ndarray:
  """The evaluation transform of a file: (H, W, 3) float32, normalised; BadImageError if unreadable.

  Decoded as the data sources decode (data/decode.py: EXIF orientation, RGB, transparency on white), then
  `transforms.eval_resize` with `resize` and `crop_pct` (the config's `data.resize` and `data.crop_pct`), or
  with `resize='none'` at its decoded size (`image_size` unused). A file whose decode would allocate more
  than `max_decode_bytes` (data.max_decode_bytes) is a BadImageError.
  """
  check_resize(resize)
  image = decode_image(path, max_pixels, max_decode_bytes=max_decode_bytes)
  return normalize_image(image if resize == 'none' else eval_resize(image, image_size, resize, crop_pct))


def _rgb_uint8(image) -> np.ndarray | Image.Image:
  """A PIL image, or an array (H, W[, 1|3|4]) of uint8 or of floats in [0, 1] -> RGB (alpha dropped)."""
  if isinstance(image, Image.Image):
    return image.convert('RGB')
  if not isinstance(image, (np.ndarray, jax.Array)):
    raise InferenceError(
      'an image must be a path (str or pathlib.Path), a PIL image or an array (H, W, 3) / (H, W); '
      f'got {type(image).__name__}'
    )
  pixels = np.asarray(image)
  if pixels.ndim == 3 and pixels.shape[-1] in (1, 3, 4):
    pixels = pixels[..., :3] if pixels.shape[-1] != 1 else pixels[..., 0]
  if pixels.ndim not in (2, 3) or 0 in pixels.shape:
    raise InferenceError(
      f'an image must be (H, W, 3), (H, W, 4) or (H, W), got an array of shape {pixels.shape}'
    )
  if np.issubdtype(pixels.dtype, np.floating):
    if not (np.min(pixels) >= 0.0 and np.max(pixels) <= 1.0):  # also refuses NaN
      raise InferenceError('a float image must hold values in [0, 1]; pass uint8 pixels (0-255) otherwise')
    pixels = np.round(pixels * 255.0).astype(np.uint8)
  elif pixels.dtype != np.uint8:
    raise InferenceError(f'an image array must be uint8 or float in [0, 1], got {pixels.dtype}')
  if pixels.ndim == 2:
    pixels = np.repeat(pixels[..., None], 3, axis=-1)
  return np.ascontiguousarray(pixels)


def prepare_image(image, image_size, resize: str = 'squash', crop_pct: float | None = None) -> np.ndarray:
  """A PIL image or an array `classify` takes -> (H, W, 3) float32: `transforms.eval_resize` to `image_size`
  with `resize` and `crop_pct` (the config's `data.resize` and `data.crop_pct`), or at its own size with
  `resize='none'`; ImageNet mean/std."""
  pixels = _rgb_uint8(image)
  if check_resize(resize) == 'none':
    return normalize_image(np.asarray(pixels))
  return normalize_image(eval_resize(pixels, image_size, resize, crop_pct))


def as_image_list(images) -> list:
  """One image or a sequence of them -> a non-empty list; a 4-D array is a batch, a path one image."""
  if isinstance(images, (Image.Image, str, os.PathLike)):
    images = [images]
  elif isinstance(images, (np.ndarray, jax.Array)):
    images = list(np.asarray(images)) if images.ndim == 4 else [images]
  else:
    try:
      images = list(images)
    except TypeError:
      raise InferenceError(
        'images must be one image or a sequence of them: paths (str or pathlib.Path), PIL images or '
        f'arrays; got {type(images).__name__}'
      ) from None
  if not images:
    raise InferenceError('no images given')
  return images


def pad_to_canvas(images: Sequence[np.ndarray], multiple: int) -> tuple[np.ndarray, np.ndarray]:
  """Normalised images of any sizes -> (canvas batch (n, H, W, 3) float32, sizes (n, 2) int32).

  The canvas is the largest height and width rounded up to `multiple` (patch_size * window: few distinct
  canvases, so few compiles); each image sits at the top-left, zeros around it, which the model masks.
  """
  sizes = np.asarray([image.shape[:2] for image in images], np.int32)
  height, width = (_round_up(int(side), multiple) for side in sizes.max(axis=0))
  canvas = np.zeros((len(images), height, width, 3), np.float32)
  for row, image in zip(canvas, images):
    row[: image.shape[0], : image.shape[1]] = image
  return canvas, sizes


# ---------------------------------------------------------------------------------------------------
# The model.


def feature_shapes(config, batch_size: int = 1) -> list[tuple[int, ...]]:
  """Shapes of `features` for `config`'s model: per scale, finest first. Traced only (jax.eval_shape)."""
  config = config_lib.resolve(config)
  model = build_model(config)
  height, width = config.image_size
  images = jax.ShapeDtypeStruct((batch_size, height, width, 3), jnp.float32)

  def init_and_features(images):
    return model.init_with_output(jax.random.key(0), images, method='features')[0]

  return [tuple(scale.shape) for scale in jax.eval_shape(init_and_features, images)]


def top_k_predictions(logits: np.ndarray, labels: Sequence[str], top_k: int) -> list[list[dict]]:
  """(n, classes) logits -> per row the `top_k` most probable classes: {'index', 'label', 'prob'}."""
  probabilities = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
  order = np.argsort(-probabilities, axis=-1, kind='stable')[:, :top_k]
  return [
    [{'index': int(i), 'label': labels[i], 'prob': float(row[i])} for i in indices]
    for row, indices in zip(probabilities, order)
  ]


class Predictor:
  """A restored model on all local devices: classify images and extract feature maps.

  Unpacks as (model, variables, config). The local devices (or `devices`) form the mesh (data = devices /
  `spatial`, fsdp 1, spatial `spatial`); `variables` are replicated over it, and every batch is split over
  the data-parallel devices by images, padded to a multiple of their count, and with `spatial` > 1 each
  image's rows also over `spatial` (docs/spatial.md: the model keeps them split; the results are those of
  one device). `batch_size` (default 8 per data-parallel group: per device when `spatial` is 1) is the most
  images one forward pass takes. The class names are `workdir`'s labels.txt when it has one, else what the
  config's dataset says (`class_names`).
  """

  def __init__(
    self,
    model,
    variables,
    config,
    step: int | None = None,
    batch_size: int | None = None,
    devices=None,
    workdir=None,
    spatial: int = 1,
  ):
    devices = list(jax.local_devices() if devices is None else devices)
    self.model, self.config, self.step = model, config, step
    self.mesh = inference_mesh(devices, spatial)
    self.spatial = int(spatial)
    self.data_parallel_size = sharding.data_parallel_size(self.mesh)
    self.batch_size = _round_up(
      batch_size or IMAGES_PER_DEVICE * self.data_parallel_size, self.data_parallel_size
    )
    self.variables = jax.device_put(variables, NamedSharding(self.mesh, PartitionSpec()))
    self.class_names = class_names(config, workdir)  # the workdir's labels.txt first
    self.resize_options = eval_resize_options(config)  # data.resize and data.crop_pct, for eval_resize
    self.labels = class_labels(config, names=self.class_names)

    # `sizes` None (images filling the canvas) calls the model exactly as before any-size inputs existed.
    def apply(variables, images, sizes, method=None):
      if sizes is None:
        return model.apply(variables, images, method=method)
      return model.apply(variables, images, sizes=sizes, method=method)

    logits = jax.jit(apply)
    features = jax.jit(lambda variables, images, sizes: apply(variables, images, sizes, 'features'))

    # Under the mesh, so the model's constraints keep an image's rows split when `spatial` > 1.
    def on_mesh(function):
      def call(*args):
        with jax.set_mesh(self.mesh):
          return function(*args)

      return call

    self._logits, self._features = on_mesh(logits), on_mesh(features)

  def __iter__(self):
    return iter((self.model, self.variables, self.config))

  @property
  def image_size(self) -> tuple[int, int]:
    return tuple(self.config.image_size)

  @property
  def canvas_multiple(self) -> int:
    """Pixels a padded canvas side is a multiple of: whole windows of patches, so few canvases compile."""
    return int(self.config.model.patch_size) * int(self.config.model.window)

  def _batches(self, normalised: np.ndarray, padded_size: int, sizes: np.ndarray | None = None):
    """Yields (number of real images, the batch padded to `padded_size` and split over the devices, its
    sizes likewise or None). Padding rows are zeros sized as the whole canvas; their outputs are dropped.

    With `spatial` > 1, a canvas whose pixel rows do not divide over the spatial devices is padded below
    to the whole bands of windows the model would pad it to anyway, and `sizes` (default: the canvas)
    mask the padding."""
    height = normalised.shape[1]
    spatial_height = self._spatial_height(height)
    image_sharding = sharding.batch_sharding(self.mesh, 4)
    sizes_sharding = sharding.batch_sharding(self.mesh, 2)
    for start in range(0, len(normalised), padded_size):
      chunk = normalised[start : start + padded_size]
      padded = np.zeros((padded_size, spatial_height) + normalised.shape[2:], np.float32)
      padded[: len(chunk), :height] = chunk
      padded_sizes = None
      if sizes is not None or spatial_height != height:
        padded_sizes = np.tile(np.asarray(normalised.shape[1:3], np.int32), (padded_size, 1))
        if sizes is not None:
          padded_sizes[: len(chunk)] = sizes[start : start + padded_size]
        padded_sizes = jax.device_put(padded_sizes, sizes_sharding)
      yield len(chunk), jax.device_put(padded, image_sharding), padded_sizes

  def _spatial_height(self, height: int) -> int:
    """Pixel rows a canvas of `height` rows is given: `height`, unless `spatial` > 1 does not divide it;
    then whole bands of windows of patches, their count a multiple of `spatial` (the model's own padding,
    models/geometry.spatial_tokens), so every device gets the same rows."""
    if height % self.spatial == 0:
      return height
    return _round_up(math.ceil(height / self.canvas_multiple), self.spatial) * self.canvas_multiple

  def _padded_size(self, count: int) -> int:
    """Full batches for many images; fewer get the next power of two (few compiled shapes and wasted rows),
    a multiple of the data-parallel size."""
    if count >= self.batch_size:
      return self.batch_size
    return min(self.batch_size, _round_up(2 ** math.ceil(math.log2(max(count, 1))), self.data_parallel_size))

  def logits(self, normalised: np.ndarray, pad_to: int | None = None, sizes: np.ndarray | None = None):
    """(n, H, W, 3) normalised images -> (n, classes) float32.

    Batches are padded to `pad_to` images when given (one compiled shape for a stream of batches).
    `sizes` (n, 2): each image's valid (height, width) at the canvas's top-left (`pad_to_canvas`); None:
    every image fills the canvas.
    """
    padded_size = (
      self._padded_size(len(normalised)) if pad_to is None else _round_up(pad_to, self.data_parallel_size)
    )
    outputs = [
      np.asarray(self._logits(self.variables, batch, batch_sizes))[:count]
      for count, batch, batch_sizes in self._batches(np.asarray(normalised, np.float32), padded_size, sizes)
    ]
    return np.concatenate(outputs)

  def resize_mode(self, resize: str | None = None) -> str:
    """`resize`, or the config's `data.resize` when None; InferenceError unless squash, crop or none."""
    return check_resize(self.resize_options['resize'] if resize is None else resize)

  def _rgb(self, image):
    """A path -> its RGB pixels, decoded as the data sources decode within the config's budget; else as is."""
    if isinstance(image, (str, os.PathLike)):
      data = self.config.data
      return decode_image(image, int(data.max_pixels), max_decode_bytes=int(data.max_decode_bytes))
    return image

  def prepare(self, images, resize: str | None = None) -> np.ndarray:
    """Images as `classify` takes them -> (n, H, W, 3) normalised float32 at the config's size, resized as
    `resize` says (default: the config's data.resize). `resize='none'` keeps sizes: see `prepare_native`."""
    resize = self.resize_mode(resize)
    if resize == 'none':
      raise InferenceError(
        "prepare stacks images at the config's size; with resize='none' use prepare_native (one array each)"
      )
    options = {**self.resize_options, 'resize': resize}
    return np.stack(
      [prepare_image(self._rgb(image), self.image_size, **options) for image in as_image_list(images)]
    )

  def prepare_native(self, images) -> list[np.ndarray]:
    """Images as `classify` takes them -> per image (h, w, 3) normalised float32 at its own size."""
    return [prepare_image(self._rgb(image), self.image_size, 'none') for image in as_image_list(images)]

  def _native_groups(self, images):
    """Yields per group of up to `batch_size` images: (canvas batch, sizes), padded by `pad_to_canvas`.
    Each group is decoded when reached, so only one group of full-size images is in memory at a time."""
    images = as_image_list(images)
    for start in range(0, len(images), self.batch_size):
      yield pad_to_canvas(self.prepare_native(images[start : start + self.batch_size]), self.canvas_multiple)

  def classify(self, images, top_k: int = 5, resize: str | None = None) -> list[list[dict]]:
    """Per image, its `top_k` classes (at most all): {'index', 'label', 'prob'}, most probable first.

    `resize`: 'squash', 'crop' or 'none' (each image at its own size); default the config's data.resize.
    """
    if top_k < 1:
      raise InferenceError(f'top_k must be at least 1, got {top_k}')
    if self.resize_mode(resize) == 'none':
      logits = np.concatenate(
        [self.logits(canvas, sizes=sizes) for canvas, sizes in self._native_groups(images)]
      )
    else:
      logits = self.logits(self.prepare(images, resize))
    return top_k_predictions(logits, self.labels, min(top_k, len(self.labels)))

  def features(self, images, resize: str | None = None) -> list:
    """Per scale, finest first: float32 (n, height, width, dim), each at the end of its last stage.

    With `resize='none'`, per image its list of scales, each (h_s, w_s, dim): the image's own valid region,
    ceil(h / patch / pool^s) x ceil(w / patch / pool^s), the padding cropped away.
    """
    if self.resize_mode(resize) != 'none':
      normalised = self.prepare(images, resize)
      rows = self._unsplit_rows(normalised.shape[1:3])
      per_batch = [
        [
          np.asarray(scale, np.float32)[:count, :scale_rows]
          for scale, scale_rows in zip(self._features(self.variables, batch, batch_sizes), rows)
        ]
        for count, batch, batch_sizes in self._batches(normalised, self._padded_size(len(normalised)))
      ]
      return [np.concatenate(scales) for scales in zip(*per_batch)]
    patch_size, pool = int(self.config.model.patch_size), int(self.config.model.pool)
    per_image = []
    for canvas, sizes in self._native_groups(images):
      count, batch, batch_sizes = next(self._batches(canvas, self._padded_size(len(canvas)), sizes))
      maps = [
        np.asarray(scale, np.float32)[:count] for scale in self._features(self.variables, batch, batch_sizes)
      ]
      for index, size in enumerate(sizes):
        sides = valid_token_sides(size, patch_size, len(maps), pool)
        per_image.append([scale[index, :rows, :cols].copy() for scale, (rows, cols) in zip(maps, sides)])
    return per_image

  def _unsplit_rows(self, canvas_hw) -> list[int]:
    """Rows of each scale's map for a canvas of `canvas_hw` pixels on one device: the maps a split
    canvas gives are cropped to them (its padding rows hold zeros)."""
    model = self.config.model
    patch_size, window, pool = int(model.patch_size), int(model.window), int(model.pool)
    num_scales = len(layout_lib.check_image_size(self.image_size, patch_size, window, pool))
    tokens_hw = geometry_lib.canvas_tokens(canvas_hw, patch_size)
    return [layout.height for layout in layout_lib.canvas_layouts(tokens_hw, num_scales, window, pool)]


def inference_mesh(devices, spatial: int = 1) -> Mesh:
  """The mesh (data = len(devices) / spatial, fsdp 1, spatial) of `devices`; one InferenceError line
  unless `spatial` is a positive integer dividing their count."""
  count = len(devices)
  if (
    isinstance(spatial, bool) or not isinstance(spatial, (int, np.integer)) or spatial < 1 or count % spatial
  ):
    divisors = ', '.join(str(size) for size in range(1, count + 1) if count % size == 0)
    raise InferenceError(
      f'spatial={spatial!r} must be a positive integer dividing the {count} local device(s): use one of '
      f'{divisors}'
    )
  spatial = int(spatial)
  return Mesh(np.asarray(devices).reshape(count // spatial, 1, spatial), sharding.MESH_AXES)


def _round_up(value: int, multiple: int) -> int:
  return math.ceil(value / multiple) * multiple


def load(
  workdir,
  step: int | None = None,
  dtype: str | None = None,
  use_ema: bool = False,
  config: ml_collections.ConfigDict | None = None,
  batch_size: int | None = None,
  spatial: int = 1,
) -> Predictor:
  """A workdir (trained or converted) -> a Predictor; unpacks as (model, variables, config).

  Restores params and batch_stats of `step` (default: the best by validation top-1 when recorded, else the
  latest), EMA weights with `use_ema`. `config` replaces the workdir's config.json; `dtype` the compute
  dtype (default: float32 on CPU, the config's on accelerators). `batch_size` is images per forward pass
  over all local devices (default 8 per data-parallel group). `spatial` splits each image's rows over that
  many devices (it must divide the local device count; docs/spatial.md). The class names come from the
  workdir's labels.txt when it has one, so they do not depend on the dataset still being where it was
  (`class_names`).
  """
  inference_mesh(jax.local_devices(), spatial)  # a bad `spatial` is refused before anything is restored
  config = config_lib.resolve(config if config is not None else workdir_lib.read_config(workdir))
  model = build_model(config, dtype=run_setup.compute_dtype(config, dtype))
  abstract = run_setup.abstract_variables(model, config.image_size)
  variables, step = checkpointing.restore_inference_variables(workdir, abstract, step, use_ema)
  check_finite_weights(variables, workdir, step)
  return Predictor(model, variables, config, step, batch_size, workdir=workdir, spatial=spatial)


def check_finite_weights(variables, workdir, step: int) -> None:
  """InferenceError naming the first parameter or statistic holding NaN or Inf: its predictions would be
  NaN probabilities, not an answer."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    if not np.all(np.isfinite(np.asarray(leaf))):
      raise InferenceError(
        f'step {step} of {workdir} holds non-finite values in {jax.tree_util.keystr(path)}: the run '
        'diverged before it was saved; predict from an earlier step (--step=N) or retrain'
      )


def checkpoint_origin(workdir) -> str:
  """One sentence saying what a workdir holds: a run on the synthetic task (as the quickstart), another run of
  atlas_jax, or a converted reference checkpoint (tools/convert_torch writes config.json and step 0, and no
  metrics.jsonl)."""
  workdir = storage.path(workdir)
  config = config_lib.resolve(workdir_lib.read_config(workdir))
  model = config.model
  size = 'x'.join(str(side) for side in config.image_size)
  described = (
    f'{model.name} (dim {model.dim}, depths {tuple(model.depths)}) at {size} px with '
    f'{model.num_classes} classes'
  )
  if config.data.source == 'synthetic':
    return (
      f"a run of atlas_jax on the built-in synthetic long-range task, the quickstart's: {described}; "
      'its classes are relations between two coloured squares, not objects, so what it says of a '
      'photograph means nothing'
    )
  if storage.isfile(workdir / 'metrics.jsonl'):
    return f'a run of atlas_jax: {described}, trained on data.source={config.data.source}'
  return (
    f'a converted reference checkpoint (tools/convert_torch, no training run): {described}, '
    f'parent_window={model.parent_window}'
  )
