r"""Classifies images with a trained or converted Atlas.

python -m atlas_jax.predict --checkpoint=WORKDIR [--config=configs/NAME.py] [--output=preds.jsonl] \
    [--step=N] [--top_k=5] IMAGE_OR_FOLDER...

Preprocessing is the reference's evaluation transform: decode to RGB (EXIF orientation applied, which the
reference does not do), bicubic resize to the config's size with PIL, scale to [0, 1], ImageNet mean/std.
Computes in float32 on CPU, in the config's dtype on accelerators. `--output` gets one JSON line per
readable image: {"path", "top_k": [{"index", "label", "prob"}, ...], "logits"}. Unreadable files are
reported on stderr and skipped; the exit code is 0 when at least one image was classified.
"""

import json
import pathlib
import sys

from absl import app, flags, logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
from PIL import Image, ImageOps

from atlas_jax import checkpointing, workdir as workdir_lib
from atlas_jax.models import build_model, resolve_model_config

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm'}
HR_IN100_CLASSES = pathlib.Path(__file__).parent / 'resources' / 'imagenet100_classes.txt'



def define_flags():
  """The command line's flags; defined only when run as a program, so the module imports anywhere."""
  global _CONFIG, _CHECKPOINT, _OUTPUT, _STEP, _TOP_K, _BATCH_SIZE
  _CONFIG = config_flags.DEFINE_config_file('config', None, "Config file; default: the workdir's config.json.",
                                            lock_config=True)
  _CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Workdir holding checkpoints/ and config.json.')
  _OUTPUT = flags.DEFINE_string('output', None, 'Write JSON lines here.')
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the latest.')
  _TOP_K = flags.DEFINE_integer('top_k', 5, 'How many classes to report per image.')
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'Images per forward pass.')


def load_image(path, image_size) -> np.ndarray:
  """The evaluation transform: file -> (H, W, 3) float32, normalised. Raises OSError/ValueError if unreadable."""
  height, width = image_size
  with Image.open(path) as image:
    image = ImageOps.exif_transpose(image)
    image = image.convert('RGB').resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image, np.float32) / 255.0
  return (pixels - IMAGENET_MEAN) / IMAGENET_STD


def class_names(config) -> list[str]:
  """Label of each class index: `data.classes`' names, sorted (DESIGN.md), HR-IN100's for 100 classes, or the index."""
  num_classes = config.model.num_classes
  if config.data.classes:
    source = pathlib.Path(config.data.classes)
    if not source.is_file():
      raise ValueError(f'data.classes names {source}, which does not exist: point it at the class-list file '
                       'the model was trained with')
  elif num_classes == 100:
    source = HR_IN100_CLASSES
  else:
    return [str(index) for index in range(num_classes)]
  names = sorted(line.strip() for line in source.read_text().splitlines() if line.strip())
  if len(names) != num_classes:
    raise ValueError(f'{source} lists {len(names)} classes but the model has {num_classes}')
  return names


def image_paths(inputs) -> list[pathlib.Path]:
  """Files as given; folders walked (sorted) for files with an image suffix."""
  paths = []
  for entry in map(pathlib.Path, inputs):
    if entry.is_dir():
      paths.extend(sorted(p for p in entry.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
    else:
      paths.append(entry)
  return paths


class Predictor:
  """A model and its restored variables, and a jitted forward pass over fixed-size batches."""

  def __init__(self, workdir, config=None, step=None, batch_size=8):
    config = resolve_model_config(config if config is not None else workdir_lib.read_config(workdir))
    self.config = config
    # float32 on CPU (bf16 there is slow and less exact); the config's dtype on accelerators.
    self.model = build_model(config, dtype='float32' if jax.default_backend() == 'cpu' else None)
    self.batch_size = batch_size
    images = jax.ShapeDtypeStruct((1,) + tuple(config.image_size) + (3,), jnp.float32)
    abstract = jax.eval_shape(self.model.init, jax.random.key(0), images)
    self.variables, self.step = checkpointing.restore_inference_variables(workdir, abstract, step)
    self._logits = jax.jit(lambda variables, images: self.model.apply(variables, images))

  def logits(self, images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) normalised -> (n, classes) float32, in batches padded to `batch_size` (one compile)."""
    outputs = []
    for start in range(0, len(images), self.batch_size):
      batch = images[start:start + self.batch_size]
      padded = np.zeros((self.batch_size,) + batch.shape[1:], np.float32)
      padded[:len(batch)] = batch
      outputs.append(np.asarray(self._logits(self.variables, padded))[:len(batch)])
    return np.concatenate(outputs)


def predictions(logits: np.ndarray, names: list[str], top_k: int) -> list[list[dict]]:
  probabilities = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
  order = np.argsort(-probabilities, axis=-1, kind='stable')[:, :top_k]
  return [[{'index': int(i), 'label': names[i], 'prob': float(row[i])} for i in indices]
          for row, indices in zip(probabilities, order)]


def main(argv):
  logging.set_verbosity(logging.WARNING)
  inputs = argv[1:]
  if _CHECKPOINT.value is None or not inputs:
    raise app.UsageError('usage: python -m atlas_jax.predict --checkpoint=WORKDIR IMAGE_OR_FOLDER...')
  if _TOP_K.value < 1 or _BATCH_SIZE.value < 1:
    raise app.UsageError('--top_k and --batch_size must be at least 1')
  try:
    predictor = Predictor(_CHECKPOINT.value, _CONFIG.value, _STEP.value, _BATCH_SIZE.value)
    names = class_names(predictor.config)
  except (ValueError, FileNotFoundError) as error:
    print(f'predict: {error}', file=sys.stderr)
    sys.exit(1)
  top_k = min(_TOP_K.value, len(names))
  readable, arrays, unreadable = [], [], 0
  for path in image_paths(inputs):
    try:
      arrays.append(load_image(path, predictor.config.image_size))
      readable.append(path)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
      unreadable += 1
      print(f'predict: skipping {path}: {error}', file=sys.stderr)
  output = open(_OUTPUT.value, 'w') if _OUTPUT.value else None
  try:
    if arrays:
      logits = predictor.logits(np.stack(arrays))
      for path, row, top in zip(readable, logits, predictions(logits, names, top_k)):
        print(f'{path}: ' + ', '.join(f'{entry["label"]} {entry["prob"]:.4f}' for entry in top))
        if output:
          output.write(json.dumps({'path': str(path), 'top_k': top, 'logits': [float(v) for v in row]}) + '\n')
  finally:
    if output:
      output.close()
  print(f'classified {len(readable)} images with step {predictor.step}; {unreadable} unreadable skipped',
        file=sys.stderr)
  sys.exit(0 if readable else 1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
