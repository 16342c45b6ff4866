"""One train step, eval logits and features with the rows of every image split over devices (spatial),
against one device; printed as JSON. Run by tests/test_spatial.py with 8 faked CPU devices.

Two small models at a non-square windowable size, 16 x 8 tokens in 2 x 2 windows (8 rows of windows):
the conv stem (BatchNorm in training, statistics over the whole split image) and the patchify stem. Every
part of the recipe is on: drop path, Mixup/CutMix, accumulation 2, EMA.
"""

import json
import re
import sys
import tempfile
import time

import jax
from jax.sharding import PartitionSpec
import numpy as np
import optax

from atlas_jax import checkpointing, run_setup, sharding, train
from atlas_jax import config as config_lib
from atlas_jax.data import pipeline, sources
from tests.train_configs import FULL_RECIPE, tiny_config

STEMS = {
  'conv': dict(
    image_size=(256, 128),
    model__patch_size=16,
    model__stem_width=8,
    model__stem_in_dim=8,
    model__window=4,
    model__pool=4,
  ),
  'patchify': dict(image_size=(256, 64), model__patch_size=4, model__window=4, model__pool=4),
}
MESHES = {'data2_spatial4': (2, 1, 4), 'spatial8': (1, 1, 8), 'one_device': (1, 1, 1)}
# Each stem on one split mesh, with the batch that gives each data-parallel group one image per micro-batch.
CASES = [('conv', 'data2_spatial4', 4), ('patchify', 'spatial8', 4)]


