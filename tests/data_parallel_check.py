"""One train step on 1 device and on 8 (data parallel), printed as JSON; run by tests/test_train.py.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8. The model has a conv stem, so BatchNorm runs
in train mode on statistics of the whole micro-batch, spread over the devices; each device holds other
examples. Mixup/CutMix, drop path, accumulation and EMA are on.
"""

import functools
import json

import jax
import numpy as np

from atlas_jax import optim, sharding, train
from atlas_jax.data import pipeline, sources
from atlas_jax.models import build_model
from tests.train_configs import FULL_RECIPE, tiny_config


def one_step(config, devices):
  config.mesh.data = len(devices)
  model = build_model(config)
  optimizer = optim.make_optimizer(config)
  mesh = sharding.make_mesh(config, devices)
  init = functools.partial(train.create_train_state, config, model, optimizer)
  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  source = sources.make_source(config.data, config.image_size, 'train', 0)
  with pipeline.TrainLoader(source, config.batch_size, seed=0) as loader:
    local_batch = next(loader)
  with jax.set_mesh(mesh):
    state = jax.jit(init, out_shardings=sharding.state_shardings(abstract, mesh))(jax.random.PRNGKey(0))
    step = train.jit_train_step(config, model, optimizer, mesh, abstract)
    state, metrics = step(state, sharding.global_batch(local_batch, mesh))
  return jax.device_get((state.params, state.batch_stats, state.ema_params, metrics['loss']))


def main():
  # A conv stem (patch 16) at 64 px: 4 x 4 tokens, one window; BatchNorm in every stem stage.
  overrides = {key.replace('.', '__'): value for key, value in FULL_RECIPE.items()}
  config = train.prepare_config(tiny_config(**overrides, image_size=(64, 64), model__patch_size=16,
                                            model__stem_width=8, model__stem_in_dim=8, model__depths=(1,),
                                            batch_size=16))
  devices = jax.devices()
  single = one_step(config.copy_and_resolve_references(), devices[:1])
  multi = one_step(config.copy_and_resolve_references(), devices[:8])
  worst = 0.0
  for got, want in zip(jax.tree.leaves(multi), jax.tree.leaves(single)):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    worst = max(worst, float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12)))
  assert jax.tree.leaves(single[1]), 'the model should have BatchNorm statistics'
  print(json.dumps({'devices': len(devices[:8]), 'max_relative_difference': worst}))


if __name__ == '__main__':
  main()
