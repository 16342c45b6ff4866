r"""Classifies image files and folders with a trained or converted Atlas.

python -m atlas_jax.predict --checkpoint=WORKDIR [--config=NAME|FILE] [--output=preds.jsonl] \
    [--step=N] [--top_k=5] [--batch_size=N] [--dtype=float32|bfloat16] [--ema] \
    [--resize=squash|crop|none] [--crop_pct=F] [--spatial=K] IMAGE_OR_FOLDER...

Folders are walked recursively for image files (sorted). Each image goes through the evaluation transform
(data/decode.py's decoding: EXIF orientation applied, which the reference does not do, reduced to
`data.max_pixels` within `data.max_decode_bytes`; then `--resize`, default the config's `data.resize`:
`squash` a bicubic resize to its size, `crop` timm's resize of the shorter side to size / `--crop_pct`
(default `data.crop_pct`) then centre crop, `none` the image at its own size; ImageNet mean/std), in
batches split over all local devices, while worker threads decode the next batch. With `none` each batch
is padded to its largest height and width rounded up to whole windows of patches and the model masks the
padding (inference.pad_to_canvas), so every image is classified as it would be alone. Computes in float32
on CPU and in the config's dtype on accelerators unless `--dtype` says. `--spatial=K` splits each image's
rows over K devices (K dividing the local device count; the batch then splits over the devices / K
data-parallel groups, docs/spatial.md): for images too large for one device, with the same predictions.
`--output` gets one JSON line per readable image: {"path", "top_k": [{"index", "label", "prob"}, ...],
"logits"}; without it each image gets a line on stdout. A progress bar goes to stderr when there is more
than one batch. Unreadable files are reported on stderr, counted at the end and skipped; the exit code is 0
when at least one image was classified, else 1. The same from Python: atlas_jax/inference.py.
The classes are named by WORKDIR/labels.txt (written at training start and by tools/convert_torch), so the
names survive the dataset moving; a workdir without one names them as its config's dataset does
(inference.class_names). `--config` replaces the workdir's config.json: a config file or a shipped config's
name, from any directory.
"""

import concurrent.futures
import json
import math
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np
import tqdm

from atlas_jax import config as config_lib
from atlas_jax import inference
from atlas_jax.data import transforms
from atlas_jax.data.decode import BadImageError
from atlas_jax.errors import AtlasError, one_line_errors

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm'}


class PredictError(AtlasError, ValueError):
  """Inputs or outputs predict cannot work with: no image files found, an output it cannot write."""


def define_flags():
  """The command line's flags; defined only when run as a program, so the module imports anywhere."""
  global _CONFIG, _CHECKPOINT, _OUTPUT, _STEP, _TOP_K, _BATCH_SIZE, _DTYPE, _EMA, _WORKERS
  global _RESIZE, _CROP_PCT, _SPATIAL
  _CONFIG = config_flags.DEFINE_config_file(
    'config', None, "Config file; default: the workdir's config.json.", lock_config=True
  )
  _CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Workdir holding checkpoints/ and config.json.')
  _OUTPUT = flags.DEFINE_string('output', None, 'Write JSON lines here (else a line per image on stdout).')
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the best recorded, else the latest.')
  _TOP_K = flags.DEFINE_integer('top_k', 5, 'How many classes to report per image.')
  _BATCH_SIZE = flags.DEFINE_integer(
    'batch_size',
    None,
    'Images per forward pass over all local devices, rounded up to a multiple of the data-parallel '
    'groups (devices / --spatial); default: 8 per group.',
  )
  _DTYPE = flags.DEFINE_enum(
    'dtype',
    None,
    ['float32', 'bfloat16', 'float16'],
    "Compute dtype; default: float32 on CPU, the config's dtype on accelerators.",
  )
  _EMA = flags.DEFINE_bool('ema', False, 'Use the EMA weights of the checkpoint.')
  _WORKERS = flags.DEFINE_integer('workers', min(8, os.cpu_count() or 1), 'Threads decoding images.')
  # Strings checked in main, so a bad value is one `error:` line like every other mistake here.
  _RESIZE = flags.DEFINE_string(
    'resize',
    None,
    "squash (bicubic to the config's size), crop (timm's centre crop, --crop_pct) or none (each image at "
    "its own size, padded and masked); default: the config's data.resize.",
  )
  _CROP_PCT = flags.DEFINE_string(
    'crop_pct',
    None,
    "With --resize=crop: the centre crop's share of the resized side, in (0, 1]; "
    "default: the config's data.crop_pct.",
  )
  _SPATIAL = flags.DEFINE_integer(
    'spatial',
    1,
    "Split each image's rows over this many devices (it must divide the local device count; "
    'docs/spatial.md); the batch splits over the rest.',
  )


