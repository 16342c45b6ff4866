"""Fingerprints of array trees: what a checkpoint records of each leaf, so a restore can tell damage.

A leaf's fingerprint is two 32-bit sums over its elements, each element's bits mixed with its position in
the array's logical (row-major) order:

  h1 = sum(word[i] * odd(i))            h2 = sum(mix(word[i] + mix(i)))       (mod 2**32)

`word` is the element's bits as uint32 (16- and 8-bit types widened), `mix` a 32-bit finaliser (murmur3's)
and `odd(i)` = mix(i) | 1. Addition mod 2**32 is exact and associative, so the sums do not depend on the
order they are added in, on how the array is split over devices or hosts, or on the storage backend: a
checkpoint written on 8 devices verifies on 1. Any change of one element changes h1 (an odd multiplier
keeps every nonzero difference nonzero mod 2**32); h2, nonlinear in the bits, makes changes that cancel in
h1 unlikely to cancel in both. It is a check against damage (flipped or lost bytes), not a cryptographic
hash.

Large leaves are summed where they are (one jitted program over them), so no host gathers a sharded array
and only 8 bytes a leaf come back. Small leaves, most leaves of most models, are summed on the host, shard by
shard at each shard's global positions: the same numbers, without compiling a program for them (compiling
one over a tree of a hundred small leaves costs seconds on a CPU, more than summing them).
"""

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)
# Leaves of at least this many elements are summed on their devices; smaller ones on the host.
DEVICE_MIN_ELEMENTS = 1 << 20


def _mix(value):
  """murmur3's 32-bit finaliser: every input bit flips about half the output bits (jax or numpy uint32)."""
  value = value ^ (value >> 16)
  value = value * np.uint32(0x85EBCA6B)
  value = value ^ (value >> 13)
  value = value * np.uint32(0xC2B2AE35)
  return value ^ (value >> 16)


def _words(leaf):
  """The leaf's elements as uint32 bit patterns, in its own shape (a trailing axis for 64-bit types)."""
  dtype = jnp.dtype(leaf.dtype)
  if dtype == jnp.bool_:
    return leaf.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[dtype.itemsize]
  return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32)


def _positions(shape):
  """Each element's row-major index (mod 2**32), built from per-axis iotas so no axis is reshaped: a
  sharded array keeps its sharding."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _leaf_sums(leaf):
  words = _words(leaf)
  position = _mix(_positions(words.shape) * _GOLDEN + np.uint32(1))
  first = jnp.sum(words * (position | np.uint32(1)), dtype=jnp.uint32)
  second = jnp.sum(_mix(words + position), dtype=jnp.uint32)
  return jnp.stack([first, second])


@jax.jit
def _device_sums(leaves):
  return [_leaf_sums(leaf) for leaf in leaves]


def _host_words(block: np.ndarray) -> np.ndarray:
  """As `_words`, for a host array (C order)."""
  block = np.ascontiguousarray(block)
  if block.dtype == np.bool_:
    return block.astype(np.uint32)
  if block.dtype.itemsize == 8:  # two words an element, low word first, as XLA's bitcast gives them
    return block.view(np.uint32).reshape(block.shape + (2,))
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[block.dtype.itemsize]
  return block.view(unsigned).astype(np.uint32)


def _host_block_sums(block: np.ndarray, start: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
  """The two sums over one block of an array of `shape` whose first element sits at `start`."""
  words = _host_words(block)
  if words.ndim > len(shape):  # the 64-bit types' trailing axis of two words
    start, shape = start + (0,), shape + (2,)
  index = np.zeros(words.shape, np.uint32)
  stride = 1
  for axis in reversed(range(words.ndim)):
    along = (np.arange(start[axis], start[axis] + words.shape[axis], dtype=np.uint64) % 2**32).astype(
      np.uint32
    )
    along = along.reshape([-1 if other == axis else 1 for other in range(words.ndim)])
    index += along * np.uint32(stride % 2**32)
    stride *= shape[axis]
  index, words = index.reshape(-1), words.reshape(-1)  # 1-D: numpy wraps arrays silently, not scalars
  position = _mix(index * _GOLDEN + np.uint32(1))
  first = np.sum(words * (position | np.uint32(1)), dtype=np.uint32)
  second = np.sum(_mix(words + position), dtype=np.uint32)
  return np.array([first, second], np.uint32)


def _host_sums(leaf) -> np.ndarray:
  """The leaf's two sums from the blocks this process holds: for a jax array, each addressable shard that
  is its first replica, at its global position; for anything else the whole value, converted as jax would
  convert it."""
  if not isinstance(leaf, jax.Array):
    array = np.asarray(leaf)
    array = array.astype(jax.dtypes.canonicalize_dtype(array.dtype))
    return _host_block_sums(array, (0,) * array.ndim, array.shape)
  sums = np.zeros(2, np.uint32)
  for shard in leaf.addressable_shards:
    if shard.replica_id != 0:
      continue
    start = tuple(index.start or 0 for index in shard.index) + (0,) * (leaf.ndim - len(shard.index))
    sums += _host_block_sums(np.asarray(shard.data), start, leaf.shape)  # uint32: wraps mod 2**32
  return sums


def _key_name(key) -> str:
  for attribute in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def leaf_path(path) -> str:
  """'a/b/kernel' for a jax key path."""
  return '/'.join(_key_name(key) for key in path)


def leaf_sums(leaves: list, device_min_elements: int = DEVICE_MIN_ELEMENTS) -> list[np.ndarray]:
  """The two sums of each leaf (jax or numpy arrays, numbers); every process of a multi-process run calls
  it with its part of the same global arrays and gets the same sums."""
  on_device = [
    index
    for index, leaf in enumerate(leaves)
    if isinstance(leaf, jax.Array) and leaf.size >= device_min_elements
  ]
  sums: list = [None] * len(leaves)
  if on_device:
    for index, pair in zip(on_device, jax.device_get(_device_sums([leaves[i] for i in on_device]))):
      sums[index] = np.asarray(pair, np.uint32)
  on_host = [index for index in range(len(leaves)) if sums[index] is None]
  # A global array's blocks are spread over the processes: their partial sums add up to the whole.
  spread = [
    index
    for index in on_host
    if isinstance(leaves[index], jax.Array) and not leaves[index].is_fully_addressable
  ]
  for index in on_host:
    sums[index] = _host_sums(leaves[index])
  if spread:
    partial = np.stack([sums[index] for index in spread])  # [leaves, 2]
    every_process = np.asarray(multihost_utils.process_allgather(partial))  # [processes, leaves, 2]
    for row, index in enumerate(spread):
      sums[index] = np.sum(every_process[:, row], axis=0, dtype=np.uint32)
  return sums


def fingerprints(tree) -> dict[str, str]:
  """{'a/b/kernel': '<16 hex digits>'} for every array leaf of `tree` (jax or numpy arrays, numbers)."""
  leaves_with_paths = jax.tree_util.tree_leaves_with_path(tree)
  paths = [leaf_path(path) for path, _ in leaves_with_paths]
  sums = leaf_sums([leaf for _, leaf in leaves_with_paths])
  return {path: f'{int(pair[0]):08x}{int(pair[1]):08x}' for path, pair in zip(paths, sums)}


def differing(recorded: dict[str, str], tree) -> list[str]:
  """The leaf paths of `tree` whose fingerprint differs from `recorded`'s, and recorded leaves it lacks."""
  found = fingerprints(tree)
  return sorted(path for path in set(recorded) | set(found) if recorded.get(path) != found.get(path))
