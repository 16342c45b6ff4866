"""One train step on 1 device, on 8 (data parallel) and on 8 as 2 data x 4 FSDP, printed as JSON.

Run by tests/test_train.py with XLA_FLAGS=--xla_force_host_platform_device_count=8. The model has a conv
stem, so BatchNorm runs in train mode on statistics of the whole micro-batch, spread over the devices;
each device holds other examples. Mixup/CutMix, drop path, accumulation and EMA are on.
"""

import json
import tempfile

import jax
import numpy as np

from atlas_jax import checkpointing, run_setup, sharding, train
from atlas_jax import config as config_lib
from atlas_jax.data import pipeline, sources
from tests.train_configs import FULL_RECIPE, TINY_CONV_STEM, tiny_config

# (device count, fsdp) -> (setup, jitted step): the restore checks run on meshes the one-step checks built,
# so they reuse those setups instead of tracing and compiling the same programs again.
_SETUPS = {}


def setup_on(config, devices, fsdp: int):
  """The train setup and jitted step of `config` on `devices` as (data, fsdp) = (len / fsdp, fsdp)."""
  key = (len(devices), fsdp)
  if key not in _SETUPS:
    run_config = config.copy_and_resolve_references()
    run_config.mesh.update(data=len(devices) // fsdp, fsdp=fsdp)
    run = run_setup.train_setup(run_config, sharding.make_mesh(run_config, devices))
    _SETUPS[key] = run, train.jit_train_step(run)
  return _SETUPS[key]


def one_step(config, devices, fsdp: int = 1):
  setup, step = setup_on(config, devices, fsdp)
  source = sources.make_source(config.data, config.image_size, 'train', 0)
  with pipeline.TrainLoader(
    source, config.batch_size, seed=0, max_bad_fraction=config.data.max_bad_fraction
  ) as loader:
    local_batch = next(loader)
  mesh = setup.mesh
  with jax.set_mesh(mesh):
    state = setup.init_state(jax.random.PRNGKey(0))
    state, metrics = step(state, sharding.global_batch(local_batch, mesh))
  # Bytes of parameters whose arrays really are split over the fsdp axis, after the step.
  split_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params) if 'fsdp' in leaf.sharding.spec)
  total_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
  values = jax.device_get((state.params, state.batch_stats, state.ema_params, metrics['loss']))
  return values, split_bytes / total_bytes


def max_relative_difference(got, want) -> float:
  """Largest |got - want| over every leaf of a tree, relative to the largest |want| of that tree."""
  got_leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(got)]
  want_leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(want)]
  scale = max(float(np.max(np.abs(leaf))) for leaf in want_leaves)
  return max(float(np.max(np.abs(g - w))) for g, w in zip(got_leaves, want_leaves)) / max(scale, 1e-12)


def restore_on_fewer_devices(config, local_batches) -> dict:
  """A step on 8 devices (2 data x 4 FSDP) saved, restored on 4 (2 x 2) and on 1, then one more step each:
  each continues as the 8-device run does."""

  devices = jax.devices()
  loader_state = {'batches_consumed': np.asarray(1, np.int64)}
  with tempfile.TemporaryDirectory() as workdir:
    run, step = setup_on(config, devices[:8], 4)
    mesh = run.mesh
    checkpoints = checkpointing.Checkpoints(workdir)
    with jax.set_mesh(mesh):
      state = run.init_state(jax.random.PRNGKey(0))
      state, _ = step(state, sharding.global_batch(local_batches[0], mesh))
      checkpoints.save(1, train.checkpoint_items(state, loader_state))
      checkpoints.wait()
      state, _ = step(state, sharding.global_batch(local_batches[1], mesh))
      reference = jax.device_get((state.params, state.ema_params))
    differences = {}
    for count, fsdp in ((4, 2), (1, 1)):
      run, step = setup_on(config, devices[:count], fsdp)
      mesh = run.mesh
      with jax.set_mesh(mesh):
        state, _ = train.restore_state(checkpoints, 1, run.abstract_state, run.state_sharding, loader_state)
        state, _ = step(state, sharding.global_batch(local_batches[1], mesh))
        differences[f'restored_on_{count}'] = max_relative_difference(
          jax.device_get((state.params, state.ema_params)), reference
        )
    checkpoints.close()
  return differences


def main():
  # The restore runs compile the 8-device FSDP step and the 1-device step again: a compilation cache private
  # to this process serves them from the first compiles.
  cache_dir = tempfile.mkdtemp(prefix='atlas_dp_check_cache_')
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  # A conv stem (patch 16) at 64 px: 4 x 4 tokens, one window; BatchNorm in every stem stage.
  overrides = {key.replace('.', '__'): value for key, value in FULL_RECIPE.items()}
  config = config_lib.resolve(
    tiny_config(
      **overrides,
      **TINY_CONV_STEM,
      batch_size=16,
      mesh__fsdp_min_size=256,
      warmup_steps=0,
      optimizer__eps=1e-3,
    )
  )
  # warmup 0: the first step really moves the parameters. eps 1e-3: some gradients are zero in exact
  # arithmetic (conv biases before BatchNorm, the key bias under softmax) and hold only rounding noise,
  # which depends on the reduction order, hence on the device count; Adam with eps 1e-8 would blow that
  # noise up to full-size updates. A larger eps leaves the real gradients' updates as they are.
  devices = jax.devices()
  # Each part (parameters, BatchNorm statistics, EMA, loss) is compared relative to its own scale.
  single, _ = one_step(config.copy_and_resolve_references(), devices[:1])
  data_parallel, _ = one_step(config.copy_and_resolve_references(), devices[:8])
  fsdp, fsdp_split = one_step(config.copy_and_resolve_references(), devices[:8], fsdp=4)
  assert jax.tree.leaves(single[1]), 'the model should have BatchNorm statistics'
  source = sources.make_source(config.data, config.image_size, 'train', 0)
  with pipeline.TrainLoader(
    source, config.batch_size, seed=0, max_bad_fraction=config.data.max_bad_fraction
  ) as loader:
    local_batches = [next(loader), next(loader)]
  restored = restore_on_fewer_devices(config, local_batches)
  print(
    json.dumps(
      {
        **restored,
        'devices': len(devices[:8]),
        'max_relative_difference': max(map(max_relative_difference, data_parallel, single)),
        'fsdp_max_relative_difference': max(map(max_relative_difference, fsdp, single)),
        'fsdp_split_fraction': fsdp_split,
      }
    )
  )


if __name__ == '__main__':
  main()
