"""Fingerprints of array trees: what a checkpoint records of each leaf, so a restore can tell damage.

A leaf's fingerprint is two 32-bit sums over its elements, each element's bits mixed with its position in
the array's logical (row-major) order:

  h1 = sum(word[i] * odd(i))            h2 = sum(mix(word[i] + mix(i)))       (mod 2**32)

`word` is the element's bits as uint32 (16- and 8-bit types widened), `mix` a 32-bit finaliser (murmur3's)
and `odd(i)` = mix(i) | 1. Addition mod 2**32 is exact and associative, so the sums do not depend on the
order XLA reduces in, on how the array is split over devices or hosts, or on the storage backend: a
checkpoint written on 8 devices verifies on 1. Any change of one element changes h1 (an odd multiplier
keeps every nonzero difference nonzero mod 2**32); h2, nonlinear in the bits, makes changes that cancel in
h1 unlikely to cancel in both. It is a check against damage (flipped or lost bytes), not a cryptographic
hash.

The sums are computed where the arrays are (one jitted program over the tree), so no host gathers a
sharded array, and only 8 bytes a leaf come back.
"""

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = np.uint32(0x9E3779B9)


def _mix(value):
  """murmur3's 32-bit finaliser: every input bit flips about half the output bits."""
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
def _tree_sums(tree):
  return jax.tree.map(_leaf_sums, tree)


def _key_name(key) -> str:
  for attribute in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def leaf_path(path) -> str:
  """'a/b/kernel' for a jax key path."""
  return '/'.join(_key_name(key) for key in path)


def fingerprints(tree) -> dict[str, str]:
  """{'a/b/kernel': '<16 hex digits>'} for every array leaf of `tree` (jax or numpy arrays, numbers)."""
  leaves_with_paths = jax.tree_util.tree_leaves_with_path(tree)
  if not leaves_with_paths:
    return {}
  paths = [leaf_path(path) for path, _ in leaves_with_paths]
  arrays = [leaf if isinstance(leaf, jax.Array) else np.asarray(leaf) for _, leaf in leaves_with_paths]
  sums = jax.device_get(_tree_sums(arrays))
  return {path: f'{int(pair[0]):08x}{int(pair[1]):08x}' for path, pair in zip(paths, sums)}


def differing(recorded: dict[str, str], tree) -> list[str]:
  """The leaf paths of `tree` whose fingerprint differs from `recorded`'s, and recorded leaves it lacks."""
  found = fingerprints(tree)
  return sorted(path for path in set(recorded) | set(found) if recorded.get(path) != found.get(path))
