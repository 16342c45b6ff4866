"""Versions of the parameter tree, and the conversion between them.

- Version 1: one subtree per block, `stage{k}_block{i}/...`.
- Version 2 (this code): one scanned subtree per stage, `stage{k}_blocks/...`, every leaf with a leading
  axis of the stage's depth (block i at index i).

The conversions walk any pytree (parameters, batch statistics, optimizer states that hold parameter-shaped
dicts, trees of jax.ShapeDtypeStruct), so one function serves checkpoints, the importer and `init_from`.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np

VERSION = 2
_BLOCK = re.compile(r'(stage\d+)_block(\d+)')
STAGE_BLOCKS = re.compile(r'stage(\d+)_blocks')  # group 1: the stage's index


def stacked_axes(path) -> int:
  """Leading axes a leaf at `path` (a jax key path, or a tuple of names) has for being stacked: 1 under a
  `stage{k}_blocks` subtree (one slice per block), else 0. A block's own shape is shape[stacked_axes:]."""
  names = (getattr(entry, 'key', getattr(entry, 'name', entry)) for entry in path)
  return int(any(isinstance(name, str) and STAGE_BLOCKS.fullmatch(name) for name in names))


def stack_blocks(tree):
  """Version 1 -> 2: `stage{k}_block{i}` subtrees stacked into `stage{k}_blocks` (leading axis i)."""
  return _map_dicts(tree, _stack_dict)


def unstack_blocks(tree):
  """Version 2 -> 1: `stage{k}_blocks` split into `stage{k}_block{i}` (abstract leaves keep their sharding
  minus the stacked axis)."""
  return _map_dicts(tree, _unstack_dict)


def _map_dicts(tree, convert):
  """Applies `convert` to every dict of a pytree, bottom-up; namedtuples, tuples and lists keep their types."""
  if isinstance(tree, dict):
    return convert({key: _map_dicts(value, convert) for key, value in tree.items()})
  if isinstance(tree, tuple) and hasattr(tree, '_fields'):
    return type(tree)(*(_map_dicts(value, convert) for value in tree))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_map_dicts(value, convert) for value in tree)
  return tree


def _stack_dict(tree: dict) -> dict:
  stages: dict[str, dict[int, object]] = {}
  converted = {}
  for key, value in tree.items():
    match = _BLOCK.fullmatch(key) if isinstance(key, str) else None
    if match:
      stages.setdefault(f'{match[1]}_blocks', {})[int(match[2])] = value
    else:
      converted[key] = value
  for name, blocks in stages.items():
    if sorted(blocks) != list(range(len(blocks))):
      raise ValueError(f'{name}: blocks {sorted(blocks)} are not 0..{len(blocks) - 1}')
    converted[name] = jax.tree.map(_stack_leaves, *(blocks[index] for index in range(len(blocks))))
  return converted


def _unstack_dict(tree: dict) -> dict:
  converted = {}
  for key, value in tree.items():
    match = STAGE_BLOCKS.fullmatch(key) if isinstance(key, str) else None
    if not match:
      converted[key] = value
      continue
    depth = jax.tree.leaves(value)[0].shape[0]
    for index in range(depth):
      converted[f'stage{match[1]}_block{index}'] = jax.tree.map(lambda leaf: _slice_leaf(leaf, index), value)
  return converted


def _stack_leaves(*leaves):
  if isinstance(leaves[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)
  if isinstance(leaves[0], np.ndarray):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _slice_leaf(leaf, index: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
  return leaf[index]
