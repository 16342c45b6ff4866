r"""Classifies image files and folders with a trained or converted Atlas.

python -m atlas_jax.predict --checkpoint=WORKDIR [--config=configs/NAME.py] [--output=preds.jsonl] \
    [--step=N] [--top_k=5] [--batch_size=N] [--dtype=float32|bfloat16] [--ema] IMAGE_OR_FOLDER...

Folders are walked recursively for image files (sorted). Each image goes through the evaluation transform
(data/decode.py's decoding: EXIF orientation applied, which the reference does not do; bicubic resize to
the config's size; ImageNet mean/std), in batches split over all local devices, while worker threads decode
the next batch. Computes in float32 on CPU and in the config's dtype on accelerators unless `--dtype` says.
`--output` gets one JSON line per readable image: {"path", "top_k": [{"index", "label", "prob"}, ...],
"logits"}; without it each image gets a line on stdout. A progress bar goes to stderr when there is more
than one batch. Unreadable files are reported on stderr, counted at the end and skipped; the exit code is 0
when at least one image was classified, else 1. The same from Python: atlas_jax/inference.py.
"""

import concurrent.futures
import json
import os
import pathlib
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags
import numpy as np

from atlas_jax import inference, metrics
from atlas_jax.data.decode import BadImageError
# Re-exported: the evaluation transform of a file and the class names, as earlier releases had them here.
from atlas_jax.inference import class_names, load_image  # noqa: F401

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm'}


class PredictError(ValueError):
  """Inputs predict cannot work on: no image files found."""


def define_flags():
  """The command line's flags; defined only when run as a program, so the module imports anywhere."""
  global _CONFIG, _CHECKPOINT, _OUTPUT, _STEP, _TOP_K, _BATCH_SIZE, _DTYPE, _EMA, _WORKERS
  _CONFIG = config_flags.DEFINE_config_file('config', None, "Config file; default: the workdir's config.json.",
                                            lock_config=True)
  _CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Workdir holding checkpoints/ and config.json.')
  _OUTPUT = flags.DEFINE_string('output', None, 'Write JSON lines here (else a line per image on stdout).')
  _STEP = flags.DEFINE_integer('step', None, 'Checkpoint step; default: the best recorded, else the latest.')
  _TOP_K = flags.DEFINE_integer('top_k', 5, 'How many classes to report per image.')
  _BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Images per forward pass over all local devices, '
                                     'rounded up to a multiple of their count; default: 8 per device.')
  _DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16', 'float16'],
                             "Compute dtype; default: float32 on CPU, the config's dtype on accelerators.")
  _EMA = flags.DEFINE_bool('ema', False, 'Use the EMA weights of the checkpoint.')
  _WORKERS = flags.DEFINE_integer('workers', min(8, os.cpu_count() or 1), 'Threads decoding images.')


