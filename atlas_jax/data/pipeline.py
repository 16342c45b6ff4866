"""The loader: global batches sliced per host, loaded on a thread pool, with a checkpointable position.

Batches are defined globally (docs/design.md, "Batches"): each training epoch is one permutation of
the whole split, drawn from (seed, epoch); global batch b of the run is examples
`order[j * B:(j + 1) * B]` of epoch `b // batches_per_epoch`, j = b % batches_per_epoch (the remainder of
an epoch is dropped, epochs go on forever). Process p of P takes the contiguous slice
`[p * B / P, (p + 1) * B / P)` of every global batch, so what a step sees does not depend on P.

The position of a TrainLoader is the number of batches it has returned; `get_state()` gives it as a dict of
0-d numpy int64 arrays (an orbax item as it is, and its own restore target), and `set_state` / `state=`
resumes at exactly the next batch, whatever the number of workers. Evaluation (`EvalLoader`,
`eval_batches`) visits every example once in index order and pads the last global batch, with a mask
marking the real examples.

Bad input never stops a run by itself (decode.BadImageError from the source: a truncated, empty or
unreadable file). Training replaces a bad example by the next example of the epoch's order that decodes (its
augmentation drawn for the bad example's place), so batches keep their size and depend only on the data,
never on thread timing, and resume stays exact. Evaluation masks a bad example out (zero image, mask False)
and counts it in `EvalLoader.skipped`, so every good example is counted exactly once. Each bad example is
logged with its path and a running count; the loader stops with TooManyBadExamples only when the bad
fraction exceeds `max_bad_fraction` (see BadExampleCounter). Any other error of a source still raises.

Batches are `{'image': float32 (B / P, H, W, 3) normalised with ImageNet's mean and std, 'label': int32
(B / P,)}` plus `'mask': bool (B / P,)` for evaluation, and `'size': int32 (B / P, 2)`, each image's valid
(height, width) at the top-left of its canvas, when the transform gives examples a 'size' (the train
transform with `data.augment.aspect='keep'`) or the loader pads images of their own sizes: an EvalLoader with
`canvas_multiple` (`data.resize='none'`) pads each batch to the largest height and width among its images,
each rounded up to a multiple of `canvas_multiple` (the model's patch times its window: whole windows), so a
split compiles one step per distinct canvas. Padding is zeros of the normalised image (the mean colour), and
a padding or bad row's size is the whole canvas. Such batches differ in shape between processes, so a
loader with `canvas_multiple` takes a single process. numpy, absl logging and the standard library only:
nothing here knows of models or JAX.
"""

import collections
import concurrent.futures
import dataclasses
import math
import threading
from typing import Any, Callable, Iterator, Mapping

from absl import logging
import numpy as np

from atlas_jax.data.decode import BadImageError
from atlas_jax.data.sources import DataSourceError
from atlas_jax.normalization import IMAGENET_MEAN, IMAGENET_STD, normalize_image  # noqa: F401

# Streams of the loader's random numbers; distinct first words keep them apart from the sources' streams.
_SHUFFLE_STREAM = 0x5348
_TRANSFORM_STREAM = 0x5452

# transform(example, rng) -> example, applied to a source's example before normalisation (augmentation,
# resizing); rng depends only on (seed, epoch, index). The image it returns must be uint8 (H, W, 3) of the
# same size for every example (any size with an EvalLoader's canvas_multiple); an optional 'size' (2,) is
# its valid (height, width).
Transform = Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]


class TooManyBadExamples(DataSourceError):
  """More of the data failed to decode than `data.max_bad_fraction` allows."""


