"""Speed of the host's train input: `python -m atlas_jax.tools.input_benchmark --config=configs/NAME.py`.

Flags: `[--images=DIR] [--workers=N] [--batches=N] [--batch_size=N] [--device] [--config.F=V ...]`.

Runs the real loader (pipeline.TrainLoader: decode, the config's train transform at its image size, ImageNet
normalisation, batches) over a folder of images and prints one JSON line: images/s in total and per worker,
and the CPU time per image of the whole process (all its threads: what sizes a machine when other work
shares the cores).
The images are `--images` (every image file under DIR; through the project's `folder` source when it reads
DIR, else decoded here with PIL, EXIF orientation applied), or, without it, `--num_images` photo-like JPEGs
of ImageNet's sizes (about 500 x 375) generated into a temporary folder. The transform is the one training
uses on real data whatever `data.source` says (the synthetic task has none), so `data.augment.host_max_side`
decides how much of the upsampling the host does (docs/data.md). `--device` also times the part of the
transform that runs in the train step (`augment.train_finish`: resize and random erasing) on the
default JAX backend, per image.
"""

import json
import pathlib
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from atlas_jax.errors import AtlasError, one_line_errors

FLAGS = flags.FLAGS

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
# (width, height) of generated images, the common shapes of ImageNet photos, picked with these weights.
IMAGENET_LIKE_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (400, 300), (500, 500))
IMAGENET_LIKE_WEIGHTS = (0.45, 0.15, 0.15, 0.05, 0.1, 0.05, 0.05)
GENERATED_CLASSES = 4


def define_flags():
  config_flags.DEFINE_config_file('config', None, 'A config file under configs/.', lock_config=True)
  flags.DEFINE_string(
    'images',
    None,
    'A folder of images (searched recursively). Default: generate '
    '--num_images ImageNet-sized JPEGs into a temporary folder.',
  )
  flags.DEFINE_integer('num_images', 256, 'How many JPEGs to generate when --images is not given.')
  flags.DEFINE_integer('workers', None, "Loader workers (default: the config's data.workers).")
  flags.DEFINE_integer('batches', 10, 'Timed batches.')
  flags.DEFINE_integer('warmup_batches', 1, 'Untimed batches first (thread start, first decodes).')
  flags.DEFINE_integer('batch_size', 16, 'Images per batch.')
  flags.DEFINE_bool(
    'device', False, "Also time the train step's part of the transform on the default backend."
  )
  flags.mark_flags_as_required(['config'])


class BenchmarkError(AtlasError, ValueError):
  """The benchmark cannot run as asked: no images, too few for a batch, a bad flag."""