def parse_crop_pct(value: str) -> float:
  """`--crop_pct`'s text -> a float in (0, 1]; PredictError otherwise."""
  try:
    crop_pct = float(value)
  except ValueError:
    crop_pct = None
  if crop_pct is None or not 0 < crop_pct <= 1:
    raise PredictError(f'--crop_pct must be a number in (0, 1], got {value!r}')
  return crop_pct


def image_paths(inputs) -> list[pathlib.Path]:
  """Files as given; folders walked (recursively, sorted) for files with an image suffix."""
  paths = []
  for entry in map(pathlib.Path, inputs):
    if entry.is_dir():
      paths.extend(sorted(p for p in entry.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
    else:
      paths.append(entry)
  if not paths:
    raise PredictError(
      f'no image files in {" ".join(map(str, inputs))} (suffixes: {", ".join(sorted(IMAGE_SUFFIXES))})'
    )
  return paths


def _load(path, image_size, max_pixels, resize_options):
  """(normalised image, None), or (None, why it is unreadable)."""
  try:
    return inference.load_image(path, image_size, max_pixels, **resize_options), None
  except BadImageError as error:
    return None, error.reason


def decoded_batches(
  paths,
  image_size,
  max_pixels: int,
  batch_size: int,
  workers: int,
  resize_options: dict,
  max_decode_bytes: int,
):
  """Yields per batch of `paths`: [(path, normalised image or None, error or None)], in order.

  `resize_options` are `inference.load_image`'s `resize` and `crop_pct`; `max_decode_bytes` its decode
  budget (data.max_decode_bytes).

  The next batch is decoding in `workers` threads while the caller computes on the current one.
  """
  resize_options = {'max_decode_bytes': max_decode_bytes, **resize_options}
  chunks = [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:

    def submit(chunk):
      return [pool.submit(_load, path, image_size, max_pixels, resize_options) for path in chunk]

    pending = submit(chunks[0]) if chunks else []
    for index, chunk in enumerate(chunks):
      current, pending = pending, submit(chunks[index + 1]) if index + 1 < len(chunks) else []
      yield [(path, *future.result()) for path, future in zip(chunk, current)]


def progress_bar(total: int, stream, show: bool) -> tqdm.tqdm:
  """tqdm's bar of `total` images on `stream`, or a disabled one that prints nothing.

  On a terminal tqdm redraws it in place; otherwise (a log file) it is redrawn only every 10% of the images,
  so the log gets about ten updates rather than one per batch.
  """
  interactive = stream.isatty()
  return tqdm.tqdm(
    total=total,
    desc='predict',
    unit='images',
    file=stream,
    disable=not show,
    miniters=None if interactive else math.ceil(total / 10),
    mininterval=0.1 if interactive else 0.0,
  )


def run(
  predictor,
  paths,
  output=None,
  top_k: int = 5,
  workers: int = 1,
  stdout=sys.stdout,
  stderr=sys.stderr,
  resize_options: dict | None = None,
) -> tuple[int, int]:
  """Classifies the image files `paths`; JSON lines into `output` (a file object) or readable lines on
  `stdout`. Returns (classified, unreadable).

  `resize_options`: `inference.load_image`'s `resize` and `crop_pct`; default the config's data.resize and
  data.crop_pct.
  """
  top_k = min(top_k, len(predictor.labels))
  # A bar for more than one batch, unless the per-image lines go to the same terminal.
  show_progress = len(paths) > predictor.batch_size and (output is not None or not stdout.isatty())
  max_pixels = int(predictor.config.data.max_pixels)  # the resolved config has every field
  max_decode_bytes = int(predictor.config.data.max_decode_bytes)
  if resize_options is None:
    resize_options = transforms.eval_resize_options(predictor.config)  # data.resize, data.crop_pct
  classified = unreadable = 0
  with progress_bar(len(paths), stderr, show_progress) as progress:
    for batch in decoded_batches(
      paths, predictor.image_size, max_pixels, predictor.batch_size, workers, resize_options, max_decode_bytes
    ):
      readable = [(path, image) for path, image, _ in batch if image is not None]
      for path, _, error in batch:
        if error is not None:
          unreadable += 1
          progress.write(f'predict: skipping {path}: {error}', file=stderr)  # above the bar, not through it
      if readable:
        images = [image for _, image in readable]
        if resize_options['resize'] == 'none':
          canvas, sizes = inference.pad_to_canvas(images, predictor.canvas_multiple)
          logits = predictor.logits(canvas, pad_to=predictor.batch_size, sizes=sizes)
        else:
          logits = predictor.logits(np.stack(images), pad_to=predictor.batch_size)
        tops = inference.top_k_predictions(logits, predictor.labels, top_k)
        for (path, _), row, top in zip(readable, logits, tops):
          if output is not None:
            record = {'path': str(path), 'top_k': top, 'logits': [float(value) for value in row]}
            output.write(json.dumps(record) + '\n')
          else:
            ranked = ', '.join(f'{entry["label"]} {entry["prob"]:.4f}' for entry in top)
            print(f'{path}: {ranked}', file=stdout)
        classified += len(readable)
      progress.update(len(batch))
  return classified, unreadable


@one_line_errors
def main(argv):
  logging.set_verbosity(logging.WARNING)
  inputs = argv[1:]
  if _CHECKPOINT.value is None or not inputs:
    raise app.UsageError('usage: python -m atlas_jax.predict --checkpoint=WORKDIR IMAGE_OR_FOLDER...')
  if _TOP_K.value < 1 or (_BATCH_SIZE.value is not None and _BATCH_SIZE.value < 1):
    raise app.UsageError('--top_k and --batch_size must be at least 1')
  if _RESIZE.value is not None and _RESIZE.value not in inference.RESIZE_CHOICES:
    raise PredictError(f'--resize must be one of squash, crop or none, got {_RESIZE.value!r}')
  crop_pct = None if _CROP_PCT.value is None else parse_crop_pct(_CROP_PCT.value)
  if _SPATIAL.value < 1:
    raise PredictError(f'--spatial must be at least 1, got {_SPATIAL.value}')
  paths = image_paths(inputs)
  predictor = inference.load(
    _CHECKPOINT.value,
    _STEP.value,
    _DTYPE.value,
    _EMA.value,
    _CONFIG.value,
    _BATCH_SIZE.value,
    spatial=_SPATIAL.value,
  )
  resize_options = transforms.eval_resize_options(predictor.config)  # the defaults: data.resize, crop_pct
  resize_options['resize'] = predictor.resize_mode(_RESIZE.value)
  if crop_pct is not None:
    resize_options['crop_pct'] = crop_pct
  try:
    output = open(_OUTPUT.value, 'w') if _OUTPUT.value else None
  except OSError as error:
    raise PredictError(f'cannot write --output={_OUTPUT.value}: {error.strerror}') from None
  try:
    classified, unreadable = run(
      predictor, paths, output, _TOP_K.value, _WORKERS.value, resize_options=resize_options
    )
  finally:
    if output is not None:
      output.close()
  devices = predictor.mesh.devices
  split = f', each image split over {predictor.spatial}' if predictor.spatial > 1 else ''
  print(
    f'classified {classified} images with step {predictor.step} on {devices.size} '
    f'{devices.flat[0].platform} device(s){split}; {unreadable} unreadable skipped',
    file=sys.stderr,
  )
  sys.exit(0 if classified else 1)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)  # command-line mistakes: one line
