"""The device mesh from `config.mesh`, and the shardings of the train state and of global batches.

Mesh axes: `data` (pure data parallelism), `fsdp` (data parallelism whose members also split the
large parameter and optimizer leaves) and `spatial` (the rows of every image split over its devices,
docs/spatial.md). A batch is split along its first axis over `data` x `fsdp`; images also along their rows
over `spatial` (with `spatial` 1 they are not, so the programs stay those without it). A state leaf with
at least `config.mesh.fsdp_min_size` elements (configs/common.py: 2^18, 1 MiB of float32) is split
along `fsdp` on its largest axis that divides evenly; smaller leaves (biases, norms) are replicated, since
splitting them saves little and costs a gather each.
"""

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from atlas_jax.errors import AtlasError
from atlas_jax.models.partitioning import BATCH_AXES, SPATIAL_AXIS

MESH_AXES = BATCH_AXES + (SPATIAL_AXIS,)


class MeshError(AtlasError, ValueError):
  """A mesh that does not fit the devices, or a batch that does not fit the mesh."""


def mesh_shape(mesh_config, device_count: int) -> tuple[int, int, int]:
  """(data, fsdp, spatial) sizes; one -1 takes the devices the others leave."""
  sizes = [int(mesh_config[axis]) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise MeshError(f'config.mesh may set at most one axis to -1, got {dict(zip(MESH_AXES, sizes))}')
  if any(size == 0 or size < -1 for size in sizes):
    raise MeshError(f'config.mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}')
  known = math.prod(size for size in sizes if size != -1)
  if -1 in sizes:
    if device_count % known:
      raise MeshError(
        f'config.mesh {dict(zip(MESH_AXES, sizes))} cannot use {device_count} devices: '
        f'{device_count} is not a multiple of {known}'
      )
    sizes[sizes.index(-1)] = device_count // known
  if math.prod(sizes) != device_count:
    raise MeshError(
      f'config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, '
      f'{device_count} are present: set --config.mesh.data=-1 to use them all'
    )
  return tuple(sizes)


def make_mesh(config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(config.mesh, len(devices))
  mesh = Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
  return mesh


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'config.batch_size') -> None:
  size = data_parallel_size(mesh)
  if batch_size % size:
    raise MeshError(
      f'{what}={batch_size} does not divide over the {size} data-parallel devices of the '
      f'mesh: use a multiple of {size}'
    )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """A batch leaf of `ndim` dimensions: examples split over the data-parallel axes; an image batch (4-D)
  also along its rows over `spatial` when that axis is larger than one."""
  if ndim == 4 and mesh.shape[SPATIAL_AXIS] > 1:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, SPATIAL_AXIS))
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shardings(mesh: Mesh, batch):
  """`batch_sharding` of every leaf of a batch (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda leaf: batch_sharding(mesh, len(np.shape(leaf))), batch)


def micro_batch_shardings(mesh: Mesh, micro_batches):
  """Shardings of stacked micro-batches (k, B / k, ...): each micro-batch split as `batch_sharding`."""

  def of_leaf(leaf):
    spec = batch_sharding(mesh, len(np.shape(leaf)) - 1).spec
    return NamedSharding(mesh, PartitionSpec(None, *spec))

  return jax.tree.map(of_leaf, micro_batches)


def process_batch_slot(mesh: Mesh) -> tuple[int, int]:
  """(index, count): this process loads slot `index` of `count` equal slices of every global batch.

  Processes whose devices hold the same examples (one data-parallel group spread over processes by
  `spatial`) share a slot and load the same examples, each keeping only its own rows (`global_batch`)."""
  rows = _batch_block(mesh)
  size = data_parallel_size(mesh)
  start, stop = rows
  return start // (stop - start), size // (stop - start)


def _batch_block(mesh: Mesh) -> tuple[int, int]:
  """[start, stop) of the data-parallel shards this process's devices hold (they hold a contiguous block)."""
  size = data_parallel_size(mesh)
  sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
  indices = sharding.addressable_devices_indices_map((size,)).values()
  starts = sorted({index[0].start or 0 for index in indices})
  return starts[0], starts[-1] + 1


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def leaf_spec(shape, fsdp_size: int, min_size: int) -> PartitionSpec:
  """Split the largest axis divisible by the fsdp size, for leaves of at least `min_size` elements."""
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return PartitionSpec()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      return PartitionSpec(*([None] * axis + ['fsdp']))
  return PartitionSpec()


def state_shardings(abstract_state, mesh: Mesh, min_size: int):
  """NamedShardings for a tree of arrays or ShapeDtypeStructs (parameters, optimizer state, EMA)."""
  fsdp_size = mesh.shape['fsdp']
  return jax.tree.map(
    lambda leaf: NamedSharding(mesh, leaf_spec(np.shape(leaf), fsdp_size, min_size)), abstract_state
  )


def global_batch(local_batch, mesh: Mesh):
  """This process's slot of a global batch (numpy, leading axis; `process_batch_slot`) -> global
  jax.Arrays split over devices. With `spatial` spread over processes each one hands over only the rows
  its devices hold: no host builds the whole global batch."""
  _, count = process_batch_slot(mesh)

  def to_global(leaf):
    leaf = np.asarray(leaf)
    sharding = batch_sharding(mesh, leaf.ndim)
    global_shape = (leaf.shape[0] * count,) + leaf.shape[1:]
    if leaf.ndim == 4 and mesh.shape[SPATIAL_AXIS] > 1:
      rows = [index[1] for index in sharding.addressable_devices_indices_map(global_shape).values()]
      start = min(row.start or 0 for row in rows)
      stop = max(leaf.shape[1] if row.stop is None else row.stop for row in rows)
      leaf = leaf[:, start:stop]
    return jax.make_array_from_process_local_data(sharding, leaf, global_shape)

  return jax.tree.map(to_global, local_batch)
