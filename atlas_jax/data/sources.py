"""Data sources: random access by index, `source[i] -> {'image': uint8 (H, W, 3), 'label': int32 scalar}`.

A source is any object with `__len__` and `__getitem__(index)`; the loader (pipeline.py) does the shuffling,
sharding and batching, so a source only has to be deterministic per index and safe to call from threads.

`SyntheticLongRange` is the built-in task that needs long-range communication (docs/synthetic_task.md): two
coloured squares far apart, the label whether their colours differ and whether they lie in different halves of
the whole image (two XORs), which no sum of per-window evidence can represent. It needs no files, works at any
resolution and renders an example in about a millisecond per megapixel.

Real data: `ImageFolder` (`<data_dir>/train/<class>/...`, `<data_dir>/val/<class>/...`, any format PIL reads)
and `TfdsSource` (a prepared tensorflow-datasets dataset, ArrayRecord or TFRecord, read without TensorFlow).
Both return images as decoded (decode.py: RGB, EXIF orientation applied, at their stored size, reduced only
above data.max_pixels); the loader's transform resizes them. Both number the classes in sorted order of
their names, optionally only those of a class-list file (`data.classes`), so the same class gets the same
label from either. A file that cannot be decoded raises decode.BadImageError, which the loader counts and
replaces.

`make_source(config.data, image_size, split, seed)` picks a source by `data.source`; a source that cannot be
built (no data where the config points, a val class missing from train, ...) raises DataSourceError with
one line saying what to do.
"""

import collections
import dataclasses
import functools
import math
import os
import pathlib
import struct
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from atlas_jax import metrics
from atlas_jax.data import decode

SPLITS = ('train', 'validation')
DEFAULT_SYNTHETIC_TRAIN_SIZE = 50_000
DEFAULT_SYNTHETIC_VAL_SIZE = 2_000
DEFAULT_MAX_PIXELS = 200_000_000
# The 100 WordNet IDs of HR-IN100 (ImageNet-100 of CMC), in the reference's file order.
HR_IN100_CLASSES = pathlib.Path(__file__).resolve().parents[1] / 'resources' / 'imagenet100_classes.txt'


class DataSourceError(ValueError):
  """A data source that cannot be built from the config: unknown name, missing data, bad split."""


def image_size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
  """`2048` or `(H, W)` -> (H, W) as ints."""
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  height, width = image_size
  return int(height), int(width)


@dataclasses.dataclass(frozen=True)
class LongRangeExample:
  """The generation parameters of one SyntheticLongRange example (pixel boxes are [top, top + side))."""
  colour_a: int          # palette index of marker A (left part of the image): 0 red, 1 blue
  colour_b: int          # palette index of marker B (right part of the image)
  region_a: int          # 1 when marker A lies in the top half of the image, 0 in the bottom half
  region_b: int          # the same for marker B
  top_a: int
  left_a: int
  top_b: int
  left_b: int
  side: int              # both markers are side x side squares
  label: int             # (colour_a ^ colour_b) + 2 * (region_a ^ region_b)


