"""A split of a prepared tensorflow-datasets dataset (`tfds build` or a builder's download_and_prepare).

`TfdsSource` reads ArrayRecord through tfds's random-access data source and TFRecord through its own index of
the record offsets (`_TFRecordShards`); neither imports TensorFlow. Images are decoded here from their stored
bytes, as folders' files are, and classes are numbered in sorted order of their names, as a folder's are.

Broken data: a `dataset_info.json` that is not JSON or lacks the fields tfds needs, and a shard that is
missing, unreadable, cut short or holds another number of records than dataset_info.json lists, are one
DataSourceError line naming the file, when the source is built. A record that cannot be read or parsed
(bad bytes inside it: ArrayRecord's chunk hash or TFRecord's data CRC does not match, or the example does
not parse) is a bad example: decode.BadImageError naming the record, which the loader counts and replaces
as it does an undecodable image.

`data_dir` may be a gs:// prefix: the prepared dataset's small files and the shards of the split read are
then copied whole into a local cache (storage.local_copy, see `_remote_prepared`) and read from there by the
same code as a local dataset, so the same objects give the same examples.
"""

import functools
import json
import os
import pathlib
import re
import struct
from typing import Any, Sequence

from absl import logging
import google_crc32c
import numpy as np

from atlas_jax import storage
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
  the index reads 12 bytes per record and checks the length's CRC, so a file that is missing, unreadable,
  not TFRecord, cut short or holding another number of records than `shard_lengths` (dataset_info.json's)
  is one DataSourceError line here. A read is one pread of the record's data and its CRC, checked: a record
  whose bytes were corrupted raises decode.BadImageError under the name the caller gives (a bad example).
  """

  def __init__(self, paths: Sequence[str], shard_lengths: Sequence[int] | None = None):
    self.paths = [os.fspath(path) for path in paths]
    offsets, lengths, files = [], [], []
    for file_number, path in enumerate(self.paths):
      count = len(offsets)
      _check_shard_file(path, file_number, len(self.paths))
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
      if shard_lengths is not None:
        _check_shard_length(path, len(offsets) - count, shard_lengths[file_number])
    self._offsets = np.asarray(offsets, np.int64)
    self._lengths = np.asarray(lengths, np.int64)
    self._files = np.asarray(files, np.int32)

  def __len__(self) -> int:
    return len(self._offsets)

  def read(self, index: int, name: str) -> bytes:
    """The data of record `index`; BadImageError naming it as `name` when its CRC does not match."""
    path = self.paths[self._files[index]]
    length, offset = int(self._lengths[index]), int(self._offsets[index])
    descriptor = os.open(path, os.O_RDONLY)
    try:
      data = os.pread(descriptor, length + 4, offset)
    finally:
      os.close(descriptor)
    if len(data) != length + 4 or masked_crc32c(data[:length]) != struct.unpack('<I', data[length:])[0]:
      raise decode.BadImageError(
        name, f'corrupt record (its data does not match its CRC) at byte {offset} of {path}'
      )
    return data[:length]


def _check_shard_file(path: str, number: int, count: int) -> None:
  """One DataSourceError line when shard `path` (number `number` of `count`) is missing or unreadable."""
  if not os.path.exists(path):
    raise DataSourceError(
      f'{path} is missing (shard {number + 1} of {count} that dataset_info.json lists): copy it '
      'back or prepare the dataset again'
    )
  try:
    with open(path, 'rb') as stream:
      stream.read(1)
  except OSError as error:
    raise DataSourceError(
      f'cannot read {path} ({error.strerror or error}): fix its permissions or prepare the dataset again'
    ) from None


def _check_shard_length(path: str, found: int, listed: int) -> None:
  if found != int(listed):
    raise DataSourceError(
      f'{path} holds {found} record{"" if found == 1 else "s"} but dataset_info.json lists {listed}: the '
      'file is cut short or from another preparation; prepare the dataset again'
    )


def _check_array_record_shards(paths: Sequence[str], shard_lengths: Sequence[int] | None) -> None:
  """Each shard opened once (its footer and index read, its record count compared with dataset_info.json's):
  a missing, unreadable, truncated or foreign file is one DataSourceError line, not an error at every read."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

  for number, path in enumerate(paths):
    path = os.fspath(path)
    _check_shard_file(path, number, len(paths))
    try:
      reader = array_record_module.ArrayRecordReader(path, options='readahead_buffer_size:0')
      try:
        found = reader.num_records()
      finally:
        reader.close()  # raises what went wrong reading the file
    except (RuntimeError, ValueError, OSError) as error:
      reason = ' '.join(str(error).split())
      raise DataSourceError(
        f'{path} is not a readable ArrayRecord file ({reason[:300]}): it is cut short or corrupt; '
        'prepare the dataset again'
      ) from None
    if shard_lengths is not None:
      _check_shard_length(path, found, shard_lengths[number])


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


# A shard of a prepared split: `<name>-<split>.<format>-00000-of-00004`.
_SHARD = re.compile(r'\.(array_record|tfrecord|riegeli|parquet)-\d{5}-of-\d{5}$')


def _remote_prepared(data_dir: str, name: str) -> tuple[pathlib.Path, str, dict]:
  """A prepared dataset under the gs:// `data_dir`: (its local copy, its gs:// location, its objects by
  relative name with their storage.ObjectInfo). The version is chosen as `_prepared_dir` chooses it; the
  local copy holds its small files (dataset_info.json, features.json, label files) only: `_fetch_shards`
  adds the shards of the split read.

  Why whole shards in a local cache rather than reads by byte range: a random-access reader reads one
  record (ArrayRecord: one chunk) per example, so byte ranges would cost one request, tens of milliseconds,
  per example and per worker, every epoch, and array_record's own gs:// reader (google-cloud-cpp) is not
  bounded by storage.py's retries and timeouts. A whole shard is one download under that policy, made once
  per machine (storage.local_copy: an flock, a temporary file renamed, reused while the object's
  generation is the same), and then the reads are the local code path's, byte for byte. The cost is local
  disk for the split (storage.cache_root(), $ATLAS_JAX_GCS_CACHE)."""
  data_dir = str(data_dir).rstrip('/')
  name, _, version = name.partition(':')
  dataset_dir = f'{data_dir}/{name}'
  how = (
    f'prepare it and copy it there (tfds build {name} --data_dir=DIR --file_format=array_record, then '
    f'gcloud storage cp -r DIR/{name} {data_dir}/), or fix --config.data.name / --config.data.data_dir'
  )
  if version:
    candidates = [version]
  else:
    candidates = [folder for folder in storage.scan(dataset_dir)[1] if _is_version(folder)]
    candidates.sort(key=lambda folder: tuple(int(part) for part in folder.split('.')), reverse=True)
  for candidate in candidates:
    location = f'{dataset_dir}/{candidate}'
    objects = storage.list_tree(location)
    if 'dataset_info.json' in objects:
      small = {
        f'{location}/{relative}': info for relative, info in objects.items() if not _SHARD.search(relative)
      }
      copies = storage.local_copies(small)
      return copies[f'{location}/dataset_info.json'].parent, location, objects
  raise DataSourceError(
    f'no prepared tfds dataset {name}{":" + version if version else ""} in '
    f'{data_dir} (looked for {dataset_dir}/<version>/dataset_info.json): {how}'
  )


def _fetch_shards(paths: Sequence[str], local: pathlib.Path, location: str, objects: dict) -> None:
  """Copies the shards `paths` (in the local copy `local` of the gs:// prepared dataset `location`) from
  the bucket into the cache; a shard dataset_info.json lists but the bucket lacks is one DataSourceError."""
  wanted = {}
  for number, path in enumerate(paths):
    relative = pathlib.Path(path).relative_to(local).as_posix()
    if relative not in objects:
      raise DataSourceError(
        f'{location}/{relative} is missing (shard {number + 1} of {len(paths)} that dataset_info.json '
        'lists): copy it back or prepare the dataset again'
      )
    wanted[f'{location}/{relative}'] = objects[relative]
  logging.info(
    '%s: %d shards (%.2f GB) read through the local cache %s (each downloaded once, reused while unchanged)',
    location,
    len(wanted),
    sum(info.size for info in wanted.values()) / 1e9,
    local,
  )
  storage.local_copies(wanted)


def _check_dataset_info(prepared: pathlib.Path) -> None:
  """One DataSourceError line when `prepared`/dataset_info.json is not JSON or lacks what tfds reads."""
  path = prepared / 'dataset_info.json'
  again = 'prepare the dataset again (or restore the file from the preparation)'
  try:
    info = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError) as error:
    raise DataSourceError(
      f'cannot read {path} ({getattr(error, "strerror", None) or error}): {again}'
    ) from None
  except json.JSONDecodeError as error:
    raise DataSourceError(
      f'{path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}): {again}'
    ) from None
  if not isinstance(info, dict):
    raise DataSourceError(f'{path} holds a JSON {type(info).__name__}, not the object tfds writes: {again}')
  missing = [field for field in ('name', 'version', 'splits') if not info.get(field)]
  if missing:
    raise DataSourceError(
      f'{path} lacks the field{"s" if len(missing) > 1 else ""} {", ".join(missing)}: {again}'
    )
  splits = info['splits']
  if not isinstance(splits, list) or not all(
    isinstance(split, dict) and split.get('name') for split in splits
  ):
    raise DataSourceError(f'{path} has a "splits" field that is not a list of named splits: {again}')


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
    remote = storage.is_remote(data_dir)
    data_dir = str(data_dir).rstrip('/') if remote else pathlib.Path(data_dir).expanduser()
    if not (storage.isdir(data_dir) if remote else data_dir.is_dir()):
      raise DataSourceError(
        f'data.data_dir={str(data_dir)!r} is not a directory: set --config.data.data_dir '
        'to the tensorflow_datasets folder the dataset was prepared in'
      )
    if remote:  # a local copy of the small files; the split's shards follow below
      prepared, location, objects = _remote_prepared(data_dir, name)
    else:
      prepared = _prepared_dir(data_dir, name)
    _check_dataset_info(prepared)
    tfds = _import_tfds()
    try:
      builder = tfds.builder_from_directory(os.fspath(prepared))
      info = builder.info
      features = info.features
      file_format = info.file_format.value if info.file_format is not None else 'tfrecord'
    except Exception as error:  # tfds reports a bad dataset_info.json / features.json in many types
      reason = ' '.join(str(error).split())
      raise DataSourceError(
        f'tfds cannot read the dataset in {prepared} from its dataset_info.json and features.json '
        f'({type(error).__name__}: {reason[:300]}): prepare the dataset again'
      ) from None
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
    split_info = info.splits[split_name]
    paths = list(split_info.filepaths)
    # Each shard's record count as dataset_info.json lists it (None where it lists none per shard).
    shard_lengths = list(split_info.shard_lengths) if len(split_info.shard_lengths) == len(paths) else None
    if remote:
      _fetch_shards(paths, prepared, location, objects)
    if file_format == 'array_record':
      _check_array_record_shards(paths, shard_lengths)
      records = builder.as_data_source(split=split_name, decoders=decoders)
      self._read = records.__getitem__
      self._read_many = records.__getitems__
    elif file_format == 'tfrecord':
      shards = _TFRecordShards(paths, shard_lengths)
      parse = functools.partial(features.deserialize_example_np, decoders=decoders)
      self._read = lambda index: parse(shards.read(index, self._record_name(index)))
      self._read_many = lambda indices: [self._read(index) for index in indices]
    else:
      raise DataSourceError(
        f'tfds dataset {self.name} is stored as {file_format}; atlas_jax reads '
        'array_record and tfrecord: prepare it again with --file_format=array_record'
      )
    self.num_records = int(split_info.num_examples)
    if self.num_records < 1:
      raise DataSourceError(
        f'the {split_name!r} split of tfds dataset {self.name} is empty: prepare it again'
      )
    self._label_key = label_key
    # With a class filter, the records of the kept classes and their labels (from one pass over the split).
    self._records = self.scanned_labels = None
    self.unreadable_records: list[int] = []  # with a class filter: records the scan could not read
    if classes_file:
      scanned = self._scan_labels()
      known = scanned >= 0
      labels = np.full(scanned.shape, -1, np.int32)
      labels[known] = self._relabel[scanned[known]]
      self._records = np.flatnonzero(labels >= 0)
      self.scanned_labels = labels[self._records]
      if not len(self._records):
        raise DataSourceError(
          f'the {split_name!r} split of tfds dataset {self.name} has no example of the '
          f'classes in data.classes={str(classes_file)!r}'
        )

  def _record_name(self, record: int) -> str:
    return f'tfds {self.name} {self.split}[{record}]'

  def _scan_labels(self, chunk: int = 1024) -> np.ndarray:
    """The dataset label of every record of the split, (num_records,) int64, -1 for a record that cannot
    be read (left out of the filtered split, and logged): one read of the whole split."""
    labels = np.empty((self.num_records,), np.int64)
    for start in range(0, self.num_records, chunk):
      indices = list(range(start, min(start + chunk, self.num_records)))
      try:
        examples = self._read_many(indices)
        labels[start : start + len(indices)] = [int(example[self._label_key]) for example in examples]
      except Exception:  # a corrupt record in the chunk: read its records one by one
        for index in indices:
          labels[index] = self._scanned_label(index)
    labels[labels >= len(self._relabel)] = -1  # not a class of the dataset: a corrupt label
    self.unreadable_records = np.flatnonzero(labels < 0).tolist()
    if self.unreadable_records:
      logging.warning(
        'tfds dataset %s %s: %d records cannot be read and are left out (their class is unknown), the '
        'first: %s',
        self.name,
        self.split,
        len(self.unreadable_records),
        self._record_name(self.unreadable_records[0]),
      )
    return labels

  def _scanned_label(self, record: int) -> int:
    try:
      label = int(self._read(record)[self._label_key])
    except Exception:  # any failure to read or parse it: a corrupt record, reported by the scan
      return -1
    return label if label >= 0 else -1

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
    name = self._record_name(record)
    try:
      example = self._read(record)
      image = example[self.image_key]
      dataset_label = int(example[self._label_key])
      file_name = example.get('file_name')
    except decode.BadImageError:
      raise
    except Exception as error:  # bad bytes inside the record (hash mismatch, unparsable example): bad example
      raise decode.BadImageError(
        name, f'corrupt record, cannot be read: {type(error).__name__}: {str(error)[:300]}'
      ) from error
    if not 0 <= dataset_label < len(self._relabel):
      raise decode.BadImageError(
        name, f'corrupt record: label {dataset_label} is not a class of the dataset ({len(self._relabel)})'
      )
    if isinstance(file_name, bytes):
      file_name = file_name.decode('utf-8', 'replace')
    return {
      'image': image,
      'label': int(self._relabel[dataset_label]),
      'record': record,
      'name': name,
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
