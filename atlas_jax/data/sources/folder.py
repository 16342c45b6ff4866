"""Image folders: `ImageFolder` reads `<data_dir>/train/<class>/...` and `<data_dir>/val/<class>/...`.

Any format PIL reads, decoded by decode.decode_image at its stored size (reduced only above
data.max_pixels); the loader's transform resizes. Classes are numbered in sorted order of their names, as
the tfds source numbers them.

`data_dir` may be a gs:// prefix (atlas_jax/storage.py): the folders are then listed with one prefix listing
each (a folder is a name prefix with objects under it; there are no symlinks) and each example is one
download of its image, decoded from the bytes as a local file is, so the same objects give the same
examples in the same order.
"""

import os
import pathlib

from absl import logging
import numpy as np
from PIL import Image

from atlas_jax import storage
from atlas_jax.data import decode
from atlas_jax.data.sources.common import (
  SPLITS,
  DataSourceError,
  abbreviated,
  labelled_example,
  read_class_list,
)


class ImageFolder:
  """`<data_dir>/<split dir>/<class>/<image file>`: every file PIL can read, decoded at its stored size.

  The split dirs are `train` and `val` (split 'validation' reads `val/`). The classes are the sorted names of
  data.classes when given (each must have a folder in train/ when train/ exists; other folders are
  ignored), else the sorted subfolders of train/; a val/ folder not among them is an error. Files are the
  non-hidden files with a suffix PIL registers (any case), sorted by class and then by name, so every host
  lists the same order. `source[i]` decodes file i (decode.decode_image): a file that cannot be decoded
  raises decode.BadImageError, which the loader counts and replaces.

  Symlinks are followed one level: a class folder's entries are listed, never its subfolders, so a link
  that loops back up (`cat/sub -> ..`) is not followed at all. A link that does not resolve (broken, or a
  loop such as `a.jpg -> a.jpg`) is skipped when listing, not counted as a bad example, with one warning
  per split naming the first; a class folder left with nothing but such links is one DataSourceError line,
  as is a class folder that is itself such a link.
  """

  SPLIT_DIRS = {'train': 'train', 'validation': 'val'}

  def __init__(
    self,
    data_dir,
    split: str,
    classes_file=None,
    *,
    max_pixels: int,
    max_decode_bytes: int,
  ):
    if split not in self.SPLIT_DIRS:
      raise DataSourceError(f'split must be one of {SPLITS}, got {split!r}')
    self.remote = storage.is_remote(data_dir)
    self.root = storage.path(data_dir) if self.remote else pathlib.Path(data_dir).expanduser()
    self.split = split
    self.max_pixels = int(max_pixels)
    self.max_decode_bytes = int(max_decode_bytes)
    layout = (
      'an image folder holds train/<class>/<image> and val/<class>/<image>; set '
      '--config.data.data_dir to the folder that holds train/ and val/'
    )
    if not _is_dir(self.root):
      raise DataSourceError(f'data.data_dir={str(self.root)!r} is not a directory: {layout}')
    split_dir = self.root / self.SPLIT_DIRS[split]
    if not _is_dir(split_dir):
      raise DataSourceError(
        f'{self.root} has no {self.SPLIT_DIRS[split]}/ folder for split {split!r}: {layout}'
      )
    train_classes = _subfolders(self.root / 'train') if _is_dir(self.root / 'train') else None
    if classes_file:
      self.classes = read_class_list(classes_file)
      missing = sorted(set(self.classes) - set(train_classes)) if train_classes is not None else []
      if missing:
        raise DataSourceError(
          f'{self.root / "train"} has no folder for {abbreviated(missing)} of '
          f'data.classes={str(classes_file)!r}: prepare the data with those classes or '
          'fix the list'
        )
      kept = set(self.classes)
      split_classes = [name for name in _subfolders(split_dir) if name in kept]
    else:
      if train_classes is None:
        raise DataSourceError(
          f'{self.root} has no train/ folder to name the classes: add it, or set '
          '--config.data.classes to a class-list file'
        )
      self.classes = train_classes
      split_classes = _subfolders(split_dir)
      strays = sorted(set(split_classes) - set(train_classes))
      if strays:
        raise DataSourceError(
          f'{split_dir} has class folders that train/ lacks ({abbreviated(strays)}): the '
          'labels would not match; remove them or add them to train/'
        )
    label_of = {name: label for label, name in enumerate(self.classes)}
    extensions = {suffix.lower() for suffix in Image.registered_extensions()}
    relative_paths, labels, unresolved = [], [], []
    for name in split_classes:
      files, links = _image_files(split_dir / name, extensions)
      if links and not files:
        raise DataSourceError(
          f'{split_dir / name} holds no image file, only symlinks that do not resolve (broken or '
          f'looping: {abbreviated(links)}): fix or remove them'
        )
      unresolved.extend(os.path.join(name, link) for link in links)
      relative_paths.extend(os.fsencode(os.path.join(name, file)) for file in files)
      labels.extend([label_of[name]] * len(files))
    if unresolved:
      logging.warning(
        '%s: %d symlinks do not resolve (broken or looping) and are skipped, the first: %s',
        split_dir,
        len(unresolved),
        unresolved[0],
      )
    if not relative_paths:
      raise DataSourceError(
        f'{split_dir} holds no image files in its class folders (<class>/<image>, any '
        f'format PIL reads): {layout}'
      )
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
    """The file of example `index` (an etils.epath.Path for a gs:// data_dir)."""
    return self.split_dir / os.fsdecode(self._relative_paths[index])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if self.remote:  # one download of the object, decoded from its bytes as a local file is
      path = self.path(index)
      try:
        data = storage.read_bytes(path)
      except FileNotFoundError as error:  # deleted since it was listed: a bad example, as locally
        raise decode.BadImageError(path, f'cannot read the file ({error.strerror})') from None
      image = decode.decode_image(
        data, self.max_pixels, name=str(path), max_decode_bytes=self.max_decode_bytes
      )
    else:
      image = decode.decode_image(self.path(index), self.max_pixels, max_decode_bytes=self.max_decode_bytes)
    return labelled_example(image, self.labels[index])


