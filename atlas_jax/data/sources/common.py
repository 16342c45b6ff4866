"""What every data source shares: the splits, the error, image sizes, class lists and the example dict.

The source modules (synthetic.py, folder.py, tfds.py) import these from here rather than from the package's
`__init__`, which imports them: no import cycle inside the package. `__init__` re-exports every name.
"""

import collections
import pathlib
from typing import Sequence

import numpy as np

from atlas_jax import storage
from atlas_jax.errors import AtlasError

SPLITS = ('train', 'validation')
# The 100 WordNet IDs of HR-IN100 (ImageNet-100 of CMC), in the reference's file order.
HR_IN100_CLASSES = pathlib.Path(__file__).resolve().parents[2] / 'resources' / 'imagenet100_classes.txt'


class DataSourceError(AtlasError, ValueError):
  """A data source that cannot be built from the config: unknown name, missing data, bad split."""


def image_size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
  """`2048` or `(H, W)` -> (H, W) as ints."""
  if isinstance(image_size, (int, np.integer)):
    return int(image_size), int(image_size)
  height, width = image_size
  return int(height), int(width)


# Class lists and labels (docs/design.md, "Batches, equality, labels"): classes are numbered in sorted
# order of their names, for folders and tfds alike, so the same class gets the same label from either.


def read_class_list(path) -> list[str]:
  """A class-list file (one name a line; blank lines and text after '#' ignored) -> the names, sorted.
  The file may be local or on gs:// (atlas_jax/storage.py)."""
  path = storage.path(path)
  if not storage.isfile(path):
    raise DataSourceError(
      f'data.classes={str(path)!r} is not a file: point it at a file of class names, one '
      f'a line (HR-IN100: {HR_IN100_CLASSES})'
    )
  names = [line.split('#', 1)[0].strip() for line in storage.read_text(path).splitlines()]
  names = [name for name in names if name]
  if not names:
    raise DataSourceError(f'data.classes={str(path)!r} lists no class names: write one name a line')
  duplicates = sorted(name for name, count in collections.Counter(names).items() if count > 1)
  if duplicates:
    raise DataSourceError(
      f'data.classes={str(path)!r} lists {abbreviated(duplicates)} more than once: each class once, please'
    )
  return sorted(names)


def abbreviated(names: Sequence[str], limit: int = 5) -> str:
  """'a, b, c' or 'a, b, c, ... (12 in all)': names for a one-line message."""
  shown = ', '.join(names[:limit])
  return shown if len(names) <= limit else f'{shown}, ... ({len(names)} in all)'


def labelled_example(image: np.ndarray, label: int) -> dict[str, np.ndarray]:
  """The example dict every source returns: the image as given and the label as an int32 scalar."""
  return {'image': image, 'label': np.int32(label)}