def config_for(stem: str, batch_size: int = 4):
  overrides = {key.replace('.', '__'): value for key, value in FULL_RECIPE.items()}
  return config_lib.resolve(
    tiny_config(
      **overrides,
      **{'model__window': 2, **STEMS[stem]},
      model__depths=(1,),
      batch_size=batch_size,
      mesh__fsdp_min_size=256,  # so that fsdp really splits the tiny model's larger leaves
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


def local_batches(config, count: int) -> list:
  """The first `count` training batches of `config`'s synthetic task, as the loader gives them."""
  source = sources.make_source(config.data, config.image_size, 'train', 0)
  with pipeline.TrainLoader(source, config.batch_size, seed=0, max_bad_fraction=1.0) as loader:
    return [next(loader) for _ in range(count)]


class Run:
  """One train step of `config` on a (data, fsdp, spatial) mesh from `initial` (host arrays: the one-device
  run's fresh state; None: initialised on this mesh), then eval logits and features. Keeps the compiled
  step, its memory and largest all-gather, and the state after the step (on the mesh) for more steps."""

  def __init__(self, config, mesh_shape, batches, initial=None):
    self.setup, step = setup_for(config, mesh_shape)
    mesh, model = self.setup.mesh, self.setup.model
    with jax.set_mesh(mesh):
      if initial is None:
        state = self.setup.init_state(jax.random.PRNGKey(0))
      else:  # the same numbers placed on this mesh: no second init program to compile
        state = jax.device_put(initial, self.setup.state_sharding)
      self.fresh = jax.device_get(state) if initial is None else initial
      batch = sharding.global_batch(batches[0], mesh)
      lowered = step.lower(state, batch)
      self.program_text = lowered.as_text()  # what XLA compiles (unused_split_costs_nothing compares it)
      self.step = lowered.compile()  # compiled once: its memory analysis, then the step
      self.temporary = self.step.memory_analysis().temp_size_in_bytes
      # The largest all-gather against one micro-batch's scale-0 activation (tokens x dim).
      height, width = (side // config.model.patch_size for side in config.image_size)
      scale0 = config.batch_size // config.grad_accum_steps * height * width * config.model.dim
      self.largest_gather = max(all_gathers(self.step.as_text()), default=0) / scale0
      self.state, metrics = self.step(state, batch)
      variables = run_setup.model_variables(self.state.params, self.state.batch_stats)

      @jax.jit
      def evaluate(variables, images):
        return model.apply(variables, images), model.apply(variables, images, method='features')

      logits, features = evaluate(variables, batch['image'])
    self.result = jax.device_get(
      {
        'loss': metrics['loss'],
        'params': self.state.params,
        'opt_state': self.state.opt_state,
        'ema': self.state.ema_params,
        'batch_stats': self.state.batch_stats,
        'logits': logits,
        'features': features,
      }
    )

  def next_step(self, state, batch):
    """The compiled step once more, from `state` (placed as this run's state is)."""
    with jax.set_mesh(self.setup.mesh):
      state, _ = self.step(state, sharding.global_batch(batch, self.setup.mesh))
    return jax.device_get((state.params, state.ema_params, state.batch_stats))


def setup_for(config, mesh_shape):
  """(setup, jitted step) of `config` on a (data, fsdp, spatial) mesh of the first devices."""
  data, fsdp, spatial = mesh_shape
  run_config = config.copy_and_resolve_references()
  run_config.mesh.update(data=data, fsdp=fsdp, spatial=spatial)
  devices = jax.devices()[: data * fsdp * spatial]
  setup = run_setup.train_setup(run_config, sharding.make_mesh(run_config, devices))
  return setup, train.jit_train_step(setup)


def restore_elsewhere(config, runs: dict, batch) -> dict:
  """The state after the one-device run's step, placed as a run on (fsdp 2, spatial 4) holds it (each leaf
  split over fsdp where large enough, replicated over spatial) and saved, is restored on (spatial 8) and on
  one device; one more step each (the runs' compiled steps) must give what the one-device run's next step
  from its unsaved state gives."""
  loader_state = {'batches_consumed': np.asarray(1, np.int64)}
  writer, _ = setup_for(config, (1, 2, 4))  # only its shardings: nothing compiled for it
  differences = {}
  with tempfile.TemporaryDirectory() as workdir:
    checkpoints = checkpointing.Checkpoints(workdir)
    with jax.set_mesh(writer.mesh):
      written = jax.device_put(jax.device_get(runs['one_device'].state), writer.state_sharding)
      assert any(leaf.sharding.spec != PartitionSpec() for leaf in jax.tree.leaves(written.params))
      checkpoints.save(1, train.checkpoint_items(written, loader_state))
      checkpoints.wait()
    reference = runs['one_device'].next_step(runs['one_device'].state, batch)
    for name, run in runs.items():
      with jax.set_mesh(run.setup.mesh):
        state, _ = train.restore_state(
          checkpoints, 1, run.setup.abstract_state, run.setup.state_sharding, loader_state
        )
      differences[f'restored_on_{name}'] = relative_difference(run.next_step(state, batch), reference)
    checkpoints.close()
  return differences


def unused_split_costs_nothing(run: 'Run', batch) -> bool:
  """With spatial 1 the train step lowers to the program built without any of spatial parallelism's
  annotations (the constraints off, the batch shardings as one prefix): `run`, a one-device Run, lowered
  the first; the second is lowered here from the same state and batch. Lowered programs (StableHLO, no
  debug locations) are what XLA compiles, so equal texts give equal optimized programs; lowering has no
  cache, unlike compiled executables, which the persistent compilation cache may hand back printed
  otherwise."""
  from jax.sharding import NamedSharding

  from atlas_jax.models import atlas, baselines, msa, stem

  assert dict(run.setup.mesh.shape) == {'data': 1, 'fsdp': 1, 'spatial': 1}
  identity = lambda tokens, *args: tokens  # noqa: E731
  patched = {
    (msa, 'split_windows'): identity,
    (msa, 'split_rows'): identity,
    (atlas, 'split_rows'): identity,
    (atlas, 'split_windows'): identity,
    (stem, 'split_rows'): identity,
    (baselines, 'split_rows'): identity,
    (sharding, 'batch_shardings'): lambda mesh, batch: NamedSharding(
      mesh, PartitionSpec(sharding.BATCH_AXES)
    ),
    (sharding, 'micro_batch_shardings'): lambda mesh, batches: NamedSharding(
      mesh, PartitionSpec(None, sharding.BATCH_AXES)
    ),
  }
  saved = {key: getattr(*key) for key in patched}
  try:
    for (module, name), value in patched.items():
      setattr(module, name, value)
    setup, step = setup_for(run.setup.config, (1, 1, 1))
    with jax.set_mesh(setup.mesh):
      state = jax.device_put(run.fresh, setup.state_sharding)
      without = step.lower(state, sharding.global_batch(batch, setup.mesh)).as_text()
  finally:
    for (module, name), value in saved.items():
      setattr(module, name, value)
  return run.program_text == without


def all_gathers(hlo: str) -> list[int]:
  """Elements of the result of every all-gather in an optimized HLO text."""
  sizes = []
  for match in re.finditer(r'= \w+\[([\d,]*)\][^=]*? all-gather(?:-start)?\(', hlo):
    dims = [int(d) for d in match.group(1).split(',') if d]
    sizes.append(int(np.prod(dims)) if dims else 1)
  return sizes


def main():
  cache_dir = tempfile.mkdtemp(prefix='atlas_spatial_check_cache_')
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  results = {}
  for stem, name, batch_size in CASES:
    if sys.argv[1:] and stem not in sys.argv[1:]:
      continue
    config = config_for(stem, batch_size)
    batches = local_batches(config, 2)
    start = time.perf_counter()
    runs = {'one_device': Run(config, MESHES['one_device'], batches)}
    runs[name] = Run(config, MESHES[name], batches, runs['one_device'].fresh)
    reference, split = runs['one_device'], runs[name]
    results[f'{stem}/{name}'] = {
      **differences(split.result, reference.result),
      'temporary_ratio': split.temporary / reference.temporary,
      'largest_all_gather_vs_scale0': split.largest_gather,
    }
    if stem == 'conv':  # the (conv stem, full recipe) step with spatial 1: as if the split did not exist
      results['unused_split_costs_nothing'] = unused_split_costs_nothing(reference, batches[0])
    if stem == 'patchify':  # a checkpoint written as (fsdp 2, spatial 4) holds it, restored on both meshes
      results['restore'] = restore_elsewhere(config, runs, batches[1])
    print(f'{stem}: {time.perf_counter() - start:.1f} s', file=sys.stderr, flush=True)
  print(json.dumps(results))


if __name__ == '__main__':
  main()