def _is_dir(directory) -> bool:
  return storage.isdir(directory) if storage.is_remote(directory) else directory.is_dir()


def _hidden(name: str) -> bool:
  return name.startswith('.')


def _resolves(path: str) -> bool:
  return os.path.exists(path)  # False for a broken link and for a loop (ELOOP)


def _subfolders(directory: pathlib.Path) -> list[str]:
  """The sorted non-hidden subfolders (symlinks to folders included); a link that does not resolve is one
  DataSourceError line: it would leave out a class."""
  if storage.is_remote(directory):
    return [name for name in storage.scan(directory)[1] if not _hidden(name)]
  names = []
  for entry in os.scandir(directory):
    if entry.name.startswith('.'):
      continue
    if entry.is_symlink() and not _resolves(entry.path):
      raise DataSourceError(
        f'{entry.path} is a symlink that does not resolve (broken or looping): a class folder must '
        'be a folder; fix or remove the link'
      )
    if entry.is_dir():
      names.append(entry.name)
  return sorted(names)


def _image_files(directory: pathlib.Path, extensions: set[str]) -> tuple[list[str], list[str]]:
  """(the sorted non-hidden image files of `directory`, the sorted symlinks with an image suffix that do
  not resolve), by name; subfolders are not listed."""
  if storage.is_remote(directory):
    names = storage.scan(directory)[0]
    return [n for n in names if not _hidden(n) and os.path.splitext(n)[1].lower() in extensions], []
  files, links = [], []
  for entry in os.scandir(directory):
    if entry.name.startswith('.') or os.path.splitext(entry.name)[1].lower() not in extensions:
      continue
    if entry.is_symlink() and not _resolves(entry.path):
      links.append(entry.name)
    elif entry.is_file():
      files.append(entry.name)
  return sorted(files), sorted(links)


def from_config(data_config, image_size, split: str, seed: int) -> ImageFolder:
  """The split of the folder `data.data_dir`, filtered by `data.classes`; image_size and seed unused."""
  data_dir = data_config.data_dir
  if data_dir is None:
    raise DataSourceError(
      "data.source='folder' needs data.data_dir, the image folder with one subfolder per class (got "
      'data_dir=None: no directory to look in); set --config.data.data_dir=/path/to/images, '
      'or use --config.data.source=synthetic'
    )
  return ImageFolder(
    data_dir,
    split,
    classes_file=data_config.classes,
    max_pixels=data_config.max_pixels,
    max_decode_bytes=data_config.max_decode_bytes,
  )