def image_paths(inputs) -> list[pathlib.Path]:
  """Files as given; folders walked (recursively, sorted) for files with an image suffix."""
  paths = []
  for entry in map(pathlib.Path, inputs):
    if entry.is_dir():
      paths.extend(sorted(p for p in entry.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
    else:
      paths.append(entry)
  if not paths:
    raise PredictError(f'no image files in {" ".join(map(str, inputs))} (suffixes: '
                       f'{", ".join(sorted(IMAGE_SUFFIXES))})')
  return paths


def _load(path, image_size, max_pixels):
  """(normalised image, None), or (None, why it is unreadable)."""
  try:
    return load_image(path, image_size, max_pixels), None
  except BadImageError as error:
    return None, error.reason


def decoded_batches(paths, image_size, max_pixels: int, batch_size: int, workers: int):
  """Yields per batch of `paths`: [(path, normalised image or None, error or None)], in order.

  The next batch is decoding in `workers` threads while the caller computes on the current one.
  """
  chunks = [paths[start:start + batch_size] for start in range(0, len(paths), batch_size)]
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:

    def submit(chunk):
      return [pool.submit(_load, path, image_size, max_pixels) for path in chunk]

    pending = submit(chunks[0]) if chunks else []
    for index, chunk in enumerate(chunks):
      current, pending = pending, submit(chunks[index + 1]) if index + 1 < len(chunks) else []
      yield [(path, *future.result()) for path, future in zip(chunk, current)]


class ProgressBar:
  """'predict [=====>    ] 120/1000 images  31.2 img/s  ETA 0:00:28' on a stream (stderr).

  On a terminal the line is redrawn in place; otherwise (a log file) a line is printed every 10%.
  """

  WIDTH = 30

  def __init__(self, total: int, stream=sys.stderr, clock=time.monotonic):
    self.total, self.stream, self.clock = total, stream, clock
    self.start = clock()
    self.interactive = stream.isatty()
    self._next_decile = 1

  def update(self, done: int) -> None:
    fraction = done / self.total
    if not self.interactive and fraction < self._next_decile / 10 and done < self.total:
      return
    self._next_decile = int(fraction * 10) + 1
    elapsed = self.clock() - self.start
    rate = done / elapsed if elapsed > 0 else float('nan')
    eta = (self.total - done) / rate if rate > 0 else float('nan')
    filled = int(fraction * self.WIDTH)
    bar = '=' * filled + ('>' if filled < self.WIDTH else '') + ' ' * (self.WIDTH - filled - 1)
    line = (f'predict [{bar}] {done}/{self.total} images  {rate:.1f} img/s  '
            f'ETA {metrics.format_duration(eta)}')
    if self.interactive:
      self.stream.write('\r' + line + ('\n' if done >= self.total else ''))
    else:
      self.stream.write(line + '\n')
    self.stream.flush()


def run(predictor, paths, output=None, top_k: int = 5, workers: int = 1, stdout=sys.stdout,
        stderr=sys.stderr) -> tuple[int, int]:
  """Classifies the image files `paths`; JSON lines into `output` (a file object) or readable lines on
  `stdout`. Returns (classified, unreadable)."""
  top_k = min(top_k, len(predictor.labels))
  # A bar for more than one batch, unless the per-image lines go to the same terminal.
  show_progress = len(paths) > predictor.batch_size and (output is not None or not stdout.isatty())
  progress = ProgressBar(len(paths), stderr) if show_progress else None
  max_pixels = int(predictor.config.data.get('max_pixels', inference.DEFAULT_MAX_PIXELS))
  classified = unreadable = done = 0
  for batch in decoded_batches(paths, predictor.image_size, max_pixels, predictor.batch_size, workers):
    readable = [(path, image) for path, image, _ in batch if image is not None]
    for path, _, error in batch:
      if error is not None:
        unreadable += 1
        print(f'predict: skipping {path}: {error}', file=stderr)
    if readable:
      logits = predictor.logits(np.stack([image for _, image in readable]), pad_to=predictor.batch_size)
      tops = inference.top_k_predictions(logits, predictor.labels, top_k)
      for (path, _), row, top in zip(readable, logits, tops):
        if output is not None:
          record = {'path': str(path), 'top_k': top, 'logits': [float(value) for value in row]}
          output.write(json.dumps(record) + '\n')
        else:
          ranked = ', '.join(f'{entry["label"]} {entry["prob"]:.4f}' for entry in top)
          print(f'{path}: {ranked}', file=stdout)
      classified += len(readable)
    done += len(batch)
    if progress:
      progress.update(done)
  return classified, unreadable


def main(argv):
  logging.set_verbosity(logging.WARNING)
  inputs = argv[1:]
  if _CHECKPOINT.value is None or not inputs:
    raise app.UsageError('usage: python -m atlas_jax.predict --checkpoint=WORKDIR IMAGE_OR_FOLDER...')
  if _TOP_K.value < 1 or (_BATCH_SIZE.value is not None and _BATCH_SIZE.value < 1):
    raise app.UsageError('--top_k and --batch_size must be at least 1')
  output = None
  try:
    paths = image_paths(inputs)
    predictor = inference.load(_CHECKPOINT.value, _STEP.value, _DTYPE.value, _EMA.value, _CONFIG.value,
                               _BATCH_SIZE.value)
    output = open(_OUTPUT.value, 'w') if _OUTPUT.value else None
    classified, unreadable = run(predictor, paths, output, _TOP_K.value, _WORKERS.value)
  except (ValueError, OSError) as error:  # CheckpointError, InferenceError, PredictError, missing files
    print(f'predict: {error}', file=sys.stderr)
    sys.exit(1)
  finally:
    if output is not None:
      output.close()
  devices = predictor.mesh.devices
  print(f'classified {classified} images with step {predictor.step} on {devices.size} '
        f'{devices.flat[0].platform} device(s); {unreadable} unreadable skipped', file=sys.stderr)
  sys.exit(0 if classified else 1)


if __name__ == '__main__':
  define_flags()
  app.run(main)
