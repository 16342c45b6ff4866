"""Tests for tools/prepare_hr_in100, through its command line: a fake mini ImageNet folder and a tiny tfds
dataset become image folders the folder source reads; missing classes get one line; a rerun after an
interruption completes the output without rewriting what is in place."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from atlas_jax.data import sources
from tests.data import image_files, tiny_tfds

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
HR_IN100 = sources.read_class_list(sources.HR_IN100_CLASSES)
PICKED = HR_IN100[:3]  # three HR-IN100 classes in the fake ImageNet
COUNTS = {'train': 3, 'val': 2}
MAX_PIXELS = 10_000_000


def run_prepare(*args):
  python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')]))
  env = {**os.environ, 'PYTHONPATH': python_path}
  return subprocess.run(
    [sys.executable, '-m', 'atlas_jax.tools.prepare_hr_in100', *map(str, args)],
    capture_output=True,
    text=True,
    env=env,
    timeout=120,
  )


@pytest.fixture
def imagenet(tmp_path):
  """train/<wnid>/ and val/<wnid>/ JPEGs of three HR-IN100 classes and one other class."""
  root = tmp_path / 'imagenet'
  for split, count in COUNTS.items():
    for class_index, name in enumerate([*PICKED, 'n00000001']):
      directory = root / split / name
      directory.mkdir(parents=True)
      for file_index in range(count):
        value = 40 * class_index + 10 * file_index + (5 if split == 'val' else 0)
        Image.fromarray(np.full((24, 32, 3), value, np.uint8)).save(directory / f'{name}_{file_index}.JPEG')
  # ImageNet holds a PNG named .JPEG: copied as it is, the loader decodes it by content.
  (root / 'train' / PICKED[0] / f'{PICKED[0]}_png.JPEG').write_bytes(
    image_files.encode(np.full((8, 8, 3), 9, np.uint8), 'PNG')
  )
  return root


def test_missing_classes_get_one_line_and_nothing_is_written(imagenet, tmp_path):
  result = run_prepare(f'--source={imagenet}', f'--output={tmp_path / "out"}')
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'lacks' in lines[0] and '(97 in all)' in lines[0]
  assert not (tmp_path / 'out').exists()


def test_a_folder_source_becomes_a_readable_folder_and_a_rerun_completes_it(imagenet, tmp_path):
  class_list = tmp_path / 'classes.txt'
  class_list.write_text('\n'.join(PICKED) + '\n')
  output = tmp_path / 'hr'
  result = run_prepare(f'--source={imagenet}', f'--output={output}', f'--classes={class_list}')
  assert result.returncode == 0, result.stderr
  assert '--config.data.source=folder' in result.stdout
  summary = json.loads((output / 'hr_in100.json').read_text())
  assert summary['counts'] == {'train': 3 * COUNTS['train'] + 1, 'val': 3 * COUNTS['val']}
  assert summary['written'] == 3 * (COUNTS['train'] + COUNTS['val']) + 1 and summary['kept'] == 0
  assert not (output / 'train' / 'n00000001').exists()
  linked = output / 'train' / PICKED[1] / f'{PICKED[1]}_0.JPEG'
  assert linked.stat().st_ino == (imagenet / 'train' / PICKED[1] / linked.name).stat().st_ino  # hard link

  for split, folder_split in (('train', 'train'), ('validation', 'val')):
    source = sources.ImageFolder(output, split, max_pixels=MAX_PIXELS, max_decode_bytes=1 << 30)
    assert source.classes == sorted(PICKED) and len(source) == summary['counts'][folder_split]
    for index in range(len(source)):
      assert source.classes[source.labels[index]] == source.path(index).parent.name
      assert source[index]['image'].dtype == np.uint8

  # An interrupted run: a file missing, one cut short, a temporary file left behind.
  (output / 'val' / PICKED[2] / f'{PICKED[2]}_1.JPEG').unlink()
  cut = output / 'train' / PICKED[0] / f'{PICKED[0]}_2.JPEG'
  cut.unlink()
  cut.write_bytes(b'\xff\xd8partial')
  leftover = output / 'train' / PICKED[0] / f'.{PICKED[0]}_2.JPEG.tmp-999'
  leftover.write_bytes(b'partial')
  result = run_prepare(f'--source={imagenet}', f'--output={output}', f'--classes={class_list}', '--copy')
  assert result.returncode == 0, result.stderr
  summary = json.loads((output / 'hr_in100.json').read_text())
  assert summary['written'] == 2 and summary['leftovers_removed'] == 1
  assert summary['kept'] == 3 * (COUNTS['train'] + COUNTS['val']) + 1 - 2
  assert cut.read_bytes() == (imagenet / 'train' / PICKED[0] / cut.name).read_bytes()
  assert not leftover.exists()
  assert cut.stat().st_ino != (imagenet / 'train' / PICKED[0] / cut.name).stat().st_ino  # --copy


def test_a_tfds_source_becomes_a_folder_of_the_stored_bytes(tmp_path):
  tiny_tfds.prepare(tmp_path / 'tfds')
  class_list = tmp_path / 'classes.txt'
  class_list.write_text('n01440764\nn02102040\n')
  output = tmp_path / 'hr'
  result = run_prepare(
    f'--source={tmp_path / "tfds"}',
    f'--output={output}',
    f'--classes={class_list}',
    f'--tfds_name={tiny_tfds.NAME}',
  )
  assert result.returncode == 0, result.stderr
  expected = {}
  for split, folder_split in (('train', 'train'), ('validation', 'val')):
    for index, example in tiny_tfds.examples(split):
      class_name = tiny_tfds.CLASS_NAMES[example['label']]
      if class_name in ('n01440764', 'n02102040'):
        expected[f'{folder_split}/{class_name}/{example["file_name"]}'] = example['image']
  written = {str(path.relative_to(output)): path.read_bytes() for path in output.glob('*/*/*')}
  # The truncated record is copied too: the loader, not the copy, decides what is bad.
  assert written == expected
  source = sources.ImageFolder(output, 'validation', max_pixels=MAX_PIXELS, max_decode_bytes=1 << 30)
  assert source.classes == ['n01440764', 'n02102040'] and len(source) == 4
