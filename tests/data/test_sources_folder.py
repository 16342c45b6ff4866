"""Tests for the image-folder source and the loader over real files: labels from sorted class names, the
class-list filter, one-line errors for a wrong layout, and bad files that are logged, replaced (training) or
masked (evaluation) without stopping the run, with batches that stay deterministic, resumable and sharded."""

import functools
import logging
import shutil

import numpy as np
from PIL import Image
import pytest

from atlas_jax.data import pipeline, sources
from atlas_jax.data.decode import BadImageError
from configs import common
from tests.data import image_files

CLASSES = ('n02000000', 'n01000000', 'n03000000')  # created in this order: labels follow sorted names
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = 3
SIDE = 16
MAX_PIXELS = 10_000_000
MAX_BAD_FRACTION = common.data_config().max_bad_fraction  # the config's: 1%
image_folder = functools.partial(sources.ImageFolder, max_pixels=MAX_PIXELS, max_decode_bytes=1 << 30)


def write_solid(path, value: int, shape=(12, 20)):
  """A PNG of one gray value: the value names the file in a decoded batch."""
  Image.fromarray(np.full((*shape, 3), value, np.uint8)).save(path)


def value_of(split: str, class_index: int, file_index: int) -> int:
  """The gray value of file `file_index` of class `class_index` (in CLASSES' order) of `split`."""
  return (1 if split == 'val' else 100) + 30 * class_index + file_index


@pytest.fixture(scope='module')
def clean(tmp_path_factory):
  """train/<class>/ and val/<class>/ of solid images whose value names each file, plus files to ignore."""
  root = tmp_path_factory.mktemp('clean')
  for split, count in (('train', TRAIN_PER_CLASS), ('val', VAL_PER_CLASS)):
    for class_index, name in enumerate(CLASSES):
      directory = root / split / name
      directory.mkdir(parents=True)
      for file_index in range(count):
        write_solid(directory / f'img_{file_index}.png', value_of(split, class_index, file_index))
      (directory / '.hidden.png').write_bytes(b'')  # hidden: ignored
      (directory / 'notes.txt').write_text('not an image suffix')  # ignored
  (root / 'train' / '.cache').mkdir()  # hidden folder: not a class
  return root


def solid_value(image: np.ndarray) -> int:
  """The gray value of a normalised solid image of a batch."""
  red = image[..., 0] * pipeline.IMAGENET_STD[0] + pipeline.IMAGENET_MEAN[0]
  return int(round(float(red.mean()) * 255))


def resize_and_flip(example, rng):
  """A stand-in for the train transform: a fixed size, and a random flip that shows the rng in use."""
  image = Image.fromarray(example['image']).resize((SIDE, SIDE), Image.Resampling.NEAREST)
  image = np.asarray(image)
  if rng.random() < 0.5:
    image = image[:, ::-1]
  return {'image': np.ascontiguousarray(image), 'label': example['label']}


def batch_values(batch) -> list[int]:
  return [solid_value(image) for image in batch['image']]


def test_labels_are_the_sorted_class_names(clean):
  train = image_folder(clean, 'train')
  val = image_folder(clean, 'validation')
  assert train.classes == val.classes == sorted(CLASSES)
  assert len(train) == 3 * TRAIN_PER_CLASS and len(val) == 3 * VAL_PER_CLASS
  for source, split in ((train, 'train'), (val, 'val')):
    for index in range(len(source)):
      example = source[index]
      class_name = source.path(index).parent.name
      assert example['label'] == sorted(CLASSES).index(class_name) and example['label'].dtype == np.int32
      assert example['image'].shape == (12, 20, 3)  # as decoded: not resized
      file_index = int(source.path(index).stem.split('_')[1])
      assert example['image'][0, 0, 0] == value_of(split, CLASSES.index(class_name), file_index)


def test_a_class_list_filters_and_numbers_the_classes(clean, tmp_path):
  class_list = tmp_path / 'classes.txt'
  class_list.write_text('# two of the three\nn03000000\n\nn02000000  # trailing comment\n')
  source = sources.make_source(
    _data_config(clean, classes=str(class_list)), 32, 'validation', 0, num_classes=2
  )
  assert source.classes == ['n02000000', 'n03000000'] and len(source) == 2 * VAL_PER_CLASS
  assert sorted(set(source.labels.tolist())) == [0, 1]
  assert all(source.path(i).parent.name == source.classes[source.labels[i]] for i in range(len(source)))


def _data_config(data_dir, **fields):
  return type(
    'DataConfig',
    (),
    {
      'source': 'folder',
      'data_dir': str(data_dir),
      'classes': None,
      'max_pixels': MAX_PIXELS,
      'max_decode_bytes': 1 << 30,
      **fields,
    },
  )()


