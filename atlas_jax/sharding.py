"""The device mesh from `config.mesh`, and the shardings of the train state and of global batches.

Mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose members also split the
large parameter and optimizer leaves). A batch is split along its first axis over both. A state leaf with
at least `config.mesh.fsdp_min_size` elements (configs/common.py: 2^18, 1 MiB of float32) is split
along `fsdp` on its largest axis that divides evenly; smaller leaves (biases, norms) are replicated, since
splitting them saves little and costs a gather each.
"""

import math

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from atlas_jax.errors import AtlasError

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')


class MeshError(AtlasError, ValueError):
  """A mesh that does not fit the devices, or a batch that does not fit the mesh."""


def mesh_shape(mesh_config, device_count: int) -> tuple[int, int]:
  """(data, fsdp) sizes; one -1 takes the devices the other leaves."""
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
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'config.batch_size') -> None:
  size = data_parallel_size(mesh)
  if batch_size % size:
    raise MeshError(
      f'{what}={batch_size} does not divide over the {size} data-parallel devices of the '
      f'mesh: use a multiple of {size}'
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Examples split over every device; the other axes whole."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


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
  """This process's slice of a global batch (numpy, leading axis) -> global jax.Arrays split over devices."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)), local_batch
  )