def generate_images(directory: pathlib.Path, count: int, seed: int = 0) -> list[pathlib.Path]:
  """`count` photo-like JPEGs (smooth colour fields, shapes, sensor noise) of ImageNet's usual sizes, in
  `directory/train/class_<k>/` (an image folder), deterministic from `seed`."""
  rng = np.random.default_rng(seed)
  paths = []
  for index in range(count):
    width, height = IMAGENET_LIKE_SIZES[rng.choice(len(IMAGENET_LIKE_SIZES), p=IMAGENET_LIKE_WEIGHTS)]
    # Low-frequency colour: a coarse random grid upsampled bicubic, the large regions of a photo.
    coarse = rng.integers(0, 256, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 12))):  # objects with edges
      left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
      box = (left, top, left + int(rng.integers(10, width // 2)), top + int(rng.integers(10, height // 2)))
      colour = tuple(int(value) for value in rng.integers(0, 256, 3))
      (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    noisy = np.asarray(image, np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    path = directory / 'train' / f'class_{index % GENERATED_CLASSES}' / f'{index:05d}.jpg'
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)
    paths.append(path)
  return paths


class ImageFiles:
  """A source over image files: `source[i] -> {'image': uint8 (h, w, 3) RGB, EXIF-rotated, 'label': 0}`."""

  def __init__(self, paths):
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    with Image.open(self.paths[index]) as image:
      image = ImageOps.exif_transpose(image).convert('RGB')
      return {'image': np.asarray(image), 'label': np.int32(0)}


def image_source(config, directory: pathlib.Path):
  """(source, its name): the project's `folder` source over `directory` when it reads it, else ImageFiles."""
  from atlas_jax.data import sources

  if (directory / 'train').is_dir():
    folder_data = config.data.copy_and_resolve_references()
    with folder_data.unlocked():
      folder_data.source, folder_data.data_dir = 'folder', str(directory)
    try:
      return sources.make_source(folder_data, config.image_size, 'train', config.seed), 'folder'
    except sources.DataSourceError:
      pass  # a folder source that cannot read it (or none yet): decode the files here
  paths = sorted(path for path in directory.rglob('*') if path.suffix.lower() in IMAGE_SUFFIXES)
  if not paths:
    raise BenchmarkError(
      f'no image files ({", ".join(IMAGE_SUFFIXES)}) under {directory}: point --images at '
      'a folder of images, or leave it out to generate some'
    )
  return ImageFiles(paths), 'files'


def time_loader(config, source, workers: int, batch_size: int, batches: int, warmup_batches: int) -> dict:
  """Images/s of TrainLoader over `source` with the train transform of a resolved real-data `config`."""
  from atlas_jax.data import pipeline, transforms

  transform = transforms.train_transform(config)
  if len(source) < batch_size:
    raise BenchmarkError(
      f'{len(source)} images are fewer than one batch of {batch_size}: lower --batch_size or give more images'
    )
  with pipeline.TrainLoader(
    source,
    batch_size,
    seed=config.seed,
    workers=workers,
    transform=transform,
    max_bad_fraction=config.data.max_bad_fraction,
  ) as loader:
    for _ in range(warmup_batches):
      next(loader)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
      batch = next(loader)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
  images = batches * batch_size
  return {
    'host_image_size': list(batch['image'].shape[1:3]),
    'seconds': round(seconds, 3),
    'images_per_s': round(images / seconds, 2),
    'images_per_s_per_worker': round(images / seconds / max(1, workers), 2),
    'cpu_ms_per_image': round(1000 * cpu_seconds / images, 2),
  }


def time_device_finish(config, batch_size: int, host_size, repeats: int = 3) -> dict:
  """Milliseconds per image of augment.train_finish on the default backend, after compiling."""
  import jax

  from atlas_jax import augment

  finish = jax.jit(augment.train_finish(config))
  images = jax.device_put(np.random.default_rng(0).standard_normal((batch_size, *host_size, 3), np.float32))
  key = jax.random.key(0)
  finish(key, images).block_until_ready()
  start = time.perf_counter()
  for repeat in range(repeats):
    finish(jax.random.fold_in(key, repeat), images).block_until_ready()
  seconds = (time.perf_counter() - start) / repeats
  return {
    'device_finish_ms_per_image': round(1000 * seconds / batch_size, 3),
    'device': str(jax.devices()[0].device_kind),
  }


@one_line_errors
def main(argv):
  from atlas_jax import config as config_lib

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = FLAGS.config.copy_and_resolve_references()
  with config.unlocked():
    config.data.source = 'folder'  # whatever the config reads, the benchmark times the real-data transform
  config = config_lib.resolve(config, model=False)  # no model is built: any image size is timed
  workers = config.data.workers if FLAGS.workers is None else FLAGS.workers
  if workers < 0 or FLAGS.batches < 1 or FLAGS.batch_size < 1 or FLAGS.warmup_batches < 0:
    raise app.UsageError('need --workers >= 0, --batches >= 1, --batch_size >= 1 and --warmup_batches >= 0')
  with tempfile.TemporaryDirectory(prefix='atlas_input_benchmark_') as scratch:
    if FLAGS.images is None:
      directory = pathlib.Path(scratch)
      generate_images(directory, FLAGS.num_images)
    else:
      directory = pathlib.Path(FLAGS.images).expanduser()
      if not directory.is_dir():
        raise BenchmarkError(
          f'--images={FLAGS.images} is not a folder: give a folder of images, or '
          'leave it out to generate some'
        )
    source, source_name = image_source(config, directory)
    result = {
      'config': config_flags.get_config_filename(FLAGS['config']),
      'image_size': list(config.image_size),
      'host_max_side': config.data.augment.host_max_side,
      'source': source_name,
      'source_images': len(source),
      'workers': workers,
      'batch_size': FLAGS.batch_size,
      'batches': FLAGS.batches,
    }
    result.update(time_loader(config, source, workers, FLAGS.batch_size, FLAGS.batches, FLAGS.warmup_batches))
  if FLAGS.device:
    result.update(time_device_finish(config, FLAGS.batch_size, result['host_image_size']))
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
