"""A split of a prepared tensorflow-datasets dataset (`tfds build` or a builder's download_and_prepare).

`TfdsSource` reads ArrayRecord through tfds's random-access data source and TFRecord through its own index of
the record offsets (`_TFRecordShards`); neither imports TensorFlow. Images are decoded here from their stored
bytes, as folders' files are, and classes are numbered in sorted order of their names, as a folder's are.
"""

import functools
import os
import pathlib
import struct
from typing import Any, Sequence

import google_crc32c
import numpy as np

from atlas_jax.data import decode
from atlas_jax.data.sources.common import (
  SPLITS,
  DataSourceError,
  abbreviated,
  labelled_example,
  read_class_list,
)

# TFRecord's CRC mask: a CRC of data that holds CRCs is weak, so the stored value is rotated and offset.
_CRC_MASK_OFFSET = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC-32C of `data`: the CRC (google-crc32c, in C) rotated right by 15 bits, plus an
  offset, modulo 2^32."""
  crc = google_crc32c.value(data)
  return (((crc >> 15) | (crc << 17)) + _CRC_MASK_OFFSET) & 0xFFFFFFFF


class _TFRecordShards:
  """Random access to the records of TFRecord files through an index of their offsets, without TensorFlow.

  TFRecord framing: uint64 length, masked CRC-32C of the length, data, masked CRC-32C of the data. Building
  the index reads 12 bytes per record (and checks the length's CRC, so a file that is not TFRecord or was
  cut short is refused here); a read is one pread of the record's data. The data's own CRC is not checked:
  the image decoder refuses corrupt images.
  """

  def __init__(self, paths: Sequence[str]):
    self.paths = [os.fspath(path) for path in paths]
    offsets, lengths, files = [], [], []
    for file_number, path in enumerate(self.paths):
      size = os.path.getsize(path)
      with open(path, 'rb') as stream:
        position = 0
        while position < size:
          header = stream.read(12)
          if len(header) < 12:
            raise DataSourceError(
              f'{path} ends inside a record header at byte {position}: the file is cut '
              'short; prepare the dataset again'
            )
          length, length_crc = struct.unpack('<QI', header)
          if masked_crc32c(header[:8]) != length_crc:
            raise DataSourceError(
              f'{path} has a bad record header at byte {position}: not a TFRecord file '
              'or corrupt; prepare the dataset again'
            )
          offsets.append(position + 12)
          lengths.append(length)
          files.append(file_number)
          position += 12 + length + 4
          stream.seek(position)
      if position != size:
        raise DataSourceError(
          f'{path} ends inside its last record: the file is cut short; prepare the dataset again'
        )
    self._offsets = np.asarray(offsets, np.int64)
    self._lengths = np.asarray(lengths, np.int64)
    self._files = np.asarray(files, np.int32)

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, index: int) -> bytes:
    descriptor = os.open(self.paths[self._files[index]], os.O_RDONLY)
    try:
      return os.pread(descriptor, int(self._lengths[index]), int(self._offsets[index]))
    finally:
      os.close(descriptor)


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise DataSourceError(
      f"data.source='tfds' needs tensorflow-datasets and array-record ({error}): "
      'pip install -r requirements.txt'
    ) from error
  return tfds


def _prepared_dir(data_dir: pathlib.Path, name: str) -> pathlib.Path:
  """`data_dir/<name>[/<config>]/<version>`: the version given as `name:1.2.3`, else the newest prepared."""
  name, _, version = name.partition(':')
  dataset_dir = data_dir / name
  how = (
    f'prepare it there first (tfds build {name} --data_dir={data_dir} --file_format=array_record), or '
    'fix --config.data.name / --config.data.data_dir'
  )
  if version:
    candidates = [dataset_dir / version]
  elif dataset_dir.is_dir():
    candidates = [path for path in dataset_dir.iterdir() if path.is_dir() and _is_version(path.name)]
    candidates.sort(key=lambda path: tuple(int(part) for part in path.name.split('.')), reverse=True)
  else:
    candidates = []
  for candidate in candidates:
    if (candidate / 'dataset_info.json').is_file():
      return candidate
  raise DataSourceError(
    f'no prepared tfds dataset {name}{":" + version if version else ""} in '
    f'{data_dir} (looked for {dataset_dir}/<version>/dataset_info.json): {how}'
  )


def _is_version(text: str) -> bool:
  parts = text.split('.')
  return len(parts) == 3 and all(part.isdigit() for part in parts)


class TfdsSource:
  """A split of a prepared tensorflow-datasets dataset, by index, images decoded by decode.decode_image.

  ArrayRecord data is read through tfds's random-access data source, TFRecord data through an index of the
  record offsets (_TFRecordShards) and tfds's NumPy example parser: neither imports TensorFlow. Images are
  read as their stored bytes (tfds keeps the original JPEG) and decoded here, so EXIF orientation,
  max_pixels and bad-image handling are the same as for folders.

  Labels: the class names of the label feature (`ClassLabel.names`, WordNet IDs for imagenet2012), sorted,
  or those of data.classes (each must be a class of the dataset); examples of other classes are left out,
  which needs every record's label once: the construction reads the whole split (a folder made by
  tools/prepare_hr_in100 needs no such pass).
  """

  SPLIT_NAMES = {'train': ('train',), 'validation': ('validation', 'val', 'test')}

  def __init__(
    self,
    name: str,
    data_dir,
    split: str,
    classes_file=None,
    *,
    max_pixels: int,
    max_decode_bytes: int,
    image_key: str = 'image',
    label_key: str = 'label',
  ):
    if split not in self.SPLIT_NAMES:
      raise DataSourceError(f'split must be one of {SPLITS}, got {split!r}')
    data_dir = pathlib.Path(data_dir).expanduser()
    if not data_dir.is_dir():
      raise DataSourceError(
        f'data.data_dir={str(data_dir)!r} is not a directory: set --config.data.data_dir '
        'to the tensorflow_datasets folder the dataset was prepared in'
      )
    prepared = _prepared_dir(data_dir, name)
    tfds = _import_tfds()
    builder = tfds.builder_from_directory(os.fspath(prepared))
    info = builder.info
    self.name = f'{info.name}/{prepared.name}'
    self.max_pixels = int(max_pixels)
    self.max_decode_bytes = int(max_decode_bytes)
    self.image_key = image_key
    split_name = next((candidate for candidate in self.SPLIT_NAMES[split] if candidate in info.splits), None)
    if split_name is None:
      raise DataSourceError(
        f'tfds dataset {self.name} has no {split!r} split (its splits: '
        f'{", ".join(info.splits)}): prepare one or use another dataset'
      )
    self.split = split_name
    features = info.features
    if image_key not in features or label_key not in features:
      raise DataSourceError(
        f'tfds dataset {self.name} lacks the features {image_key!r} and {label_key!r} '
        f'(it has {", ".join(features)}): an image classification dataset is needed'
      )
    dataset_names = list(getattr(features[label_key], 'names', None) or [])
    if not dataset_names:
      raise DataSourceError(
        f'the {label_key!r} feature of tfds dataset {self.name} has no class names (not '
        'a ClassLabel): labels cannot be matched by name'
      )
    if classes_file:
      self.classes = read_class_list(classes_file)
      missing = sorted(set(self.classes) - set(dataset_names))
      if missing:
        raise DataSourceError(
          f'tfds dataset {self.name} has no class {abbreviated(missing)} of data.classes='
          f'{str(classes_file)!r}: fix the list or use another dataset'
        )
    else:
      self.classes = sorted(dataset_names)
    label_of = {class_name: label for label, class_name in enumerate(self.classes)}
    # dataset label id -> our label, -1 for a class left out
    self._relabel = np.array([label_of.get(class_name, -1) for class_name in dataset_names], np.int32)

    decoders = {image_key: tfds.decode.SkipDecoding()}
    file_format = info.file_format.value if info.file_format is not None else 'tfrecord'
    if file_format == 'array_record':
      records = builder.as_data_source(split=split_name, decoders=decoders)
      self._read = records.__getitem__
      self._read_many = records.__getitems__
    elif file_format == 'tfrecord':
      shards = _TFRecordShards(info.splits[split_name].filepaths)
      parse = functools.partial(features.deserialize_example_np, decoders=decoders)
      self._read = lambda index: parse(shards[index])
      self._read_many = lambda indices: [self._read(index) for index in indices]
    else:
      raise DataSourceError(
        f'tfds dataset {self.name} is stored as {file_format}; atlas_jax reads '
        'array_record and tfrecord: prepare it again with --file_format=array_record'
      )
    self.num_records = int(info.splits[split_name].num_examples)
    if self.num_records < 1:
      raise DataSourceError(
        f'the {split_name!r} split of tfds dataset {self.name} is empty: prepare it again'
      )
    self._label_key = label_key
    # With a class filter, the records of the kept classes and their labels (from one pass over the split).
    self._records = self.scanned_labels = None
    if classes_file:
      labels = self._relabel[self._scan_labels()]
      self._records = np.flatnonzero(labels >= 0)
      self.scanned_labels = labels[self._records]
      if not len(self._records):
        raise DataSourceError(
          f'the {split_name!r} split of tfds dataset {self.name} has no example of the '
          f'classes in data.classes={str(classes_file)!r}'
        )

  def _scan_labels(self, chunk: int = 1024) -> np.ndarray:
    """The dataset label of every record of the split, (num_records,) int64: one read of the whole split."""
    labels = np.empty((self.num_records,), np.int64)
    for start in range(0, self.num_records, chunk):
      indices = list(range(start, min(start + chunk, self.num_records)))
      examples = self._read_many(indices)
      labels[start : start + len(indices)] = [int(example[self._label_key]) for example in examples]
    return labels

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def __len__(self) -> int:
    return self.num_records if self._records is None else len(self._records)

  def encoded(self, index: int) -> dict[str, Any]:
    """Example `index` undecoded: {'image': the stored bytes, 'label': int, 'record': its record number,
    'name': how errors name it, 'file_name': the dataset's `file_name` feature or None}."""
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for a split of {len(self)} examples')
    record = int(index) if self._records is None else int(self._records[index])
    example = self._read(record)
    file_name = example.get('file_name')
    if isinstance(file_name, bytes):
      file_name = file_name.decode('utf-8', 'replace')
    return {
      'image': example[self.image_key],
      'label': int(self._relabel[int(example[self._label_key])]),
      'record': record,
      'name': f'tfds {self.name} {self.split}[{record}]',
      'file_name': None if file_name is None else str(file_name),
    }

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self.encoded(index)
    return labelled_example(
      decode.decode_image(
        example['image'], self.max_pixels, name=example['name'], max_decode_bytes=self.max_decode_bytes
      ),
      example['label'],
    )


def from_config(data_config, image_size, split: str, seed: int) -> TfdsSource:
  """The split of `data.name` prepared in `data.data_dir`, filtered by `data.classes`; image_size and seed
  unused."""
  name = data_config.name
  data_dir = data_config.data_dir
  if name is None or data_dir is None:
    raise DataSourceError(
      f"data.source='tfds' needs data.name and data.data_dir (got name={name!r}, data_dir={data_dir!r}: "
      'no directory to look for prepared data in); set --config.data.name=NAME '
      '--config.data.data_dir=/path/to/tensorflow_datasets, or use --config.data.source=synthetic'
    )
  return TfdsSource(
    name,
    data_dir,
    split,
    classes_file=data_config.classes,
    max_pixels=data_config.max_pixels,
    max_decode_bytes=data_config.max_decode_bytes,
  )