def one_line_error(function, *args, **kwargs) -> str:
  with pytest.raises(sources.DataSourceError) as caught:
    function(*args, **kwargs)
  message = str(caught.value)
  assert '\n' not in message
  return message


def test_a_wrong_layout_gets_one_line_saying_what_to_do(clean, tmp_path):
  message = one_line_error(image_folder, tmp_path / 'nowhere', 'train')
  assert 'is not a directory' in message and '--config.data.data_dir' in message
  (tmp_path / 'only_train' / 'train' / 'a').mkdir(parents=True)
  assert 'no val/ folder' in one_line_error(image_folder, tmp_path / 'only_train', 'validation')
  assert 'holds no image files' in one_line_error(image_folder, tmp_path / 'only_train', 'train')

  stray = tmp_path / 'stray'
  shutil.copytree(clean, stray)
  (stray / 'val' / 'n09999999').mkdir()
  write_solid(stray / 'val' / 'n09999999' / 'x.png', 3)
  message = one_line_error(image_folder, stray, 'validation')
  assert 'n09999999' in message and 'train/ lacks' in message

  listed = tmp_path / 'listed.txt'
  listed.write_text('n01000000\nn05555555\n')
  assert 'n05555555' in one_line_error(image_folder, clean, 'train', classes_file=listed)
  listed.write_text('n01000000\nn01000000\n')
  assert 'more than once' in one_line_error(image_folder, clean, 'train', classes_file=listed)
  assert 'not a file' in one_line_error(image_folder, clean, 'train', classes_file=tmp_path / 'no.txt')
  message = one_line_error(sources.make_source, _data_config(clean), 32, 'train', 0, num_classes=2)
  assert 'has 3 classes but model.num_classes is 2' in message


def test_same_seed_same_batches_and_resume_is_exact(clean):
  source = image_folder(clean, 'train')  # 24 examples: 4 batches of 6 per epoch
  with pipeline.TrainLoader(
    source, 6, seed=3, transform=resize_and_flip, max_bad_fraction=MAX_BAD_FRACTION
  ) as loader:
    uninterrupted = [next(loader) for _ in range(6)]
  with pipeline.TrainLoader(
    source, 6, seed=3, workers=3, transform=resize_and_flip, max_bad_fraction=MAX_BAD_FRACTION
  ) as loader:
    for expected in uninterrupted[:2]:
      np.testing.assert_array_equal(next(loader)['image'], expected['image'])
    state = loader.get_state()
  with pipeline.TrainLoader(
    source, 6, seed=3, workers=2, transform=resize_and_flip, state=state, max_bad_fraction=MAX_BAD_FRACTION
  ) as resumed:
    for expected in uninterrupted[2:]:
      batch = next(resumed)
      np.testing.assert_array_equal(batch['image'], expected['image'])
      np.testing.assert_array_equal(batch['label'], expected['label'])
  epoch = sorted(value for batch in uninterrupted[:4] for value in batch_values(batch))
  assert epoch == sorted(value_of('train', c, f) for c in range(3) for f in range(TRAIN_PER_CLASS))
  with pipeline.TrainLoader(
    source, 6, seed=4, transform=resize_and_flip, max_bad_fraction=MAX_BAD_FRACTION
  ) as other_seed:
    assert batch_values(next(other_seed)) != batch_values(uninterrupted[0])


def test_two_hosts_shards_are_disjoint_and_cover_the_epoch(clean):
  source = image_folder(clean, 'train')
  seen = {}
  for process_index in (0, 1):
    with pipeline.TrainLoader(
      source,
      8,
      seed=5,
      process_index=process_index,
      process_count=2,
      transform=resize_and_flip,
      max_bad_fraction=MAX_BAD_FRACTION,
    ) as loader:
      seen[process_index] = [value for _ in range(3) for value in batch_values(next(loader))]  # one epoch
  assert len(seen[0]) == len(seen[1]) == 12
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(
    value_of('train', c, f) for c in range(3) for f in range(TRAIN_PER_CLASS)
  )


def test_eval_counts_every_example_once_over_two_hosts(clean):
  source = image_folder(clean, 'validation')  # 9 examples, batches of 4: 3 batches
  counted = []
  for process_index in (0, 1):
    for batch in pipeline.eval_batches(
      source, 4, process_index, 2, transform=resize_and_flip, max_bad_fraction=MAX_BAD_FRACTION
    ):
      counted += [value for value, real in zip(batch_values(batch), batch['mask']) if real]
  assert sorted(counted) == sorted(value_of('val', c, f) for c in range(3) for f in range(VAL_PER_CLASS))


