"""Tests for atlas_jax.data.pipeline: global batches sliced per process, determinism across workers, resume
from get_state (also through an orbax checkpoint), epochs, and evaluation's single padded pass."""

import functools
import os
import pathlib
import subprocess
import sys
import threading

import numpy as np
import pytest

from atlas_jax.data import pipeline
from atlas_jax.data.sources import SyntheticLongRange
from configs import common

# The loaders take data.max_bad_fraction from the caller (configs/common.py holds the default): the config's.
MAX_BAD_FRACTION = common.data_config().max_bad_fraction
train_loader = functools.partial(pipeline.TrainLoader, max_bad_fraction=MAX_BAD_FRACTION)
eval_loader = functools.partial(pipeline.EvalLoader, max_bad_fraction=MAX_BAD_FRACTION)
eval_batches = functools.partial(pipeline.eval_batches, max_bad_fraction=MAX_BAD_FRACTION)


class IndexedSource:
  """Example i: a 4x6 image filled with i % 256 and label i, so a batch's labels name its examples."""

  def __init__(self, size: int, fail_at: int | None = None):
    self.size = size
    self.fail_at = fail_at

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    if index == self.fail_at:
      raise OSError(f'cannot read example {index}')
    return {'image': np.full((4, 6, 3), index % 256, np.uint8), 'label': np.int32(index)}


def take(loader, count):
  return [next(loader) for _ in range(count)]


def labels_of(batches):
  return [batch['label'].tolist() for batch in batches]