class SyntheticLongRange:
  """Two coloured squares far apart; label = [colours differ] + 2 * [halves differ] (4 classes).

  Layout of an (H, W) image, side s = max(4, min(H, W) // 4):
    background: gray 128 with uniform noise in [-8, 8] per pixel and channel;
    marker A: an s x s square of colour red or blue inside columns [0, floor(3W/8));
    marker B: an s x s square of colour red or blue inside columns [ceil(5W/8), W);
    each marker lies wholly in the top half rows [0, H // 2) (region 1) or the bottom half rows
      [ceil(H/2), H) (region 0);
    so the columns of A and B are at least W/4 apart, and A is in the left half, B in the right half.
  label = (colour_a XOR colour_b) + 2 * (region_a XOR region_b): whether the two colours differ, and whether
  the two markers lie in different halves of the whole image. Colours, regions and positions are uniform
  and independent, so the label is uniform over the 4 classes and independent of any one marker alone.
  Example i of a split depends only on (seed, split, i).
  """

  num_classes = 4
  PALETTE = np.array([[220, 40, 40],      # red
                      [50, 80, 230]],     # blue
                     dtype=np.int16)
  PALETTE_NAMES = ('red', 'blue')
  BACKGROUND = 128
  NOISE = 8
  # The noise is a tile repeated at a random phase: per-pixel random numbers would cost ~10x more at 2048^2.
  # Tile sides are coprime with 16 so the pattern does not line up with the patch grid.
  NOISE_TILE = (61, 59)
  MIN_SIDE = 32

  def __init__(self, image_size: int | Sequence[int], size: int, seed: int = 0, split: str = 'train'):
    height, width = image_size_pair(image_size)
    if min(height, width) < self.MIN_SIDE:
      raise DataSourceError(f'SyntheticLongRange needs images of at least {self.MIN_SIDE}x{self.MIN_SIDE} '
                            f'pixels, got {height}x{width}')
    if split not in SPLITS:
      raise DataSourceError(f'split must be one of {SPLITS}, got {split!r}')
    if size < 1:
      raise DataSourceError(f'a synthetic split needs at least one example, got size={size}')
    if seed < 0:
      raise DataSourceError(f'seed must be >= 0 (numpy seed sequences take non-negative ints), got {seed}')
    self.image_shape = (height, width, 3)
    self.size = int(size)
    self.seed = int(seed)
    self.split = split
    self._split_id = SPLITS.index(split)
    self.side = max(4, min(height, width) // 4)

  def __len__(self) -> int:
    return self.size

  def _rng(self, index) -> np.random.Generator:
    if not isinstance(index, (int, np.integer)):
      raise TypeError(f'index must be an integer, got {type(index).__name__}')
    if not 0 <= index < self.size:
      raise IndexError(f'index {index} out of range for a split of {self.size} examples')
    return np.random.default_rng([self.seed, self._split_id, int(index)])

  def _draw_top(self, rng: np.random.Generator, region: int) -> int:
    """A marker's top row, the marker wholly in the top half (region 1) or the bottom half (region 0)."""
    height = self.image_shape[0]
    if region:
      return int(rng.integers(0, height // 2 - self.side + 1))
    return int(rng.integers(math.ceil(height / 2), height - self.side + 1))

  def _draw_parameters(self, rng: np.random.Generator) -> LongRangeExample:
    width = self.image_shape[1]
    side = self.side
    colour_a, colour_b, region_a, region_b = (int(v) for v in rng.integers(0, 2, size=4))
    top_a = self._draw_top(rng, region_a)
    left_a = int(rng.integers(0, (3 * width) // 8 - side + 1))
    top_b = self._draw_top(rng, region_b)
    left_b = int(rng.integers(math.ceil(5 * width / 8), width - side + 1))
    label = (colour_a ^ colour_b) + 2 * (region_a ^ region_b)
    return LongRangeExample(colour_a, colour_b, region_a, region_b, top_a, left_a, top_b, left_b, side, label)

  def describe(self, index: int) -> LongRangeExample:
    """The generation parameters of example `index` (the same draws as `self[index]`, without rendering)."""
    return self._draw_parameters(self._rng(index))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = self._rng(index)
    example = self._draw_parameters(rng)
    height, width, _ = self.image_shape
    tile_height, tile_width = self.NOISE_TILE
    tile = rng.integers(self.BACKGROUND - self.NOISE, self.BACKGROUND + self.NOISE + 1,
                        size=(tile_height, tile_width, 3), dtype=np.uint8)
    phase_row, phase_col = (int(p) for p in rng.integers(0, [tile_height, tile_width]))
    repeats = (math.ceil((height + phase_row) / tile_height), math.ceil((width + phase_col) / tile_width), 1)
    image = np.ascontiguousarray(
        np.tile(tile, repeats)[phase_row:phase_row + height, phase_col:phase_col + width])  # (H, W, 3)
    side = example.side
    for colour, top, left in ((example.colour_a, example.top_a, example.left_a),
                              (example.colour_b, example.top_b, example.left_b)):
      patch = image[top:top + side, left:left + side].astype(np.int16)
      # The marker keeps the background's noise around its colour: solid to the eye, not a constant patch.
      image[top:top + side, left:left + side] = np.clip(
          patch - self.BACKGROUND + self.PALETTE[colour], 0, 255).astype(np.uint8)
    return {'image': image, 'label': np.int32(example.label)}


def _synthetic(data_config, image_size, split: str, seed: int) -> SyntheticLongRange:
  if split == 'train':
    size = getattr(data_config, 'synthetic_train_size', None)
    size = DEFAULT_SYNTHETIC_TRAIN_SIZE if size is None else size
  else:
    size = getattr(data_config, 'synthetic_val_size', None)
    size = DEFAULT_SYNTHETIC_VAL_SIZE if size is None else size
  return SyntheticLongRange(image_size, int(size), seed=seed, split=split)


# ---------------------------------------------------------------------------------------------------------
# Class lists and labels (DESIGN.md "Labels"): classes are numbered in sorted order of their names, for
# folders and tfds alike, so the same class gets the same label from either.


def read_class_list(path) -> list[str]:
  """A class-list file (one name a line; blank lines and text after '#' ignored) -> the names, sorted."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataSourceError(f'data.classes={str(path)!r} is not a file: point it at a file of class names, one '
                          f'a line (HR-IN100: {HR_IN100_CLASSES})')
  names = [line.split('#', 1)[0].strip() for line in path.read_text().splitlines()]
  names = [name for name in names if name]
  if not names:
    raise DataSourceError(f'data.classes={str(path)!r} lists no class names: write one name a line')
  duplicates = sorted(name for name, count in collections.Counter(names).items() if count > 1)
  if duplicates:
    raise DataSourceError(f'data.classes={str(path)!r} lists {abbreviated(duplicates)} more than once: '
                          'each class once, please')
  return sorted(names)


def abbreviated(names: Sequence[str], limit: int = 5) -> str:
  """'a, b, c' or 'a, b, c, ... (12 in all)': names for a one-line message."""
  shown = ', '.join(names[:limit])
  return shown if len(names) <= limit else f'{shown}, ... ({len(names)} in all)'


def _example(image: np.ndarray, label: int) -> dict[str, np.ndarray]:
  return {'image': image, 'label': np.int32(label)}


# ---------------------------------------------------------------------------------------------------------
# Image folders.


class ImageFolder:
  """`<data_dir>/<split dir>/<class>/<image file>`: every file PIL can read, decoded at its stored size.

  The split dirs are `train` and `val` (split 'validation' reads `val/`). The classes are the sorted names of
  data.classes when given (each must have a folder in train/ when train/ exists; other folders are
  ignored), else the sorted subfolders of train/; a val/ folder not among them is an error. Files are the
  non-hidden files with a suffix PIL registers (any case), sorted by class and then by name, so every host
  lists the same order. `source[i]` decodes file i (decode.decode_image): a file that cannot be decoded
  raises decode.BadImageError, which the loader counts and replaces.
  """

  SPLIT_DIRS = {'train': 'train', 'validation': 'val'}

  def __init__(self, data_dir, split: str, classes_file=None, max_pixels: int = DEFAULT_MAX_PIXELS):
    if split not in self.SPLIT_DIRS:
      raise DataSourceError(f'split must be one of {SPLITS}, got {split!r}')
    self.root = pathlib.Path(data_dir).expanduser()
    self.split = split
    self.max_pixels = int(max_pixels)
    layout = ('an image folder holds train/<class>/<image> and val/<class>/<image>; set '
              '--config.data.data_dir to the folder that holds train/ and val/')
    if not self.root.is_dir():
      raise DataSourceError(f'data.data_dir={str(self.root)!r} is not a directory: {layout}')
    split_dir = self.root / self.SPLIT_DIRS[split]
    if not split_dir.is_dir():
      raise DataSourceError(f'{self.root} has no {self.SPLIT_DIRS[split]}/ folder for split {split!r}: '
                            f'{layout}')
    train_classes = _subfolders(self.root / 'train') if (self.root / 'train').is_dir() else None
    if classes_file:
      self.classes = read_class_list(classes_file)
      missing = sorted(set(self.classes) - set(train_classes)) if train_classes is not None else []
      if missing:
        raise DataSourceError(f'{self.root / "train"} has no folder for {abbreviated(missing)} of '
                              f'data.classes={str(classes_file)!r}: prepare the data with those classes or '
                              'fix the list')
      kept = set(self.classes)
      split_classes = [name for name in _subfolders(split_dir) if name in kept]
    else:
      if train_classes is None:
        raise DataSourceError(f'{self.root} has no train/ folder to name the classes: add it, or set '
                              '--config.data.classes to a class-list file')
      self.classes = train_classes
      split_classes = _subfolders(split_dir)
      strays = sorted(set(split_classes) - set(train_classes))
      if strays:
        raise DataSourceError(f'{split_dir} has class folders that train/ lacks ({abbreviated(strays)}): the '
                              'labels would not match; remove them or add them to train/')
    label_of = {name: label for label, name in enumerate(self.classes)}
    extensions = {suffix.lower() for suffix in Image.registered_extensions()}
    relative_paths, labels = [], []
    for name in split_classes:
      files = sorted(entry.name for entry in os.scandir(split_dir / name)
                     if entry.is_file() and not entry.name.startswith('.')
                     and os.path.splitext(entry.name)[1].lower() in extensions)
      relative_paths.extend(os.fsencode(os.path.join(name, file)) for file in files)
      labels.extend([label_of[name]] * len(files))
    if not relative_paths:
      raise DataSourceError(f'{split_dir} holds no image files in its class folders (<class>/<image>, any '
                            f'format PIL reads): {layout}')
    self.split_dir = split_dir
    # Fixed-width bytes: a million paths cost tens of MB instead of a Python string each.
    self._relative_paths = np.array(relative_paths, dtype=np.bytes_)
    self.labels = np.asarray(labels, np.int32)

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def __len__(self) -> int:
    return len(self.labels)

  def path(self, index: int) -> pathlib.Path:
    """The file of example `index`."""
    return self.split_dir / os.fsdecode(self._relative_paths[index])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    image = decode.decode_image(self.path(index), self.max_pixels)
    return _example(image, self.labels[index])


def _subfolders(directory: pathlib.Path) -> list[str]:
  return sorted(entry.name for entry in os.scandir(directory)
                if entry.is_dir() and not entry.name.startswith('.'))


# ---------------------------------------------------------------------------------------------------------
# tensorflow-datasets, prepared by the user (`tfds build` or a builder's download_and_prepare).


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
            raise DataSourceError(f'{path} ends inside a record header at byte {position}: the file is cut '
                                  'short; prepare the dataset again')
          length, length_crc = struct.unpack('<QI', header)
          if metrics.masked_crc32c(header[:8]) != length_crc:
            raise DataSourceError(f'{path} has a bad record header at byte {position}: not a TFRecord file '
                                  'or corrupt; prepare the dataset again')
          offsets.append(position + 12)
          lengths.append(length)
          files.append(file_number)
          position += 12 + length + 4
          stream.seek(position)
      if position != size:
        raise DataSourceError(f'{path} ends inside its last record: the file is cut short; prepare the '
                              'dataset again')
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
    raise DataSourceError(f"data.source='tfds' needs tensorflow-datasets and array-record ({error}): "
                          'pip install -r requirements.txt') from error
  return tfds


def _prepared_dir(data_dir: pathlib.Path, name: str) -> pathlib.Path:
  """`data_dir/<name>[/<config>]/<version>`: the version given as `name:1.2.3`, else the newest prepared."""
  name, _, version = name.partition(':')
  dataset_dir = data_dir / name
  how = (f'prepare it there first (tfds build {name} --data_dir={data_dir} --file_format=array_record), or '
         'fix --config.data.name / --config.data.data_dir')
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
  raise DataSourceError(f'no prepared tfds dataset {name}{":" + version if version else ""} in '
                        f'{data_dir} (looked for {dataset_dir}/<version>/dataset_info.json): {how}')


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

  def __init__(self, name: str, data_dir, split: str, classes_file=None, max_pixels: int = DEFAULT_MAX_PIXELS,
               image_key: str = 'image', label_key: str = 'label'):
    if split not in self.SPLIT_NAMES:
      raise DataSourceError(f'split must be one of {SPLITS}, got {split!r}')
    data_dir = pathlib.Path(data_dir).expanduser()
    if not data_dir.is_dir():
      raise DataSourceError(f'data.data_dir={str(data_dir)!r} is not a directory: set --config.data.data_dir '
                            'to the tensorflow_datasets folder the dataset was prepared in')
    prepared = _prepared_dir(data_dir, name)
    tfds = _import_tfds()
    builder = tfds.builder_from_directory(os.fspath(prepared))
    info = builder.info
    self.name = f'{info.name}/{prepared.name}'
    self.max_pixels = int(max_pixels)
    self.image_key = image_key
    split_name = next((candidate for candidate in self.SPLIT_NAMES[split] if candidate in info.splits), None)
    if split_name is None:
      raise DataSourceError(f'tfds dataset {self.name} has no {split!r} split (its splits: '
                            f'{", ".join(info.splits)}): prepare one or use another dataset')
    self.split = split_name
    features = info.features
    if image_key not in features or label_key not in features:
      raise DataSourceError(f'tfds dataset {self.name} lacks the features {image_key!r} and {label_key!r} '
                            f'(it has {", ".join(features)}): an image classification dataset is needed')
    dataset_names = list(getattr(features[label_key], 'names', None) or [])
    if not dataset_names:
      raise DataSourceError(f'the {label_key!r} feature of tfds dataset {self.name} has no class names (not '
                            'a ClassLabel): labels cannot be matched by name')
    if classes_file:
      self.classes = read_class_list(classes_file)
      missing = sorted(set(self.classes) - set(dataset_names))
      if missing:
        raise DataSourceError(f'tfds dataset {self.name} has no class {abbreviated(missing)} of data.classes='
                              f'{str(classes_file)!r}: fix the list or use another dataset')
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
      raise DataSourceError(f'tfds dataset {self.name} is stored as {file_format}; atlas_jax reads '
                            'array_record and tfrecord: prepare it again with --file_format=array_record')
    self.num_records = int(info.splits[split_name].num_examples)
    if self.num_records < 1:
      raise DataSourceError(f'the {split_name!r} split of tfds dataset {self.name} is empty: prepare it '
                            'again')
    self._label_key = label_key
    # With a class filter, the records of the kept classes and their labels (from one pass over the split).
    self._records = self.scanned_labels = None
    if classes_file:
      labels = self._relabel[self._scan_labels()]
      self._records = np.flatnonzero(labels >= 0)
      self.scanned_labels = labels[self._records]
      if not len(self._records):
        raise DataSourceError(f'the {split_name!r} split of tfds dataset {self.name} has no example of the '
                              f'classes in data.classes={str(classes_file)!r}')

  def _scan_labels(self, chunk: int = 1024) -> np.ndarray:
    """The dataset label of every record of the split, (num_records,) int64: one read of the whole split."""
    labels = np.empty((self.num_records,), np.int64)
    for start in range(0, self.num_records, chunk):
      indices = list(range(start, min(start + chunk, self.num_records)))
      examples = self._read_many(indices)
      labels[start:start + len(indices)] = [int(example[self._label_key]) for example in examples]
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
    return {'image': example[self.image_key], 'label': int(self._relabel[int(example[self._label_key])]),
            'record': record, 'name': f'tfds {self.name} {self.split}[{record}]',
            'file_name': None if file_name is None else str(file_name)}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self.encoded(index)
    return _example(decode.decode_image(example['image'], self.max_pixels, name=example['name']),
                    example['label'])


def _tfds(data_config, image_size, split: str, seed: int) -> TfdsSource:
  name = getattr(data_config, 'name', None)
  data_dir = getattr(data_config, 'data_dir', None)
  if name is None or data_dir is None:
    raise DataSourceError(
        f"data.source='tfds' needs data.name and data.data_dir (got name={name!r}, data_dir={data_dir!r}: "
        'no directory to look for prepared data in); set --config.data.name=NAME '
        '--config.data.data_dir=/path/to/tensorflow_datasets, or use --config.data.source=synthetic')
  return TfdsSource(name, data_dir, split, classes_file=getattr(data_config, 'classes', None),
                    max_pixels=getattr(data_config, 'max_pixels', DEFAULT_MAX_PIXELS))


def _folder(data_config, image_size, split: str, seed: int) -> ImageFolder:
  data_dir = getattr(data_config, 'data_dir', None)
  if data_dir is None:
    raise DataSourceError(
        "data.source='folder' needs data.data_dir, the image folder with one subfolder per class (got "
        'data_dir=None: no directory to look in); set --config.data.data_dir=/path/to/images, '
        'or use --config.data.source=synthetic')
  return ImageFolder(data_dir, split, classes_file=getattr(data_config, 'classes', None),
                     max_pixels=getattr(data_config, 'max_pixels', DEFAULT_MAX_PIXELS))


# data.source -> builder(data_config, image_size, split, seed); a new source is one more entry here.
SOURCE_BUILDERS: dict[str, Callable[..., Any]] = {
    'synthetic': _synthetic,
    'tfds': _tfds,
    'folder': _folder,
}


def make_source(data_config, image_size: int | Sequence[int], split: str, seed: int,
                num_classes: int | None = None):
  """The source named by `data_config.source` for `split` ('train' or 'validation'), images of `image_size`.

  `data_config` is `config.data` (a ConfigDict or any object with these attributes); fields it lacks take
  their defaults. `num_classes`, when given, is the model's head: a source with more classes is refused.
  Raises DataSourceError with a one-line fix when the source cannot be built.
  """
  if split not in SPLITS:
    raise DataSourceError(f'split must be one of {SPLITS}, got {split!r}')
  name = getattr(data_config, 'source', 'synthetic')
  builder = SOURCE_BUILDERS.get(name)
  if builder is None:
    raise DataSourceError(f'unknown data.source={name!r}; known: {", ".join(SOURCE_BUILDERS)}')
  source = builder(data_config, image_size_pair(image_size), split, seed)
  if num_classes is not None and source.num_classes > num_classes:  # labels past the head: silently lost
    raise DataSourceError(f'data.source={name!r} has {source.num_classes} classes but model.num_classes is '
                          f'{num_classes}: set --config.model.num_classes={source.num_classes}, or filter '
                          'the classes with --config.data.classes=FILE')
  return source
