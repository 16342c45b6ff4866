"""One train step, eval logits and features with the rows of every image split over devices (spatial),
against one device; printed as JSON. Run by tests/test_spatial.py with 8 faked CPU devices.

Two small models at a non-square windowable size, 16 x 8 tokens in 2 x 2 windows (8 rows of windows):
the conv stem (BatchNorm in training, statistics over the whole split image) and the patchify stem. Every
part of the recipe is on: drop path, Mixup/CutMix, accumulation 2, EMA.
"""

import json
import sys
import tempfile

import jax
import numpy as np
import optax

from atlas_jax import config as config_lib
from atlas_jax import run_setup, sharding, train
from atlas_jax.data import pipeline, sources
from tests.train_configs import FULL_RECIPE, tiny_config

STEMS = {
  'conv': dict(image_size=(256, 128), model__patch_size=16, model__stem_width=8, model__stem_in_dim=8),
  'patchify': dict(image_size=(64, 32), model__patch_size=4),
}
MESHES = {'data2_spatial4': (2, 1, 4), 'spatial8': (1, 1, 8), 'one_device': (1, 1, 1)}
CASES = [('conv', 'data2_spatial4'), ('patchify', 'spatial8')]  # each stem on one split mesh


def config_for(stem: str):
  overrides = {key.replace('.', '__'): value for key, value in FULL_RECIPE.items()}
  return config_lib.resolve(
    tiny_config(
      **overrides,
      **STEMS[stem],
      model__window=2,
      model__depths=(1,),
      batch_size=4,
      warmup_steps=0,
      optimizer__eps=1e-3,  # as tests/data_parallel_check.py: zero-in-exact-arithmetic gradients stay small
    )
  )


def relative_difference(got, want) -> float:
  """Largest relative norm of the difference over the leaves of two trees."""
  worst = 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    norm = np.linalg.norm(w)
    if norm == 0:
      continue
    worst = max(worst, float(np.linalg.norm(g - w) / norm))
  return worst


def adam_moments(opt_state):
  """(mu, nu) of the optax state: trees of the parameters' structure."""
  is_adam = lambda node: isinstance(node, optax.ScaleByAdamState)  # noqa: E731
  (adam,) = [node for node in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(node)]
  return adam.mu, adam.nu


def judged_difference(got, want, noise) -> float:
  """`relative_difference` over the elements whose gradient is not rounding noise (`noise`: the params'
  structure, True where the reference's Adam second moment says the gradient RMS is below 1e-7: gradients
  zero in exact arithmetic, such as a conv bias before BatchNorm or a key bias under softmax, whose noise
  depends on the summation order, hence on the split). Noise elements must still stay within the step's
  learning rate of the reference."""
  worst = 0.0
  for g, w, mask in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(noise)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    assert np.all(np.abs(g[mask] - w[mask]) <= 2e-3)  # at most one Adam step of the quickstart's lr
    norm = np.linalg.norm(w[~mask])
    if norm:
      worst = max(worst, float(np.linalg.norm(g[~mask] - w[~mask]) / norm))
  return worst


def differences(got, want) -> dict:
  """Every item's difference; the parameters, EMA and Adam moments judged without gradient noise."""
  want_mu, want_nu = adam_moments(want['opt_state'])
  got_mu, got_nu = adam_moments(got['opt_state'])
  # The conv stem's biases before BatchNorm hold noise of 1e-10 to 3e-9 here; real gradients are >= 1e-5.
  noise = jax.tree.map(lambda nu: (np.asarray(nu) > 0) & (np.sqrt(np.asarray(nu)) < 1e-7), want_nu)
  result = {key: relative_difference(got[key], want[key]) for key in want if key != 'opt_state'}
  for key in ('params', 'ema'):
    result[key] = judged_difference(got[key], want[key], noise)

  # Adam's moments of noise elements are noise themselves: compared where the gradient is real.
  def real(tree):
    return jax.tree.map(lambda leaf, mask: np.where(mask, 0.0, np.asarray(leaf, np.float64)), tree, noise)

  result['opt_state'] = max(
    relative_difference(real(got_mu), real(want_mu)), relative_difference(real(got_nu), real(want_nu))
  )
  result['noise_fraction'] = sum(m.sum() for m in jax.tree.leaves(noise)) / sum(
    m.size for m in jax.tree.leaves(noise)
  )
  return result


def run(config, mesh_shape):
  data, fsdp, spatial = mesh_shape
  run_config = config.copy_and_resolve_references()
  run_config.mesh.update(data=data, fsdp=fsdp, spatial=spatial)
  devices = jax.devices()[: data * fsdp * spatial]
  setup = run_setup.train_setup(run_config, sharding.make_mesh(run_config, devices))
  step = train.jit_train_step(setup)
  source = sources.make_source(config.data, config.image_size, 'train', 0)
  with pipeline.TrainLoader(source, config.batch_size, seed=0, max_bad_fraction=1.0) as loader:
    local_batch = next(loader)
  mesh = setup.mesh
  model = setup.model
  with jax.set_mesh(mesh):
    state = setup.init_state(jax.random.PRNGKey(0))
    batch = sharding.global_batch(local_batch, mesh)
    temporary = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    state, metrics = step(state, batch)
    variables = run_setup.model_variables(state.params, state.batch_stats)

    @jax.jit
    def evaluate(variables, images):
      return model.apply(variables, images), model.apply(variables, images, method='features')

    logits, features = evaluate(variables, batch['image'])
  return temporary, jax.device_get(
    {
      'loss': metrics['loss'],
      'params': state.params,
      'opt_state': state.opt_state,
      'ema': state.ema_params,
      'batch_stats': state.batch_stats,
      'logits': logits,
      'features': features,
    }
  )


def main():
  cache_dir = tempfile.mkdtemp(prefix='atlas_spatial_check_cache_')
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  results = {}
  for stem, name in CASES:
    if sys.argv[1:] and stem not in sys.argv[1:]:
      continue
    config = config_for(stem)
    reference_temporary, reference = run(config, MESHES['one_device'])
    temporary, got = run(config, MESHES[name])
    results[f'{stem}/{name}'] = {
      **differences(got, reference),
      'temporary_ratio': temporary / reference_temporary,
    }
  print(json.dumps(results))


if __name__ == '__main__':
  main()
