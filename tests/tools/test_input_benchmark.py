"""The input benchmark through its command line: generated ImageNet-sized JPEGs or a given folder, the train
transform at the config's size, one JSON line of images/s; and its one-line errors."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

from atlas_jax.tools import input_benchmark

ROOT = pathlib.Path(__file__).parents[2]


def run_benchmark(*flags):
  command = [
    sys.executable,
    '-m',
    'atlas_jax.tools.input_benchmark',
    '--config=configs/quickstart.py',
    '--batch_size=8',
    '--batches=2',
    *flags,
  ]
  return subprocess.run(
    command,
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, 'PYTHONPATH': str(ROOT)},
  )


def test_generated_images_are_imagenet_sized_jpegs(tmp_path):
  paths = input_benchmark.generate_images(tmp_path, 6, seed=1)
  assert len(paths) == 6 and all(path.suffix == '.jpg' for path in paths)
  for path in paths:
    with Image.open(path) as image:
      assert image.format == 'JPEG' and image.mode == 'RGB'
      assert image.size in input_benchmark.IMAGENET_LIKE_SIZES
      pixels = np.asarray(image, np.float32)
    assert pixels.std() > 10  # not a flat image
  again = input_benchmark.generate_images(tmp_path / 'again', 6, seed=1)
  assert [path.read_bytes() for path in again] == [path.read_bytes() for path in paths]


def test_command_line_times_the_train_pipeline_on_generated_jpegs():
  result = run_benchmark('--config.image_size=64', '--num_images=24', '--workers=2')
  assert result.returncode == 0, result.stderr[-3000:]
  line = json.loads(result.stdout.strip().splitlines()[-1])
  assert line['config'] == 'configs/quickstart.py' and line['image_size'] == [64, 64]
  assert line['source_images'] == 24 and line['workers'] == 2 and line['batches'] == 2
  # The generated images are about 500 x 375: the batches have the config's size, so they went through the
  # train transform (the quickstart's synthetic source, which has none, is not what is timed).
  assert line['host_image_size'] == [64, 64]
  assert line['images_per_s'] > 0
  assert abs(line['images_per_s_per_worker'] - line['images_per_s'] / 2) < 0.02


def test_command_line_reads_a_given_folder_and_upsamples_on_the_accelerator_above_host_max_side(tmp_path):
  rng = np.random.default_rng(0)
  for index, (height, width) in enumerate([(30, 40), (50, 20), (64, 64), (25, 90)] * 3):
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    image.save(tmp_path / f'{index}.{"png" if index % 2 else "jpg"}')
  result = run_benchmark(
    f'--images={tmp_path}', '--config.image_size=96', '--config.data.augment.host_max_side=32', '--workers=1'
  )
  assert result.returncode == 0, result.stderr[-3000:]
  line = json.loads(result.stdout.strip().splitlines()[-1])
  assert line['source'] == 'files' and line['source_images'] == 12
  assert line['image_size'] == [96, 96] and line['host_max_side'] == 32
  assert line['host_image_size'] == [32, 32]
  assert line['images_per_s'] == line['images_per_s_per_worker'] > 0


def test_a_folder_without_images_gets_one_line(tmp_path):
  (tmp_path / 'notes.txt').write_text('no images here')
  result = run_benchmark(f'--images={tmp_path}')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('error: no image files')
  result = run_benchmark(f'--images={tmp_path / "missing"}')
  assert result.returncode == 1 and 'is not a folder' in result.stderr.strip().splitlines()[-1]
