"""Tests for the tfds source on a real dataset prepared in the test (tests/data/tiny_tfds.py): ArrayRecord and
TFRecord read without TensorFlow, labels by sorted class name equal to an image folder's, the class filter,
bad records, and one-line errors for data that is not where the config points."""

import functools
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from atlas_jax.data import pipeline, sources
from atlas_jax.data.decode import BadImageError
from atlas_jax.data.sources.tfds import masked_crc32c
from tests.data import tiny_tfds

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MAX_PIXELS = 1_000_000
tfds_dataset = functools.partial(sources.TfdsSource, max_pixels=MAX_PIXELS, max_decode_bytes=1 << 30)


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """{file format: data_dir} of the tiny dataset prepared both ways."""
  data_dirs = {}
  for file_format in ('array_record', 'tfrecord'):
    data_dirs[file_format] = tmp_path_factory.mktemp(file_format)
    tiny_tfds.prepare(data_dirs[file_format], file_format)
  return data_dirs


def decoded_examples(source) -> dict[str, tuple[int, int]]:
  """{file_name: (label, pixel value)} of every good example."""
  found = {}
  for index in range(len(source)):
    try:
      example = source[index]
    except BadImageError:
      continue
    found[source.encoded(index)['file_name']] = (int(example['label']), int(example['image'][0, 0, 0]))
  return found


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_every_record_reads_with_labels_of_sorted_class_names(prepared, file_format):
  for split, size in tiny_tfds.SPLIT_SIZES.items():
    source = tfds_dataset(tiny_tfds.NAME, prepared[file_format], split)
    assert len(source) == size and source.classes == sorted(tiny_tfds.CLASS_NAMES)
    found = decoded_examples(source)
    expected = {}
    for index, example in tiny_tfds.examples(split):
      if split == 'train' and index == tiny_tfds.BAD_TRAIN_RECORD:
        continue
      class_name = tiny_tfds.CLASS_NAMES[example['label']]
      expected[example['file_name']] = (
        sorted(tiny_tfds.CLASS_NAMES).index(class_name),
        tiny_tfds.example_value(split, index),
      )
    assert found == expected
    assert source[0]['image'].shape == tiny_tfds.IMAGE_SHAPE and source[0]['label'].dtype == np.int32


def test_the_same_class_gets_the_same_label_from_tfds_and_a_folder(prepared, tmp_path):
  for split, folder_split in (('train', 'train'), ('validation', 'val')):
    for index, example in tiny_tfds.examples(split):
      directory = tmp_path / folder_split / tiny_tfds.CLASS_NAMES[example['label']]
      directory.mkdir(parents=True, exist_ok=True)
      (directory / example['file_name']).write_bytes(example['image'])
  for split in ('train', 'validation'):
    folder = sources.ImageFolder(tmp_path, split, max_pixels=MAX_PIXELS, max_decode_bytes=1 << 30)
    tfds_source = tfds_dataset(tiny_tfds.NAME, prepared['array_record'], split)
    assert folder.classes == tfds_source.classes
    from_folder = {folder.path(i).name: int(folder.labels[i]) for i in range(len(folder))}
    from_tfds = {
      tfds_source.encoded(i)['file_name']: tfds_source.encoded(i)['label'] for i in range(len(tfds_source))
    }
    assert from_folder == from_tfds


def test_a_class_list_keeps_and_renumbers_classes(prepared, tmp_path):
  class_list = tmp_path / 'classes.txt'
  class_list.write_text('n03000134\nn01440764\n')
  source = tfds_dataset(tiny_tfds.NAME, prepared['tfrecord'], 'validation', classes_file=class_list)
  assert source.classes == ['n01440764', 'n03000134'] and len(source) == 4  # 2 of 3 classes of 6
  names = [tiny_tfds.CLASS_NAMES[example['label']] for _, example in tiny_tfds.examples('validation')]
  for index in range(len(source)):
    encoded = source.encoded(index)
    class_name = source.classes[encoded['label']]
    assert names[int(encoded['file_name'].split('_')[-1].split('.')[0])] == class_name
  assert source.scanned_labels.tolist() == [source.encoded(i)['label'] for i in range(len(source))]
  class_list.write_text('n01440764\nn04444444\n')
  with pytest.raises(sources.DataSourceError, match='no class n04444444'):
    tfds_dataset(tiny_tfds.NAME, prepared['array_record'], 'train', classes_file=class_list)


