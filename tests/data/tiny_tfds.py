"""A tiny real tensorflow-datasets dataset, prepared in a test's directory without TensorFlow.

`prepare(data_dir, file_format)` runs tfds's own preparation (GeneratorBasedBuilder.download_and_prepare)
of `TinyClasses`: three classes named like WordNet IDs and listed unsorted in the label feature, 32x40 PNG
images whose pixel value names the example, a `file_name` feature as imagenet2012 has, and one truncated
JPEG. ArrayRecord preparation needs no TensorFlow. TFRecord preparation does, only to frame the records
(tf.io.TFRecordWriter): here tfds's TFRecord writer is swapped for the same framing written with the tfds
source's own masked CRC-32C, and everything else (serialization, shard naming, dataset_info.json) is tfds's.
"""

import contextlib
import struct

import numpy as np

from atlas_jax.data.sources.tfds import masked_crc32c
from tests.data import image_files

NAME = 'tiny_classes'
CLASS_NAMES = ('n03000134', 'n01440764', 'n02102040')  # the dataset's label order: not sorted
SPLIT_SIZES = {'train': 9, 'validation': 6}
BAD_TRAIN_RECORD = 4  # its image is a truncated JPEG
IMAGE_SHAPE = (32, 40, 3)


def example_value(split: str, index: int) -> int:
  """The pixel value of example `index` of `split`: names the example in the decoded image."""
  return 10 * index + (5 if split == 'validation' else 0)


def examples(split: str):
  """(key, {'image': encoded bytes, 'label': dataset label id, 'file_name': str}) of a split."""
  for index in range(SPLIT_SIZES[split]):
    label = index % len(CLASS_NAMES)
    if split == 'train' and index == BAD_TRAIN_RECORD:
      jpeg = image_files.encode(np.full(IMAGE_SHAPE, 50, np.uint8), 'JPEG')
      image = jpeg[: len(jpeg) // 2]
    else:
      image = image_files.encode(np.full(IMAGE_SHAPE, example_value(split, index), np.uint8), 'PNG')
    yield index, {'image': image, 'label': label, 'file_name': f'{CLASS_NAMES[label]}_{split}_{index}.png'}


def _builder_class():
  from etils import epath  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  class TinyClasses(tfds.core.GeneratorBasedBuilder):
    """Three classes of solid images; see the module doc."""

    VERSION = tfds.core.Version('1.0.0')
    # tfds derives this from the module's package, and for a namespace package (tests/ has no __init__.py)
    # it needs importlib_resources, which it does not install.
    code_path = epath.Path(__file__)

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=list(CLASS_NAMES)),
            'file_name': tfds.features.Text(),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      return {split: examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self):
      raise NotImplementedError  # the splits above are generators already

  return TinyClasses


_BUILDER = None


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC-32C of the length, data, masked CRC-32C of the data."""
  length = struct.pack('<Q', len(data))
  return length + struct.pack('<I', masked_crc32c(length)) + data + struct.pack('<I', masked_crc32c(data))


@contextlib.contextmanager
def _tfrecord_framing_without_tensorflow():
  from tensorflow_datasets.core import file_adapters  # pylint: disable=import-outside-toplevel

  adapter = file_adapters.TfRecordFileAdapter
  original = adapter.__dict__['write_examples']

  def write_examples(cls, path, iterator):
    with open(path, 'wb') as stream:
      for _, serialized in iterator:
        stream.write(tfrecord(serialized))

  adapter.write_examples = classmethod(write_examples)
  try:
    yield
  finally:
    adapter.write_examples = original


def prepare(data_dir, file_format: str = 'array_record'):
  """Prepares the dataset into `data_dir` (tfds layout: data_dir/tiny_classes/1.0.0/...)."""
  global _BUILDER
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  tfds.disable_progress_bar()
  if _BUILDER is None:
    _BUILDER = _builder_class()
  builder = _BUILDER(data_dir=str(data_dir), file_format=file_format)
  with _tfrecord_framing_without_tensorflow() if file_format == 'tfrecord' else contextlib.nullcontext():
    builder.download_and_prepare()
  return builder
