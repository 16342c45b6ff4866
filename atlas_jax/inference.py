"""Inference from Python: load a workdir, classify images, extract the multi-scale feature maps.

  from atlas_jax import inference
  atlas = inference.load('/tmp/atlas_quickstart')      # or a converted reference checkpoint's workdir
  model, variables, config = atlas                     # the Flax module, its restored variables, the config
  atlas.classify(images, top_k=5)   # per image: [{'index', 'label', 'prob'}, ...], most probable first
  atlas.features(images)            # per scale, finest first: float32 (batch, height, width, dim)

`images` is one image or a sequence of them: PIL images, or arrays (H, W, 3) / (H, W) of uint8, or of
floats in [0, 1]; a 4-D uint8 array is a batch. Any size: each image goes through the reference's
evaluation transform (RGB; bicubic resize to the config's size, or with `data.resize = 'crop'` timm's
resize of the shorter side to size / `data.crop_pct` then centre crop; ImageNet mean/std). Batches are split
over all local devices (a one-axis `data` mesh; one CPU device works the same).

Feature maps (`Atlas.features`): every scale of the pyramid as a spatial map, each taken at the end of the
last macro-stage that processes it, before the readout's LayerNorm. For the model configs at batch 1:

  config           scale 0            scale 1            scale 2
  atlas_s_1024     (1, 64, 64, 384)   (1, 16, 16, 384)
  atlas_s_2048     (1, 128, 128, 384) (1, 32, 32, 384)   (1, 8, 8, 384)
  atlas_b_1024     (1, 64, 64, 768)   (1, 16, 16, 768)
  atlas_b_2048     (1, 128, 128, 768) (1, 32, 32, 768)   (1, 8, 8, 768)

(`feature_shapes(config)` computes them with jax.eval_shape, without parameters or compute.)
"""

import math
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import ml_collections
import numpy as np
from PIL import Image

from atlas_jax import checkpointing, run_setup
from atlas_jax import config as config_lib
from atlas_jax import workdir as workdir_lib
from atlas_jax.data import sources
from atlas_jax.data.decode import decode_image
from atlas_jax.data.pipeline import normalize_image
from atlas_jax.data.transforms import eval_resize, eval_resize_options
from atlas_jax.errors import AtlasError
from atlas_jax.models import build_model

RESOURCES = pathlib.Path(__file__).parent / 'resources'
HR_IN100_CLASSES = sources.HR_IN100_CLASSES
IMAGENET_NAMES = RESOURCES / 'imagenet100_names.tsv'
# The built-in task's label is (colours differ) + 2 * (halves differ): docs/synthetic_task.md.
SYNTHETIC_CLASS_NAMES = (
  'same colour, same half',
  'colours differ, same half',
  'same colour, halves differ',
  'colours differ, halves differ',
)
IMAGES_PER_DEVICE = 8


class InferenceError(AtlasError, ValueError):
  """Inputs or a checkpoint that inference cannot use: bad image values, an unknown dtype, a missing file."""


# ---------------------------------------------------------------------------------------------------
# Class names.


def class_names(config) -> list[str]:
  """Class name of each index, from the checkpoint's dataset as its source numbers them (sorted names):
  `data.classes`' names; the synthetic task's four; an image folder's train/ subfolders when present here;
  HR-IN100's WordNet IDs for 100 classes; else the index."""
  num_classes = config.model.num_classes
  data = config.data
  folder_train = pathlib.Path(data.data_dir).expanduser() / 'train' if data.data_dir else None
  if data.classes:
    if not pathlib.Path(data.classes).is_file():
      raise InferenceError(
        f'data.classes names {data.classes}, which does not exist: point it at the '
        'class-list file the model was trained with'
      )
    names, source = sources.read_class_list(data.classes), data.classes
  elif data.source == 'synthetic' and num_classes == len(SYNTHETIC_CLASS_NAMES):
    return list(SYNTHETIC_CLASS_NAMES)
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


def class_labels(config) -> list[str]:
  """What predictions call each class: the readable name of a WordNet ID where known, else its class name."""
  readable = readable_names()
  return [readable.get(name, name) for name in class_names(config)]