class BadExampleCounter:
  """Counts decode attempts and bad examples of one loader, logs each bad one, stops when too many fail.

  Judging a running fraction early would stop a run on the luck of its first few files, so the fraction
  bad / attempted is judged only after 20 / max_bad_fraction attempts (at least 100): by then 20 bad
  examples are expected at the limit, and a source at half the limit crosses it with a probability below
  1%. A fraction that is certain is acted on at once: more distinct bad examples than max_bad_fraction of
  the whole split. Thread-safe.
  """

  MIN_ATTEMPTS = 100
  EXPECTED_BAD_AT_JUDGEMENT = 20

  def __init__(self, max_bad_fraction: float, num_examples: int):
    if not 0.0 <= max_bad_fraction <= 1.0:
      raise ValueError(f'max_bad_fraction must be in [0, 1], got {max_bad_fraction}')
    self.max_bad_fraction = float(max_bad_fraction)
    self.num_examples = int(num_examples)
    self.judged_after = (
      self.MIN_ATTEMPTS
      if max_bad_fraction == 0.0
      else max(self.MIN_ATTEMPTS, math.ceil(self.EXPECTED_BAD_AT_JUDGEMENT / max_bad_fraction))
    )
    self.attempted = 0
    self.bad = 0
    self.bad_indices: set[int] = set()
    self._lock = threading.Lock()

  def record_good(self) -> None:
    with self._lock:
      self.attempted += 1

  def record_bad(self, index: int, error: BadImageError) -> None:
    """Counts and logs a bad example; raises TooManyBadExamples when the fraction is over the limit."""
    with self._lock:
      self.attempted += 1
      self.bad += 1
      self.bad_indices.add(int(index))
      attempted, bad, distinct = self.attempted, self.bad, len(self.bad_indices)
    logging.warning(
      'skipping bad example %d, %s (%d bad of %d attempted so far)', index, error, bad, attempted
    )
    limit = self.max_bad_fraction
    if distinct > limit * self.num_examples:
      raise TooManyBadExamples(
        f'{distinct} of the {self.num_examples} examples failed to decode, more than '
        f'data.max_bad_fraction={limit} of the split; the last: {error}. Fix or remove the bad files, or '
        'raise --config.data.max_bad_fraction'
      )
    if attempted >= self.judged_after and bad > limit * attempted:
      raise TooManyBadExamples(
        f'{bad} of {attempted} examples loaded so far failed to decode ({bad / attempted:.2%}), more than '
        f'data.max_bad_fraction={limit}; the last: {error}. Fix or remove the bad files, or raise '
        '--config.data.max_bad_fraction'
      )


def host_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """The positions of a global batch that process `process_index` of `process_count` loads."""
  if global_batch_size < 1:
    raise ValueError(f'global_batch_size must be >= 1, got {global_batch_size}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index must be in [0, {process_count}), got {process_index}')
  if global_batch_size % process_count:
    raise ValueError(
      f'global batch size {global_batch_size} is not divisible by the process count '
      f'{process_count}: every process must load the same number of examples per batch'
    )
  host_batch_size = global_batch_size // process_count
  return slice(process_index * host_batch_size, (process_index + 1) * host_batch_size)


@dataclasses.dataclass
class _PendingBatch:
  """A host batch being loaded: its arrays fill in place as the futures finish."""

  number: int
  images: np.ndarray | list  # (B / P, H, W, 3) float32; with canvas_multiple each slot's (h, w, 3) or None
  labels: np.ndarray  # (B / P,) int32
  mask: np.ndarray  # (B / P,) bool
  sizes: np.ndarray | None  # (B / P, 2) int32 valid (height, width), when the batch has sizes
  futures: list[concurrent.futures.Future]