def test_a_bad_record_is_named_and_replaced_by_the_loader(prepared):
  source = tfds_dataset(tiny_tfds.NAME, prepared['array_record'], 'train')
  bad_name = f'_train_{tiny_tfds.BAD_TRAIN_RECORD}.png'
  bad = [i for i in range(len(source)) if source.encoded(i)['file_name'].endswith(bad_name)]
  named = rf'^tfds {tiny_tfds.NAME}/1.0.0 train\[{bad[0]}\]: cannot decode: .*(?i:truncated)'
  with pytest.raises(BadImageError, match=named):
    source[bad[0]]

  def crop(example, rng):
    del rng
    return {'image': np.ascontiguousarray(example['image'][:16, :16]), 'label': example['label']}

  with pipeline.TrainLoader(source, 3, seed=0, transform=crop, max_bad_fraction=0.2) as loader:
    for _ in range(3):
      assert next(loader)['image'].shape == (3, 16, 16, 3)
    assert loader.bad_examples.bad_indices == set(bad)


def test_data_that_is_not_there_gets_one_line(prepared, tmp_path):
  cases = [
    ((tiny_tfds.NAME, tmp_path / 'nowhere', 'train'), 'is not a directory'),
    (('imagenet2012', prepared['array_record'], 'train'), 'no prepared tfds dataset imagenet2012'),
    ((tiny_tfds.NAME + ':9.9.9', prepared['array_record'], 'train'), 'no prepared tfds dataset'),
  ]
  for args, match in cases:
    with pytest.raises(sources.DataSourceError, match=match) as caught:
      tfds_dataset(*args)
    assert '\n' not in str(caught.value)
  shard = next((prepared['tfrecord'] / tiny_tfds.NAME / '1.0.0').glob('*-train.tfrecord-*'))
  cut = tmp_path / 'cut'
  shutil.copytree(shard.parent, cut / tiny_tfds.NAME / '1.0.0')
  (cut / tiny_tfds.NAME / '1.0.0' / shard.name).write_bytes(shard.read_bytes()[:-7])  # ends mid-record
  with pytest.raises(sources.DataSourceError, match='cut short; prepare the dataset again'):
    tfds_dataset(tiny_tfds.NAME, cut, 'train')


def crc32c_bit_by_bit(data: bytes) -> int:
  """CRC-32C from its definition: reflected polynomial 0x82F63B78, initial value and final XOR all ones."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
  return crc ^ 0xFFFFFFFF


def masked(crc: int) -> int:
  """TFRecord's mask: rotated right by 15 bits, plus 0xA282EAD8, modulo 2^32."""
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_masked_crc32c_matches_the_definition():
  assert crc32c_bit_by_bit(b'123456789') == 0xE3069283  # CRC-32C's published check value
  assert masked_crc32c(b'123456789') == masked(0xE3069283)
  rng = np.random.default_rng(0)
  for size in (0, 1, 8, 12, 1000, 4099):
    chunk = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    assert masked_crc32c(chunk) == masked(crc32c_bit_by_bit(chunk)), size


def test_both_formats_load_where_tensorflow_cannot_be_imported(prepared):
  # The path finder, minus tensorflow: as where TensorFlow is not installed, even where it is. (Making the
  # import fail otherwise misleads tfds: it takes a 'tensorflow' key in sys.modules, or a spec found, for
  # TensorFlow present.)
  code = f"""
import importlib.machinery, json, sys
class PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.partition('.')[0] == 'tensorflow':
      return None
    return importlib.machinery.PathFinder.find_spec(name, path, target)
sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = PathFinderWithoutTensorFlow
from atlas_jax.data import pipeline, sources
counts = {{}}
for file_format, data_dir in {json.dumps({k: str(v) for k, v in prepared.items()})}.items():
  data = type('Data', (), {{'source': 'tfds', 'name': '{tiny_tfds.NAME}', 'data_dir': data_dir,
                           'classes': None, 'max_pixels': 1000000, 'max_decode_bytes': 1 << 30}})()
  source = sources.make_source(data, 32, 'validation', 0, num_classes=3)
  labels = [int(batch['label'][i]) for batch in pipeline.eval_batches(source, 4, max_bad_fraction=0.01)
            for i in range(4) if batch['mask'][i]]
  counts[file_format] = sorted(labels)
try:
  import tensorflow
  counts['tensorflow'] = 'imported'
except ImportError:
  counts['tensorflow'] = 'unimportable'
counts['tensorflow_loaded'] = 'tensorflow' in sys.modules
print(json.dumps(counts))
"""
  python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')]))
  env = {**os.environ, 'PYTHONPATH': python_path}
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  counts = json.loads(result.stdout.strip().splitlines()[-1])
  assert counts['tensorflow'] == 'unimportable' and not counts['tensorflow_loaded']
  assert counts['array_record'] == counts['tfrecord'] == [0, 0, 1, 1, 2, 2]


def shard_of(data_dir, split: str = 'train') -> pathlib.Path:
  return next((pathlib.Path(data_dir) / tiny_tfds.NAME / '1.0.0').glob(f'*-{split}.*-00000-of-00001'))


def copy_of(prepared, file_format: str, tmp_path) -> pathlib.Path:
  copy = tmp_path / file_format
  shutil.copytree(prepared[file_format], copy)
  return copy


