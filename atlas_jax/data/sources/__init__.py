"""Data sources: random access by index, `source[i] -> {'image': uint8 (H, W, 3), 'label': int32 scalar}`.

A source is any object with `__len__` and `__getitem__(index)`; the loader (pipeline.py) does the shuffling,
sharding and batching, so a source only has to be deterministic per index and safe to call from threads.

`SyntheticLongRange` (synthetic.py) is the built-in task that needs long-range communication
(docs/synthetic_task.md): two coloured squares far apart, the label whether their colours differ and whether
they lie in different halves of the whole image (two XORs), which no sum of per-window evidence can
represent. It needs no files, works at any resolution and renders an example in about a millisecond per
megapixel.

Real data: `ImageFolder` (folder.py: `<data_dir>/train/<class>/...`, `<data_dir>/val/<class>/...`, any
format PIL reads) and `TfdsSource` (tfds.py: a prepared tensorflow-datasets dataset, ArrayRecord or TFRecord,
read without TensorFlow). Both return images as decoded (decode.py: RGB, EXIF orientation applied, at their
stored size, reduced only above data.max_pixels); the loader's transform resizes them. Both number the
classes in sorted order of their names, optionally only those of a class-list file (`data.classes`), so the
same class gets the same label from either. A file that cannot be decoded raises decode.BadImageError, which
the loader counts and replaces.

`make_source(config.data, image_size, split, seed)` picks a source by `data.source`; a source that cannot be
built (no data where the config points, a val class missing from train, ...) raises DataSourceError with
one line saying what to do. What the sources share (common.py) is re-exported here.
"""

from typing import Any, Callable, Sequence

from atlas_jax.data.sources import folder, synthetic, tfds
from atlas_jax.data.sources.common import (
  HR_IN100_CLASSES,
  SPLITS,
  DataSourceError,
  abbreviated,
  image_size_pair,
  labelled_example,
  read_class_list,
)
from atlas_jax.data.sources.folder import ImageFolder
from atlas_jax.data.sources.synthetic import LongRangeExample, SyntheticLongRange
from atlas_jax.data.sources.tfds import TfdsSource

__all__ = [
  'HR_IN100_CLASSES',
  'SOURCE_BUILDERS',
  'SPLITS',
  'DataSourceError',
  'ImageFolder',
  'LongRangeExample',
  'SyntheticLongRange',
  'TfdsSource',
  'abbreviated',
  'image_size_pair',
  'labelled_example',
  'make_source',
  'read_class_list',
]

# data.source -> builder(data_config, image_size, split, seed); a new source is one more entry here.
SOURCE_BUILDERS: dict[str, Callable[..., Any]] = {
  'synthetic': synthetic.from_config,
  'tfds': tfds.from_config,
  'folder': folder.from_config,
}


def make_source(
  data_config, image_size: int | Sequence[int], split: str, seed: int, num_classes: int | None = None
):
  """The source named by `data_config.source` for `split` ('train' or 'validation'), images of `image_size`.

  `data_config` is a resolved `config.data` (a ConfigDict or any object with its attributes): every field
  the chosen source reads must be there, since configs/common.py alone holds the defaults. `num_classes`,
  when given, is the model's head: a source with more classes is refused. Raises DataSourceError with a
  one-line fix when the source cannot be built.
  """
  if split not in SPLITS:
    raise DataSourceError(f'split must be one of {SPLITS}, got {split!r}')
  name = data_config.source
  builder = SOURCE_BUILDERS.get(name)
  if builder is None:
    raise DataSourceError(f'unknown data.source={name!r}; known: {", ".join(SOURCE_BUILDERS)}')
  source = builder(data_config, image_size_pair(image_size), split, seed)
  if num_classes is not None and source.num_classes > num_classes:  # labels past the head: silently lost
    raise DataSourceError(
      f'data.source={name!r} has {source.num_classes} classes but model.num_classes is '
      f'{num_classes}: set --config.model.num_classes={source.num_classes}, or filter '
      'the classes with --config.data.classes=FILE'
    )
  return source
