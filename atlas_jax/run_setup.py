"""Setting a run up from a resolved config: the train state, abstract variables, shardings, compute dtype.

Training, evaluation, the benchmark, inference, the experiments and the tests all build the model ->
optimizer -> abstract state -> shardings chain through `train_setup`, so the chain exists once:

  setup = run_setup.train_setup(config)            # config from atlas_jax.config.resolve
  state = setup.init_state()                        # placed as setup.state_sharding says
  setup.abstract_state                              # the same tree of jax.ShapeDtypeStruct, nothing computed

`print_start_lines` prints what a run runs on and what it builds (backend and devices, mesh, the model), the
first lines of training, mode=eval and mode=compile. `take_workdir_lock` and `check_free_space` guard the
workdir of a job that writes one (training, mode=eval).
"""

import dataclasses
import functools
import importlib.util
import math
import os
import shutil
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from atlas_jax import config as config_lib
from atlas_jax import optim, sharding, storage, workdir_lock
from atlas_jax.errors import AtlasError
from atlas_jax.models import DTYPES, build_model


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer steps taken, int32 ()
  params: Any  # float32
  batch_stats: Any  # {} for models without BatchNorm
  opt_state: Any
  ema_params: Any  # None when EMA is off
  rng: jax.Array  # uint32 (2,), fixed; step s draws from fold_in(rng, s)


def model_variables(params, batch_stats) -> dict:
  """The variables `model.apply` takes: params, and batch_stats when the model has BatchNorm."""
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}


def compute_dtype(config, dtype: str | None = None) -> str:
  """Evaluation and inference compute in `dtype` when given, else in float32 on CPU and in the config's dtype
  on accelerators (XLA's CPU backend runs half precision slower and less exactly)."""
  if dtype is not None:
    if dtype not in DTYPES:
      raise config_lib.ConfigError(f'dtype must be one of {", ".join(sorted(DTYPES))}, got {dtype!r}')
    return dtype
  return 'float32' if jax.default_backend() == 'cpu' else config.model.dtype


def abstract_variables(model, image_size, batch_size: int = 1):
  """The variables of `model` for images of `image_size` as jax.ShapeDtypeStructs: traced, nothing computed."""
  images = jax.ShapeDtypeStruct((batch_size, *image_size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)


def create_train_state(config, model, optimizer, rng) -> TrainState:
  params_rng, train_rng = jax.random.split(rng)
  images = jnp.zeros((1, *config.image_size, 3), jnp.float32)
  variables = model.init({'params': params_rng}, images, train=False)
  params = variables['params']
  ema_params = jax.tree.map(jnp.copy, params) if optim.ema_enabled(config) else None
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get('batch_stats', {}),
    opt_state=optimizer.init(params),
    ema_params=ema_params,
    rng=train_rng,
  )


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """Everything a training step needs before any data: built once by `train_setup`."""

  config: Any
  mesh: jax.sharding.Mesh
  model: Any
  optimizer: optax.GradientTransformation
  init: Callable[[jax.Array], TrainState]  # rng -> a fresh train state
  rng: jax.Array  # the key `init` takes: from config.seed
  abstract_state: TrainState  # jax.ShapeDtypeStruct leaves
  state_sharding: Any  # NamedSharding leaves, the same tree

  @functools.cached_property
  def _jitted_init(self):
    return jax.jit(self.init, out_shardings=self.state_sharding)

  def init_state(self, rng: jax.Array | None = None) -> TrainState:
    """A fresh train state from `rng` (default: the config's seed), placed as `state_sharding` says."""
    return self._jitted_init(self.rng if rng is None else rng)


def train_setup(config, mesh: jax.sharding.Mesh | None = None) -> TrainSetup:
  """Model, optimizer, abstract state and its shardings for a resolved config on `mesh` (default: the config's)."""
  mesh = sharding.make_mesh(config) if mesh is None else mesh
  model = build_model(config)
  optimizer = optim.make_optimizer(config)
  init = functools.partial(create_train_state, config, model, optimizer)
  rng = jax.random.PRNGKey(config.seed)
  abstract_state = jax.eval_shape(init, rng)
  state_sharding = sharding.state_shardings(abstract_state, mesh, config.mesh.fsdp_min_size)
  return TrainSetup(config, mesh, model, optimizer, init, rng, abstract_state, state_sharding)


# ---------------------------------------------------------------------------------------------------
# The start-of-run lines.


def _plural(count: int, noun: str) -> str:
  return f'{count} {noun}' if count == 1 else f'{count} {noun}s'


def backend_line() -> str:
  """E.g. 'backend: gpu, 8 devices (NVIDIA H100 80GB HBM3)', ', 2 processes' added for multi-process runs."""
  devices = jax.devices()
  kinds = ', '.join(sorted({device.device_kind for device in devices}))
  line = f'backend: {jax.default_backend()}, {_plural(len(devices), "device")} ({kinds})'
  if jax.process_count() > 1:
    line += f', {jax.process_count()} processes'
  return line