@pytest.fixture(scope='module')
def broken(tmp_path_factory):
  """train/ and val/ with every kind of good and broken file: class n_good holds the odd but valid ones,
  n_mixed the broken ones beside four solid images."""
  root = tmp_path_factory.mktemp('broken')
  for split in ('train', 'val'):
    good, mixed = root / split / 'n_good', root / split / 'n_mixed'
    zoo = image_files.write_zoo(good)
    mixed.mkdir()
    for kind in image_files.BAD_KINDS:
      zoo[kind].rename(mixed / zoo[kind].name)
    for file_index in range(4):
      write_solid(mixed / f'solid_{file_index}.png', 200 + file_index)
  return root


def test_bad_files_are_logged_and_replaced_in_training(broken, caplog):
  source = image_folder(broken, 'train')  # 11 good kinds, 4 solid, 4 broken: 19
  bad = {index for index in range(len(source)) if source.path(index).stem in image_files.BAD_KINDS}
  assert len(source) == 19 and len(bad) == len(image_files.BAD_KINDS)
  for index in range(len(source)):  # the source itself raises, one line each
    if index in bad:
      with pytest.raises(BadImageError):
        source[index]
  with caplog.at_level(logging.WARNING):
    with pipeline.TrainLoader(
      source, 4, seed=0, workers=2, transform=resize_and_flip, max_bad_fraction=0.5
    ) as loader:
      batches = [next(loader) for _ in range(9)]  # two epochs of 4 full batches, and one more
      counter = loader.bad_examples
  assert all(batch['image'].shape == (4, SIDE, SIDE, 3) for batch in batches)
  assert counter.bad_indices == bad and counter.bad >= len(bad)
  logged = [record.getMessage() for record in caplog.records if 'skipping bad example' in record.getMessage()]
  assert len(logged) == counter.bad
  for path in (source.path(index) for index in bad):
    assert any(str(path) in message for message in logged)
  assert any(f'({counter.bad} bad of' in message for message in logged)  # the running count
  with pipeline.TrainLoader(source, 4, seed=0, transform=resize_and_flip, max_bad_fraction=0.5) as loader:
    loader.set_state({'batches_consumed': np.asarray(5)})
    for expected in batches[5:]:
      np.testing.assert_array_equal(next(loader)['image'], expected['image'])


def test_eval_masks_bad_files_and_counts_each_good_one_once(broken):
  source = image_folder(broken, 'validation')
  with pipeline.EvalLoader(source, 4, workers=2, transform=resize_and_flip, max_bad_fraction=0.5) as loader:
    masks = [batch['mask'].copy() for batch in loader]
    assert loader.skipped == len(image_files.BAD_KINDS)
  assert sum(int(mask.sum()) for mask in masks) == len(source) - len(image_files.BAD_KINDS)


def test_too_many_bad_files_stop_with_one_line(broken):
  source = image_folder(broken, 'train')
  with pytest.raises(pipeline.TooManyBadExamples) as caught:
    with pipeline.TrainLoader(
      source, 4, seed=0, transform=resize_and_flip, max_bad_fraction=0.01
    ) as loader:  # limit 1%
      for _ in range(4):  # 16 of the 19 examples: at least one of the 4 bad ones
        next(loader)
  message = str(caught.value)
  assert '\n' not in message and 'data.max_bad_fraction=0.01' in message and 'of the 19 examples' in message


def test_symlinks_that_do_not_resolve_are_skipped_and_loops_not_followed(clean, tmp_path, caplog):
  """A looping or broken file link is skipped with one warning (not a bad example); a folder link that
  loops back up is never followed; a class left with only such links, or a class link that loops, is one
  line."""
  root = tmp_path / 'links'
  shutil.copytree(clean, root)
  class_dir = root / 'train' / CLASSES[0]
  (class_dir / 'loop.png').symlink_to('loop.png')  # ELOOP: is_file() raises
  (class_dir / 'broken.jpg').symlink_to('nowhere.jpg')
  (class_dir / 'up').symlink_to('..')  # a folder loop: class folders are read one level deep
  (class_dir / 'up.png').symlink_to('.')  # a folder with an image suffix: not a file
  with caplog.at_level(logging.WARNING):
    source = image_folder(root, 'train')
  assert len(source) == 3 * TRAIN_PER_CLASS and source.classes == sorted(CLASSES)
  assert all(source.path(i).name.startswith('img_') for i in range(len(source)))
  warnings = [record.getMessage() for record in caplog.records if 'do not resolve' in record.getMessage()]
  assert len(warnings) == 1 and '2 symlinks' in warnings[0], warnings

  only_links = root / 'val' / CLASSES[1]
  for path in only_links.iterdir():
    path.unlink()
  (only_links / 'self.png').symlink_to('self.png')
  message = one_line_error(image_folder, root, 'validation')
  assert str(only_links) in message and 'self.png' in message and 'fix or remove them' in message

  (root / 'val' / 'n04000000').symlink_to('n04000000')  # a class folder that is a loop
  message = one_line_error(image_folder, root, 'validation')
  assert str(root / 'val' / 'n04000000') in message and 'does not resolve' in message