# ---------------------------------------------------------------------------------------------------
# Images.


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
  `transforms.eval_resize` with `resize` and `crop_pct` (the config's `data.resize` and `data.crop_pct`).
  A file whose decode would allocate more than `max_decode_bytes` (data.max_decode_bytes) is a BadImageError.
  """
  image = decode_image(path, max_pixels, max_decode_bytes=max_decode_bytes)
  return normalize_image(eval_resize(image, image_size, resize, crop_pct))


def _rgb_uint8(image) -> np.ndarray | Image.Image:
  """A PIL image, or an array (H, W[, 1|3|4]) of uint8 or of floats in [0, 1] -> RGB (alpha dropped)."""
  if isinstance(image, Image.Image):
    return image.convert('RGB')
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
  """Any image `classify` takes -> (H, W, 3) float32 at `image_size`: `transforms.eval_resize` with `resize`
  and `crop_pct` (the config's `data.resize` and `data.crop_pct`), ImageNet mean/std."""
  return normalize_image(eval_resize(_rgb_uint8(image), image_size, resize, crop_pct))


def as_image_list(images) -> list:
  """One image or a sequence of them -> a non-empty list; a 4-D array is a batch of images."""
  if isinstance(images, Image.Image):
    images = [images]
  elif isinstance(images, (np.ndarray, jax.Array)):
    images = list(np.asarray(images)) if images.ndim == 4 else [images]
  else:
    images = list(images)
  if not images:
    raise InferenceError('no images given')
  return images


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

  Unpacks as (model, variables, config). `variables` are replicated over a one-axis `data` mesh of the local
  devices (or `devices`), and every batch is split over it, padded to a multiple of the device count.
  `batch_size` (default 8 per device) is the most images one forward pass takes.
  """

  def __init__(
    self, model, variables, config, step: int | None = None, batch_size: int | None = None, devices=None
  ):
    devices = list(jax.local_devices() if devices is None else devices)
    self.model, self.config, self.step = model, config, step
    self.mesh = Mesh(np.asarray(devices), ('data',))
    self.batch_size = _round_up(batch_size or IMAGES_PER_DEVICE * len(devices), len(devices))
    self.variables = jax.device_put(variables, NamedSharding(self.mesh, PartitionSpec()))
    self.class_names = class_names(config)
    self.resize_options = eval_resize_options(config)  # data.resize and data.crop_pct, for eval_resize
    self.labels = class_labels(config)
    self._logits = jax.jit(lambda variables, images: model.apply(variables, images))
    self._features = jax.jit(lambda variables, images: model.apply(variables, images, method='features'))

  def __iter__(self):
    return iter((self.model, self.variables, self.config))

  @property
  def image_size(self) -> tuple[int, int]:
    return tuple(self.config.image_size)

  def _batches(self, normalised: np.ndarray, padded_size: int):
    """Yields (number of real images, the batch padded to `padded_size` and split over the devices)."""
    sharding = NamedSharding(self.mesh, PartitionSpec('data'))
    for start in range(0, len(normalised), padded_size):
      chunk = normalised[start : start + padded_size]
      padded = np.zeros((padded_size,) + normalised.shape[1:], np.float32)
      padded[: len(chunk)] = chunk
      yield len(chunk), jax.device_put(padded, sharding)

  def _padded_size(self, count: int) -> int:
    """Full batches for many images; fewer get the next power of two (few compiled shapes and wasted rows)."""
    if count >= self.batch_size:
      return self.batch_size
    return min(self.batch_size, _round_up(2 ** math.ceil(math.log2(max(count, 1))), len(self.mesh.devices)))

  def logits(self, normalised: np.ndarray, pad_to: int | None = None) -> np.ndarray:
    """(n, H, W, 3) normalised images at the config's size -> (n, classes) float32.

    Batches are padded to `pad_to` images when given (one compiled shape for a stream of batches).
    """
    padded_size = (
      self._padded_size(len(normalised)) if pad_to is None else _round_up(pad_to, len(self.mesh.devices))
    )
    outputs = [
      np.asarray(self._logits(self.variables, batch))[:count]
      for count, batch in self._batches(np.asarray(normalised, np.float32), padded_size)
    ]
    return np.concatenate(outputs)

  def prepare(self, images) -> np.ndarray:
    """Images as `classify` takes them -> (n, H, W, 3) normalised float32 at the config's size."""
    return np.stack(
      [prepare_image(image, self.image_size, **self.resize_options) for image in as_image_list(images)]
    )

  def classify(self, images, top_k: int = 5) -> list[list[dict]]:
    """Per image, its `top_k` classes (at most all): {'index', 'label', 'prob'}, most probable first."""
    if top_k < 1:
      raise InferenceError(f'top_k must be at least 1, got {top_k}')
    return top_k_predictions(self.logits(self.prepare(images)), self.labels, min(top_k, len(self.labels)))

  def features(self, images) -> list[np.ndarray]:
    """Per scale, finest first: float32 (n, height, width, dim), each at the end of its last stage."""
    normalised = self.prepare(images)
    per_batch = [
      [np.asarray(scale, np.float32)[:count] for scale in self._features(self.variables, batch)]
      for count, batch in self._batches(normalised, self._padded_size(len(normalised)))
    ]
    return [np.concatenate(scales) for scales in zip(*per_batch)]


def _round_up(value: int, multiple: int) -> int:
  return math.ceil(value / multiple) * multiple


def load(
  workdir,
  step: int | None = None,
  dtype: str | None = None,
  use_ema: bool = False,
  config: ml_collections.ConfigDict | None = None,
  batch_size: int | None = None,
) -> Predictor:
  """A workdir (trained or converted) -> a Predictor; unpacks as (model, variables, config).

  Restores params and batch_stats of `step` (default: the best by validation top-1 when recorded, else the
  latest), EMA weights with `use_ema`. `config` replaces the workdir's config.json; `dtype` the compute
  dtype (default: float32 on CPU, the config's on accelerators). `batch_size` is images per forward pass
  over all local devices (default 8 per device).
  """
  config = config_lib.resolve(config if config is not None else workdir_lib.read_config(workdir))
  model = build_model(config, dtype=run_setup.compute_dtype(config, dtype))
  abstract = run_setup.abstract_variables(model, config.image_size)
  variables, step = checkpointing.restore_inference_variables(workdir, abstract, step, use_ema)
  check_finite_weights(variables, workdir, step)
  return Predictor(model, variables, config, step, batch_size)


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
  workdir = pathlib.Path(workdir)
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
  if (workdir / 'metrics.jsonl').is_file():
    return f'a run of atlas_jax: {described}, trained on data.source={config.data.source}'
  return (
    f'a converted reference checkpoint (tools/convert_torch, no training run): {described}, '
    f'parent_window={model.parent_window}'
  )