# JAX's CUDA plugins: with one installed, a GPU it cannot start is JAX's own warning.
CUDA_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_cuda12_pjrt', 'jax_cuda13_pjrt')


def cuda_jaxlib_warning() -> str | None:
  """One line when this machine shows an NVIDIA GPU (/dev/nvidia0 or nvidia-smi) while JAX runs on the CPU
  with no CUDA plugin installed: the CPU-only jaxlib. None when JAX_PLATFORMS chose the platforms."""
  if jax.default_backend() != 'cpu' or jax.config.jax_platforms:
    return None
  if not (os.path.exists('/dev/nvidia0') or shutil.which('nvidia-smi')):
    return None
  if any(importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS):
    return None
  return (
    'warning: this machine has an NVIDIA GPU but JAX runs on the CPU: the installed jaxlib is the CPU-only '
    'one. Install the CUDA build that matches the driver, e.g. pip install -U "jax[cuda12]", and check '
    'that jax.devices() lists the GPU'
  )


def mesh_line(mesh: jax.sharding.Mesh) -> str:
  """E.g. 'mesh: data 4 x fsdp 2'."""
  return 'mesh: ' + ' x '.join(f'{axis} {size}' for axis, size in mesh.shape.items())


def model_line(config, params=None) -> str:
  """The resolved model in one line, e.g. 'model: atlas T (dim 64, 2 heads, depths (2, 2)), 4 classes, image
  64x64, patch 4, window 4, pool 4, 0.21M parameters'; the count when `params` (arrays or
  jax.ShapeDtypeStruct leaves) is given."""
  model = config.model
  size = 'x'.join(str(side) for side in config.image_size)
  line = (
    f'model: {model.name} {model.variant} (dim {model.dim}, {_plural(model.num_heads, "head")}, depths '
    f'{tuple(model.depths)}), {model.num_classes} classes, image {size}, patch {model.patch_size}, '
    f'window {model.window}, pool {model.pool}'
  )
  if params is not None:
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
    line += f', {_parameter_count(count)} parameters'
  return line


def _parameter_count(count: int) -> str:
  if count >= 10**9:
    return f'{count / 10**9:.2f}B'
  if count >= 10**6:
    return f'{count / 10**6:.2f}M'
  return f'{count:,}'


def print_start_lines(config, mesh: jax.sharding.Mesh, params=None) -> None:
  """Prints, on process 0, the CUDA-jaxlib warning where it applies, the backend and devices, the mesh
  and the model (`model_line`)."""
  if jax.process_index() != 0:
    return
  warning = cuda_jaxlib_warning()
  if warning:
    print(warning, flush=True)
  print(backend_line(), flush=True)
  print(mesh_line(mesh), flush=True)
  print(model_line(config, params), flush=True)


# ---------------------------------------------------------------------------------------------------
# The workdir's guards.


def sync_processes(name: str) -> None:
  """Every process waits here for the others (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def take_workdir_lock(
  config, workdir, purpose: str, force: bool = False, abstract_state=None
) -> workdir_lock.WorkdirLock:
  """WORKDIR/lock taken by process 0 (workdir_lock.py), then, with `abstract_state`, the disk's room for one
  checkpoint checked (`check_free_space`); the outcome is shared with every process: the others stop too, in
  one line, when process 0 could not go on. Returns the lock (held by process 0 only)."""
  lock = workdir_lock.WorkdirLock(
    workdir,
    purpose,
    heartbeat_s=config.checkpoint.lock_heartbeat_s,
    stale_s=config.checkpoint.lock_stale_s,
    force=force,
  )

  def take():
    lock.acquire()
    if abstract_state is not None:
      try:
        check_free_space(workdir, abstract_state)
      except BaseException:
        lock.release()
        raise

  if jax.process_count() == 1:
    take()
    return lock
  from jax.experimental import multihost_utils

  failure = None
  if jax.process_index() == 0:
    try:
      take()
    except AtlasError as error:
      failure = error
  taken = multihost_utils.broadcast_one_to_all(np.int32(failure is None))
  if failure is not None:
    raise failure
  if not int(taken):
    raise workdir_lock.LockHeld(f'process 0 could not take the workdir {workdir}: its output says why')
  return lock


def state_bytes(abstract_state) -> int:
  """Bytes of the whole train state (every process's share), about what one checkpoint takes."""
  return sum(
    math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(abstract_state)
  )


def check_free_space(workdir, abstract_state) -> None:
  """WorkdirUnwritable, at start, when a local workdir's file system has less room than one checkpoint of
  `abstract_state` (a full disk; object storage has no such limit to read)."""
  if storage.is_remote(workdir) or jax.process_index() != 0:
    return
  needed = state_bytes(abstract_state)
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise workdir_lock.WorkdirUnwritable(
      f'the workdir {workdir} has {free / 2**20:.1f} MiB free but one checkpoint needs about '
      f'{needed / 2**20:.1f} MiB: free space or give another --workdir'
    )