def test_batches_are_normalised_images_and_labels():
  source = SyntheticLongRange((32, 48), 40, seed=1)
  with train_loader(source, 8, seed=0) as loader:
    batch = next(loader)
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (8, 32, 48, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  index = int(train_loader(source, 8, seed=0).permutation(0)[0])
  raw = source[index]['image'] / 255.0
  expected = (raw - np.array(pipeline.IMAGENET_MEAN)) / np.array(pipeline.IMAGENET_STD)
  np.testing.assert_allclose(batch['image'][0], expected, rtol=1e-5, atol=1e-5)
  assert batch['label'][0] == source[index]['label']


def test_epochs_are_permutations_with_the_remainder_dropped():
  source = IndexedSource(30)  # 3 batches of 8 per epoch, 6 examples dropped
  loader = train_loader(source, 8, seed=4)
  assert loader.batches_per_epoch == 3
  epochs = []
  for epoch in range(3):
    assert loader.epoch == epoch
    labels = np.concatenate([batch['label'] for batch in take(loader, 3)])
    assert len(set(labels.tolist())) == 24
    np.testing.assert_array_equal(labels, loader.permutation(epoch)[:24])
    epochs.append(labels)
  assert loader.epoch == 3 and loader.batches_consumed == 9
  assert not np.array_equal(epochs[0], epochs[1])
  same_seed = train_loader(source, 8, seed=4)
  other_seed = train_loader(source, 8, seed=5)
  np.testing.assert_array_equal(same_seed.permutation(1), loader.permutation(1))
  assert not np.array_equal(other_seed.permutation(0), loader.permutation(0))


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_slices_concatenate_to_the_single_process_batch(process_count):
  source = IndexedSource(50)  # 6 batches of 8 per epoch: 8 batches cross an epoch boundary
  single = labels_of(take(train_loader(source, 8, seed=1), 8))
  per_process = [
    labels_of(take(train_loader(source, 8, seed=1, process_index=p, process_count=process_count), 8))
    for p in range(process_count)
  ]
  for step in range(8):
    slices = [per_process[p][step] for p in range(process_count)]
    assert all(len(part) == 8 // process_count for part in slices)
    assert sum(slices, []) == single[step]


def test_batch_size_must_divide_among_processes():
  with pytest.raises(ValueError, match='not divisible by the process count 4'):
    train_loader(IndexedSource(50), 6, seed=0, process_index=0, process_count=4)
  with pytest.raises(ValueError, match='not divisible'):
    eval_loader(IndexedSource(50), 6, process_index=1, process_count=4)
  with pytest.raises(ValueError, match='process_index'):
    train_loader(IndexedSource(50), 8, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match='fewer than one global batch'):
    train_loader(IndexedSource(5), 8, seed=0)


def test_workers_do_not_change_the_batches():
  source = SyntheticLongRange(32, 64, seed=2)
  with (
    train_loader(source, 8, seed=3, workers=0) as serial,
    train_loader(source, 8, seed=3, workers=3, prefetch=3) as threaded,
  ):
    for _ in range(10):  # 10 batches: past the end of epoch 0 (8 batches)
      expected, actual = next(serial), next(threaded)
      assert expected['image'].tobytes() == actual['image'].tobytes()
      np.testing.assert_array_equal(expected['label'], actual['label'])


@pytest.mark.parametrize('workers', [0, 3])
def test_resume_from_state_gives_the_same_next_batches(workers):
  source = IndexedSource(37)  # 4 batches of 8 per epoch
  uninterrupted = train_loader(source, 8, seed=7, workers=3, prefetch=2)
  take(uninterrupted, 3)
  state = uninterrupted.get_state()  # prefetched batches are not counted
  assert int(state['batches_consumed']) == 3
  assert all(
    isinstance(value, np.ndarray) and value.shape == () and value.dtype == np.int64
    for value in state.values()
  )
  expected = labels_of(take(uninterrupted, 6))
  resumed = train_loader(source, 8, seed=7, workers=workers, state=state)
  assert resumed.batches_consumed == 3 and resumed.epoch == 0
  assert labels_of(take(resumed, 6)) == expected
  # set_state on a loader that has batches in flight drops them and starts over at the state.
  uninterrupted.set_state(state)
  assert labels_of(take(uninterrupted, 6)) == expected
  uninterrupted.close()
  resumed.close()


def test_state_through_an_orbax_checkpoint(tmp_path):
  import jax

  from atlas_jax import checkpointing

  source = IndexedSource(40)
  loader = train_loader(source, 8, seed=1)
  take(loader, 7)
  state = loader.get_state()
  expected = labels_of(take(loader, 2))
  checkpoints = checkpointing.Checkpoints(tmp_path)
  checkpoints.save(7, {'data': state})
  checkpoints.wait()
  # Either a fresh loader's state or its shapes and dtypes serve as the restore target.
  fresh_state = train_loader(source, 8, seed=1).get_state()
  abstract = jax.tree.map(lambda value: jax.ShapeDtypeStruct(value.shape, value.dtype), fresh_state)
  for target in (fresh_state, abstract):
    restored = checkpoints.restore(7, {'data': target})['data']
    resumed = train_loader(source, 8, seed=1, state=restored)
    assert resumed.batches_consumed == 7 and resumed.epoch == 1
    assert labels_of(take(resumed, 2)) == expected
  checkpoints.close()


def test_a_state_from_another_setup_is_refused():
  state = train_loader(IndexedSource(40), 8, seed=1).get_state()
  with pytest.raises(ValueError, match='global_batch_size=8'):
    train_loader(IndexedSource(40), 4, seed=1, state=state)
  with pytest.raises(ValueError, match='seed=1'):
    train_loader(IndexedSource(40), 8, seed=2, state=state)
  # The position alone is accepted: the caller takes responsibility for the rest.
  loader = train_loader(IndexedSource(40), 4, seed=1, state={'batches_consumed': 3})
  assert loader.batches_consumed == 3


def test_transform_gets_an_rng_of_seed_epoch_and_index():
  def flip_sometimes(example, rng):
    image = example['image']
    if rng.random() < 0.5:
      image = image[:, ::-1]
    return {**example, 'image': np.ascontiguousarray(image)}

  source = SyntheticLongRange(32, 24, seed=0)
  serial = train_loader(source, 8, seed=5, transform=flip_sometimes)
  expected = [batch['image'].tobytes() for batch in take(serial, 5)]
  threaded = train_loader(
    source, 8, seed=5, workers=3, transform=flip_sometimes, state={'batches_consumed': np.int64(2)}
  )
  assert [batch['image'].tobytes() for batch in take(threaded, 3)] == expected[2:]
  threaded.close()


def test_a_failed_load_raises_in_the_caller_and_does_not_advance():
  source = IndexedSource(16, fail_at=3)
  order = train_loader(source, 4, seed=0).permutation(0)
  failing_batch = int(np.nonzero(order == 3)[0][0]) // 4
  with train_loader(source, 4, seed=0, workers=2) as loader:
    take(loader, failing_batch)
    with pytest.raises(OSError, match='example 3'):
      next(loader)
    assert loader.batches_consumed == failing_batch
    with pytest.raises(OSError):  # a retry loads the same batch again
      next(loader)


def test_close_stops_the_threads():
  threads_before = threading.active_count()
  loader = train_loader(IndexedSource(40), 8, seed=0, workers=3)
  next(loader)
  loader.close()
  loader.close()
  assert threading.active_count() == threads_before
  with pytest.raises(RuntimeError, match='closed'):
    next(loader)


@pytest.mark.parametrize('process_count', [1, 2, 4])
@pytest.mark.parametrize('workers', [0, 3])
def test_eval_visits_every_example_once_in_order(process_count, workers):
  source = IndexedSource(23)  # 3 global batches of 8, the last with 7 padding slots
  real_labels = []
  for process_index in range(process_count):
    batches = list(eval_batches(source, 8, process_index, process_count, workers=workers))
    assert len(batches) == 3
    for batch in batches:
      assert batch['image'].shape == (8 // process_count, 4, 6, 3)
      assert batch['mask'].dtype == np.bool_ and batch['mask'].shape == (8 // process_count,)
      padding = ~batch['mask']
      assert np.all(batch['image'][padding] == 0) and np.all(batch['label'][padding] == 0)
    real_labels.append([batch['label'][batch['mask']].tolist() for batch in batches])
  # Per global batch, the processes' real examples in process order are its examples in index order.
  in_order = [sum((real_labels[p][step] for p in range(process_count)), []) for step in range(3)]
  assert sum(in_order, []) == list(range(23))


def test_eval_loader_passes_again_and_has_a_length():
  with eval_loader(IndexedSource(10), 4, workers=2) as loader:
    assert len(loader) == 3
    first = labels_of(loader)
    assert labels_of(loader) == first


def test_the_bad_fraction_has_no_default_in_code():
  # configs/common.py alone holds data.max_bad_fraction's default: a loader without it is a caller's bug.
  with pytest.raises(TypeError, match='max_bad_fraction'):
    pipeline.TrainLoader(IndexedSource(40), 8, seed=0)
  with pytest.raises(TypeError, match='max_bad_fraction'):
    pipeline.EvalLoader(IndexedSource(40), 8)


def test_the_data_package_imports_no_model_or_jax():
  code = (
    'import sys, atlas_jax.data; '
    'print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "tensorflow") '
    'or m.startswith("atlas_jax.models")))'
  )
  repo_root = str(pathlib.Path(__file__).resolve().parents[2])
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [repo_root, os.environ.get('PYTHONPATH')]))}
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, env=env)
  assert result.stdout.strip() == '[]'