def corrupt_first_record(data_dir, file_format: str) -> None:
  """Flips a byte inside the image of record 0 of the train split: the record is stored whole, its bytes
  bad (ArrayRecord's chunk hash and TFRecord's data CRC no longer match)."""
  shard = shard_of(data_dir)
  data = bytearray(shard.read_bytes())
  at = data.index(b'\x89PNG') + 20  # inside record 0's image (its first chunk, its first TFRecord)
  data[at] ^= 0xFF
  shard.write_bytes(bytes(data))


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_a_corrupt_record_is_a_bad_example_the_loader_replaces(prepared, tmp_path, file_format):
  data_dir = copy_of(prepared, file_format, tmp_path)
  corrupt_first_record(data_dir, file_format)
  source = tfds_dataset(tiny_tfds.NAME, data_dir, 'train')
  assert len(source) == tiny_tfds.SPLIT_SIZES['train']
  with pytest.raises(BadImageError, match=r'^tfds tiny_classes/1.0.0 train\[0\]: corrupt record') as caught:
    source[0]
  assert '\n' not in str(caught.value)
  truncated_jpeg = next(
    i
    for i in range(1, len(source))
    if source.encoded(i)['file_name'].endswith(f'_{tiny_tfds.BAD_TRAIN_RECORD}.png')
  )

  def crop(example, rng):
    del rng
    return {'image': np.ascontiguousarray(example['image'][:16, :16]), 'label': example['label']}

  with pipeline.TrainLoader(source, 3, seed=0, transform=crop, max_bad_fraction=0.5) as loader:
    for _ in range(3):
      assert next(loader)['image'].shape == (3, 16, 16, 3)
    assert loader.bad_examples.bad_indices == {0, truncated_jpeg}
  # With a class filter the scan cannot read record 0's class: it is left out, and said.
  class_list = tmp_path / 'classes.txt'
  class_list.write_text('\n'.join(tiny_tfds.CLASS_NAMES))
  filtered = tfds_dataset(tiny_tfds.NAME, data_dir, 'train', classes_file=class_list)
  assert filtered.unreadable_records == [0] and len(filtered) == len(source) - 1


def one_line(error_type, function, *args, **kwargs) -> str:
  with pytest.raises(error_type) as caught:
    function(*args, **kwargs)
  message = str(caught.value)
  assert '\n' not in message, message
  return message


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_a_missing_truncated_or_unreadable_shard_is_one_line_naming_it(prepared, tmp_path, file_format):
  data_dir = copy_of(prepared, file_format, tmp_path)
  shard = shard_of(data_dir)
  original = shard.read_bytes()
  shard.unlink()
  message = one_line(sources.DataSourceError, tfds_dataset, tiny_tfds.NAME, data_dir, 'train')
  assert message.startswith(f'{shard} is missing') and 'prepare the dataset again' in message
  shard.mkdir()  # open() fails: unreadable (permissions cannot make it so for root)
  message = one_line(sources.DataSourceError, tfds_dataset, tiny_tfds.NAME, data_dir, 'train')
  assert message.startswith(f'cannot read {shard}')
  shard.rmdir()
  for cut in (len(original) // 2, len(original) - 100):
    shard.write_bytes(original[:cut])
    message = one_line(sources.DataSourceError, tfds_dataset, tiny_tfds.NAME, data_dir, 'train')
    assert str(shard) in message and 'prepare the dataset again' in message
  if file_format == 'tfrecord':  # cut at a record boundary: fewer records than dataset_info.json lists
    (first_length,) = struct.unpack('<Q', original[:8])
    shard.write_bytes(original[: 12 + first_length + 4])
    message = one_line(sources.DataSourceError, tfds_dataset, tiny_tfds.NAME, data_dir, 'train')
    assert 'holds 1 record but dataset_info.json lists 9' in message
  assert tfds_dataset(tiny_tfds.NAME, data_dir, 'validation')  # the other split still reads


@pytest.mark.parametrize(
  'edit, match',
  [
    (lambda text: text[: len(text) // 2], 'is not valid JSON'),
    (lambda text: '[1, 2]', 'holds a JSON list'),
    (
      lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != 'splits'}),
      'lacks the field splits',
    ),
    (lambda text: json.dumps({**json.loads(text), 'version': ''}), 'lacks the field version'),
    (lambda text: json.dumps({**json.loads(text), 'splits': 'train'}), 'not a list of named splits'),
    (lambda text: json.dumps({**json.loads(text), 'version': '1.x'}), 'tfds cannot read the dataset'),
  ],
)
def test_a_bad_dataset_info_json_is_one_line_naming_it(prepared, tmp_path, edit, match):
  data_dir = copy_of(prepared, 'array_record', tmp_path)
  info = data_dir / tiny_tfds.NAME / '1.0.0' / 'dataset_info.json'
  info.write_text(edit(info.read_text()))
  message = one_line(sources.DataSourceError, tfds_dataset, tiny_tfds.NAME, data_dir, 'train')
  assert match in message and str(info.parent) in message, message
