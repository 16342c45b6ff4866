"""Spatial parallelism inside the model: where it asks the compiler to keep an image's rows split.

Under a mesh (`jax.set_mesh`) with a `spatial` axis larger than one, the rows of every image are split
over that axis (docs/spatial.md). Propagation alone would gather or replicate some large tensors (the
stem's activations after a reshape, the scale-0 tokens across accumulation micro-steps), so the model
constrains them here:
- token maps (batch, H, W, C): the batch over the data-parallel axes, the rows over `spatial`;
- window-major tokens (batch * windows, tokens, C) of a scale whose rows of windows divide by the spatial
  size: the leading axis over (data-parallel axes, `spatial`), each device a band of whole windows (rows
  of windows are contiguous in raster order). With one image per data-parallel group this is the same
  split as the map's, so no data moves between the two forms;
- a coarser scale whose rows of windows do not divide is replicated over `spatial`: it is at least 16
  times smaller than the scale below it (4 x 4 pooling), so the gather is cheap and no device idles on an
  uneven split. It is pooled from the finer scale while still split (its map constrained to row bands
  before it is windowed), so what is gathered is the pooled map, never the finer one.
Without such a mesh, or with `spatial` 1, nothing is constrained and the program is the one it was.
"""

import jax
from jax.sharding import PartitionSpec

BATCH_AXES = ('data', 'fsdp')
SPATIAL_AXIS = 'spatial'


def spatial_size() -> int:
  """The current mesh's `spatial` size (1 without a mesh or without that axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or SPATIAL_AXIS not in mesh.axis_names:
    return 1
  return int(mesh.shape[SPATIAL_AXIS])


def _batch_axes() -> tuple:
  mesh = jax.sharding.get_abstract_mesh()
  return tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)


def split_rows(token_map):
  """(batch, H, W, C) -> the same, constrained to batch over data-parallel axes and rows over `spatial`
  (left to propagation where the rows do not divide)."""
  size = spatial_size()
  if size == 1 or token_map.shape[1] % size:
    return token_map
  return jax.lax.with_sharding_constraint(token_map, PartitionSpec(_batch_axes(), SPATIAL_AXIS))


def split_windows(tokens, window_rows: int):
  """(batch * windows, tokens, C) of a scale with `window_rows` rows of windows -> the same, constrained:
  bands of whole windows over `spatial` when the rows divide, else replicated over it."""
  size = spatial_size()
  if size == 1:
    return tokens
  if window_rows % size:
    return jax.lax.with_sharding_constraint(tokens, PartitionSpec(_batch_axes()))
  return jax.lax.with_sharding_constraint(tokens, PartitionSpec(_batch_axes() + (SPATIAL_AXIS,)))