class _BatchLoader:
  """Loads numbered host batches from a plan, `prefetch` batches ahead on `workers` threads.

  Subclasses say which examples batch `number` holds (`_plan`). Every example is loaded, transformed and
  normalised by one task that writes into its slot of a preallocated batch, so the result does not depend
  on the number of workers or on the order the tasks finish in. Not safe to iterate from several threads.
  """

  def __init__(
    self,
    source,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    workers: int,
    prefetch: int,
    transform: Transform | None,
    num_batches: int | None,
    max_bad_fraction: float,
    canvas_multiple: int | None = None,
  ):
    if canvas_multiple is not None and (int(canvas_multiple) != canvas_multiple or canvas_multiple < 1):
      raise ValueError(f'canvas_multiple must be an integer >= 1, got {canvas_multiple!r}')
    if canvas_multiple is not None and process_count > 1:
      raise ValueError(
        'a loader with canvas_multiple (images at their own sizes) takes one process: each process would '
        'pad its slice of a batch to another canvas'
      )
    self.canvas_multiple = None if canvas_multiple is None else int(canvas_multiple)
    self.source = source
    self.global_batch_size = int(global_batch_size)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self._host_positions = host_slice(self.global_batch_size, self.process_index, self.process_count)
    self.host_batch_size = self.global_batch_size // self.process_count
    self.num_examples = len(source)
    if self.num_examples < 1:
      raise ValueError('the source has no examples')
    if workers < 0 or prefetch < 1:
      raise ValueError(f'need workers >= 0 and prefetch >= 1, got workers={workers}, prefetch={prefetch}')
    self.workers = int(workers)
    self.prefetch = int(prefetch)
    self.transform = transform
    self.bad_examples = BadExampleCounter(max_bad_fraction, self.num_examples)
    self._num_batches = num_batches  # None: never ends
    self._next_batch = 0  # the batch number the caller gets next
    self._in_flight: collections.deque[_PendingBatch] = collections.deque()
    self._closed = False
    # 0 or 1 worker: everything in the calling thread, nothing ahead.
    self._executor = (
      concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix='atlas_data')
      if self.workers > 1
      else None
    )
    self.image_shape, self.has_sizes = self._probe()

  # What a subclass defines.

  def _plan(self, number: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Batch `number` -> (source indices (B / P,) int64, real-example mask (B / P,) bool, epoch)."""
    raise NotImplementedError

  def _replacement(self, index: int, epoch: int, attempt: int) -> int | None:
    """The example that stands in for bad example `index` at its `attempt`-th (1, 2, ...) replacement, or None
    to leave the slot empty (masked out)."""
    raise NotImplementedError

  # Loading.

  def _probe(self) -> tuple[tuple[int, ...], bool]:
    """(the image shape of the batch arrays, whether batches carry 'size'), from the first good example."""
    shape = getattr(self.source, 'image_shape', None)
    if shape is not None and self.transform is None:
      return tuple(shape), self.canvas_multiple is not None
    # One throwaway example (the first that decodes): the batch arrays are allocated before any of their
    # examples is loaded.
    for index in range(self.num_examples):
      try:
        example = self._load_example(index, 0, index)
      except BadImageError as error:
        self.bad_examples.record_bad(index, error)
        continue
      self.bad_examples.record_good()
      return tuple(example['image'].shape), self.canvas_multiple is not None or 'size' in example
    raise TooManyBadExamples(f'none of the {self.num_examples} examples decodes; the data is unreadable')

  def _load_example(self, index: int, epoch: int, place: int) -> dict[str, Any]:
    """Example `index`, transformed with the rng of `place` (the index it stands in for, usually itself)."""
    example = self.source[int(index)]
    if self.transform is not None:
      rng = np.random.default_rng([_TRANSFORM_STREAM, self.seed, epoch, int(place)])
      example = self.transform(example, rng)
    return example

  def _load_good_example(self, index: int, epoch: int) -> dict[str, Any] | None:
    """Example `index`, or its replacement when it is bad; None when the slot is to be left empty."""
    candidate = index
    for attempt in range(1, self.num_examples + 1):
      try:
        example = self._load_example(candidate, epoch, index)
      except BadImageError as error:
        self.bad_examples.record_bad(candidate, error)
        candidate = self._replacement(index, epoch, attempt)
        if candidate is None:
          return None
        continue
      self.bad_examples.record_good()
      return example
    raise TooManyBadExamples(f'none of the {self.num_examples} examples decodes; the data is unreadable')

  def _fill_slot(self, batch: _PendingBatch, slot: int, index: int, epoch: int) -> None:
    example = self._load_good_example(index, epoch)
    if example is None:
      self._clear_slot(batch, slot)  # a bad example evaluation skips: zeros, label 0, masked out
      batch.labels[slot] = 0
      batch.mask[slot] = False
      self._skipped(index)
      return
    image = example['image']
    if self.canvas_multiple is not None:
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f'example {index} has image {image.dtype}{list(image.shape)}, not uint8 (h, w, 3)')
      batch.images[slot] = normalize_image(image)
      batch.sizes[slot] = image.shape[:2]
    else:
      if image.shape != self.image_shape or image.dtype != np.uint8:
        raise ValueError(
          f'example {index} has image {image.dtype}{list(image.shape)}, the batch takes '
          f'uint8{list(self.image_shape)}: every image of a batch must be uint8 of one size '
          '(resize in the source or the transform)'
        )
      normalize_image(image, out=batch.images[slot])
      if batch.sizes is not None:
        if 'size' not in example:
          raise ValueError(f'example {index} has no size, the other examples of the batch have one')
        batch.sizes[slot] = example['size']
    batch.labels[slot] = example['label']

  def _clear_slot(self, batch: _PendingBatch, slot: int) -> None:
    """An empty slot (padding or a bad example): zeros (the mean colour) over the whole canvas."""
    if self.canvas_multiple is not None:
      batch.images[slot] = None  # the canvas is known once the batch is loaded (_assemble)
    else:
      batch.images[slot] = 0.0
      if batch.sizes is not None:
        batch.sizes[slot] = self.image_shape[:2]

  def _assemble(self, batch: _PendingBatch) -> dict[str, np.ndarray]:
    """A loaded batch as the caller gets it; with canvas_multiple its images padded to one canvas."""
    images = batch.images
    if self.canvas_multiple is not None:
      multiple = self.canvas_multiple
      shapes = [image.shape[:2] for image in images if image is not None]
      canvas = tuple(
        -(-max((shape[axis] for shape in shapes), default=1) // multiple) * multiple for axis in (0, 1)
      )
      images = np.zeros((self.host_batch_size, *canvas, 3), np.float32)
      for slot, image in enumerate(batch.images):
        if image is None:
          batch.sizes[slot] = canvas
        else:
          images[slot, : image.shape[0], : image.shape[1]] = image
    result = {'image': images, 'label': batch.labels, 'mask': batch.mask}
    if batch.sizes is not None:
      result['size'] = batch.sizes
    return result

  def _start(self, number: int) -> _PendingBatch:
    indices, mask, epoch = self._plan(number)
    batch = _PendingBatch(
      number,
      [None] * self.host_batch_size
      if self.canvas_multiple is not None
      else np.empty((self.host_batch_size, *self.image_shape), np.float32),
      np.zeros((self.host_batch_size,), np.int32),
      mask,
      np.zeros((self.host_batch_size, 2), np.int32) if self.has_sizes else None,
      [],
    )
    for slot in range(self.host_batch_size):
      if not mask[slot]:
        self._clear_slot(batch, slot)  # padding: zeros (the mean colour), label 0, masked out
        continue
      if self._executor is None:
        self._fill_slot(batch, slot, indices[slot], epoch)
      else:
        batch.futures.append(self._executor.submit(self._fill_slot, batch, slot, indices[slot], epoch))
    return batch

  def _top_up(self) -> None:
    """Keeps batches [next, next + prefetch) in flight (fewer at the end of a finite pass)."""
    if self._executor is None:
      return
    following = self._in_flight[-1].number + 1 if self._in_flight else self._next_batch
    last = self._next_batch + self.prefetch
    if self._num_batches is not None:
      last = min(last, self._num_batches)
    for number in range(following, last):
      self._in_flight.append(self._start(number))

  def _skipped(self, index: int) -> None:
    """Notes that example `index` was left out of its batch (evaluation only)."""
    raise NotImplementedError

  def _discard_in_flight(self) -> None:
    while self._in_flight:
      for future in self._in_flight.popleft().futures:
        future.cancel()  # a running task finishes into arrays nobody keeps

  def _take_next(self) -> dict[str, np.ndarray]:
    if self._closed:
      raise RuntimeError('the loader is closed')
    number = self._next_batch
    if self._executor is None:
      batch = self._start(number)
    else:
      self._top_up()
      batch = self._in_flight[0]
      assert batch.number == number, (batch.number, number)
      try:
        for future in batch.futures:
          future.result()  # re-raises a worker's exception here, in the caller's thread
      except BaseException:
        self._discard_in_flight()  # a retry starts loading again from this batch
        raise
      self._in_flight.popleft()
    # Counted only once the batch is complete: a failed load leaves the position where it was.
    self._next_batch = number + 1
    self._top_up()
    return self._assemble(batch)

  # Lifetime.

  def close(self) -> None:
    """Stops the worker threads; the loader cannot be iterated afterwards."""
    if self._closed:
      return
    self._closed = True
    self._discard_in_flight()
    if self._executor is not None:
      self._executor.shutdown(wait=True, cancel_futures=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class TrainLoader(_BatchLoader):
  """Endless training batches of a source, this process's slice of each global batch; see the module doc.

  Args:
    source: random access to examples (`len`, `source[i] -> {'image': uint8 (H, W, 3), 'label': int}`),
      safe to call from several threads.
    global_batch_size: B, examples per step over all processes; divisible by `process_count`.
    seed: the shuffle (and transform) seed; permutation of epoch e from (seed, e) only.
    process_index, process_count: this process and how many share the batch (jax.process_index/count()).
    workers: loading threads; 0 or 1 loads in the calling thread.
    prefetch: batches loaded ahead of the caller when workers > 1.
    transform: optional `transform(example, rng) -> example` before normalisation (augmentation).
    state: a `get_state()` dict to resume from (as `set_state`).
    max_bad_fraction: the fraction of examples that may fail to decode before the loader stops
      (`data.max_bad_fraction`; required, as configs/common.py alone holds the defaults).
  Yields {'image': float32 (B / P, H, W, 3), 'label': int32 (B / P,)}, and 'size' int32 (B / P, 2) when the
  transform gives each example one.
  """

  def __init__(
    self,
    source,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
    prefetch: int = 2,
    transform: Transform | None = None,
    state: Mapping[str, Any] | None = None,
    *,
    max_bad_fraction: float,
  ):
    if len(source) < global_batch_size:
      raise ValueError(
        f'the source has {len(source)} examples, fewer than one global batch of '
        f'{global_batch_size}: lower the batch size or use a larger split'
      )
    self._permutations: dict[int, np.ndarray] = {}
    self._permutations_lock = threading.Lock()  # workers look up replacements in the epoch's order
    super().__init__(
      source,
      global_batch_size,
      seed,
      process_index,
      process_count,
      workers,
      prefetch,
      transform,
      num_batches=None,
      max_bad_fraction=max_bad_fraction,
    )
    self.batches_per_epoch = self.num_examples // self.global_batch_size
    if state is not None:
      self.set_state(state)

  def permutation(self, epoch: int) -> np.ndarray:
    """The order of the whole split in `epoch`: (num_examples,) int64, from (seed, epoch) only."""
    with self._permutations_lock:
      if epoch not in self._permutations:
        if len(self._permutations) >= 2:  # prefetching spans at most the current and the next epoch
          del self._permutations[min(self._permutations)]
        rng = np.random.default_rng([_SHUFFLE_STREAM, self.seed, epoch])
        self._permutations[epoch] = rng.permutation(self.num_examples)
      return self._permutations[epoch]

  def _plan(self, number):
    epoch, batch_in_epoch = divmod(number, self.batches_per_epoch)
    start = batch_in_epoch * self.global_batch_size
    global_indices = self.permutation(epoch)[start : start + self.global_batch_size]  # (B,)
    host_indices = global_indices[self._host_positions]  # (B / P,)
    return host_indices, np.ones((self.host_batch_size,), np.bool_), epoch

  def _replacement(self, index, epoch, attempt):
    # The example `attempt` places after the bad one in the epoch's order (wrapping around): what stands in
    # depends only on the data, not on which worker got there first.
    order = self.permutation(epoch)
    position = int(np.flatnonzero(order == index)[0])
    return int(order[(position + attempt) % self.num_examples])

  @property
  def batches_consumed(self) -> int:
    """Global batches already returned to the caller (prefetched ones not counted)."""
    return self._next_batch

  @property
  def epoch(self) -> int:
    """The epoch of the batch the caller gets next."""
    return self._next_batch // self.batches_per_epoch

  def get_state(self) -> dict[str, np.ndarray]:
    """The position, as 0-d numpy int64 arrays: a pytree orbax's StandardCheckpointHandler saves as it is
    and takes as its restore target (it refuses numpy scalars such as np.int64(3) as targets).

    `batches_consumed` is the position; the other entries are checked on restore, since another batch
    size, seed or split size would make the same position mean other examples.
    """
    values = {
      'batches_consumed': self._next_batch,
      'global_batch_size': self.global_batch_size,
      'num_examples': self.num_examples,
      'seed': self.seed,
    }
    return {key: np.asarray(value, np.int64) for key, value in values.items()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Resumes at `state` (from `get_state`, possibly through a checkpoint: numpy or JAX scalars)."""
    expected = {
      'global_batch_size': self.global_batch_size,
      'num_examples': self.num_examples,
      'seed': self.seed,
    }
    for key, value in expected.items():
      if key in state and int(np.asarray(state[key])) != value:
        raise ValueError(
          f'the loader state was saved with {key}={int(np.asarray(state[key]))}, this loader '
          f'has {key}={value}: the same position would be other examples'
        )
    batches_consumed = int(np.asarray(state['batches_consumed']))
    if batches_consumed < 0:
      raise ValueError(f'batches_consumed must be >= 0, got {batches_consumed}')
    self._discard_in_flight()
    self._next_batch = batches_consumed

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self._take_next()
    del batch['mask']  # every training example is real
    return batch


class EvalLoader(_BatchLoader):
  """Every example of a source once, in index order: `len(self)` batches of this process's slice.

  Global batch b holds examples [b * B, (b + 1) * B); positions past the end of the split are padding
  (zero image, label 0, mask False), so every process gets the same number of equally shaped batches. A bad
  example is masked out like padding and counted in `skipped`, so the masks of a pass add up to
  `len(source)` minus the bad examples of all processes. Each `iter(self)` is a fresh pass. Arguments as
  TrainLoader's; `seed` only seeds the transform's rng. `canvas_multiple` (an int, one process only): images
  of any size, each batch padded to its own canvas (module doc), with 'size'.
  Yields {'image': float32 (B / P, H, W, 3), 'label': int32 (B / P,), 'mask': bool (B / P,)} (and 'size').
  """

  def __init__(
    self,
    source,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
    prefetch: int = 2,
    transform: Transform | None = None,
    seed: int = 0,
    *,
    max_bad_fraction: float,
    canvas_multiple: int | None = None,
  ):
    num_batches = -(-len(source) // global_batch_size)
    self._skipped_indices: set[int] = set()
    self._skipped_lock = threading.Lock()
    super().__init__(
      source,
      global_batch_size,
      seed,
      process_index,
      process_count,
      workers,
      prefetch,
      transform,
      num_batches=num_batches,
      max_bad_fraction=max_bad_fraction,
      canvas_multiple=canvas_multiple,
    )

  def __len__(self) -> int:
    return self._num_batches

  def _plan(self, number):
    global_positions = number * self.global_batch_size + np.arange(self.global_batch_size)  # (B,)
    host_positions = global_positions[self._host_positions]  # (B / P,)
    mask = host_positions < self.num_examples
    return np.where(mask, host_positions, 0), mask, 0

  def _replacement(self, index, epoch, attempt):
    return None  # evaluation counts each good example once: no stand-ins

  def _skipped(self, index):
    with self._skipped_lock:
      self._skipped_indices.add(int(index))

  @property
  def skipped(self) -> int:
    """Bad examples this process masked out in the current (or last) pass."""
    with self._skipped_lock:
      return len(self._skipped_indices)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    self._discard_in_flight()
    self._next_batch = 0
    with self._skipped_lock:
      self._skipped_indices.clear()
    while self._next_batch < self._num_batches:
      yield self._take_next()


def eval_batches(
  source,
  global_batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  workers: int = 0,
  prefetch: int = 2,
  transform: Transform | None = None,
  *,
  max_bad_fraction: float,
  canvas_multiple: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """One pass of EvalLoader over `source`, its threads stopped when the pass ends or is abandoned."""
  with EvalLoader(
    source,
    global_batch_size,
    process_index,
    process_count,
    workers,
    prefetch,
    transform,
    max_bad_fraction=max_bad_fraction,
    canvas_multiple=canvas_multiple,
  ) as loader:
    yield from loader
