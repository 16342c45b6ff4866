"""`init_from`: parameters from another workdir (a trained run or a converted reference checkpoint).

The source's model fields must equal this config's, except the number of classes (the head is then
re-initialized) and fields that change only how the same function is computed (dtype, attention kernel,
remat, drop path). Anything else is refused with the field's name: loading weights into a model that
computes something else would train or evaluate silently wrong.
"""

import jax
import jax.numpy as jnp

from atlas_jax import checkpointing, run_setup, storage
from atlas_jax import config as config_lib
from atlas_jax import workdir as workdir_lib
from atlas_jax.errors import AtlasError
from atlas_jax.models import build_model

# Fields that do not change the function the parameters define.
COMPUTE_ONLY_FIELDS = ('drop_path_rate', 'dtype', 'attention', 'remat')


class InitFromError(AtlasError, ValueError):
  """A source workdir whose parameters do not fit this config."""


def check_compatible(source_config, config) -> bool:
  """Raises InitFromError naming the first model field that differs; returns whether the head differs.

  Both configs are resolved."""
  source_model, model = source_config.model, config.model
  for field in sorted(set(source_model.keys()) | set(model.keys())):
    if field in COMPUTE_ONLY_FIELDS or field == 'num_classes':
      continue
    theirs, ours = source_model.get(field), model.get(field)
    if theirs != ours:
      raise InitFromError(
        f'init_from={config.init_from} has model.{field}={theirs!r} but this config says {ours!r}: '
        f'set --config.model.{field}={theirs!r} to use its weights, or pick another init_from'
      )
  return source_model.num_classes != model.num_classes


def load(config, fresh_variables):
  """`fresh_variables` (this model's initialized params and batch_stats) with the source's weights put in.

  The head keeps its fresh initialization when the source has another number of classes.
  """
  source = config.init_from
  if not storage.isfile(workdir_lib.config_path(source)):
    raise InitFromError(
      f'init_from={source} has no config.json: point it at a workdir written by '
      'atlas_jax.main or atlas_jax.tools.convert_torch'
    )
  source_config = config_lib.resolve(workdir_lib.read_config(source))
  new_head = check_compatible(source_config, config)
  abstract = run_setup.abstract_variables(build_model(source_config), source_config.image_size)
  restored, step = checkpointing.restore_inference_variables(source, abstract)

  params = restored['params']
  if new_head:  # every model's classifier is readout/head
    fresh_head = fresh_variables['params']['readout']['head']
    params = {**params, 'readout': {**params['readout'], 'head': fresh_head}}
  _check_same_tree(params, fresh_variables['params'], source)
  variables = {'params': params}
  if fresh_variables.get('batch_stats'):
    variables['batch_stats'] = restored['batch_stats']
    _check_same_tree(variables['batch_stats'], fresh_variables['batch_stats'], source)
  return variables, step


def init_from_line(config, source_step: int) -> str:
  """The console line of a run started from `init_from`, e.g. 'init_from: step 800 of /runs/a, head
  re-initialized (10 -> 3 classes)' or '..., all weights loaded (head included)'."""
  source = config.init_from
  source_classes = config_lib.resolve(workdir_lib.read_config(source)).model.num_classes
  if source_classes != config.model.num_classes:
    head = f'head re-initialized ({source_classes} -> {config.model.num_classes} classes)'
  else:
    head = 'all weights loaded (head included)'
  return f'init_from: step {source_step} of {source}, {head}'


def _check_same_tree(loaded, fresh, source) -> None:
  """Same paths and shapes, or InitFromError naming the first difference (e.g. another number of scales)."""
  loaded_leaves = {
    jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(loaded)
  }
  fresh_leaves = {
    jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(fresh)
  }
  for path in sorted(set(loaded_leaves) | set(fresh_leaves)):
    if loaded_leaves.get(path) != fresh_leaves.get(path):
      raise InitFromError(
        f'init_from={source}: parameter {path} is {loaded_leaves.get(path, "absent")} there and '
        f'{fresh_leaves.get(path, "absent")} here (another image_size gives another number of scales)'
      )


def _which_step(workdir, step: int) -> str:
  """Why `step` of the workdir is the one evaluated: 'the best recorded; the latest is 800', 'the latest, no
  evaluation recorded' (restore_inference_variables' choice)."""
  checkpoints = checkpointing.Checkpoints(workdir)
  try:
    best, latest = checkpoints.best_step(), checkpoints.latest_step()
  finally:
    checkpoints.close()
  if best is None:
    return 'the latest; no evaluation recorded'
  if best == latest:
    return 'the best recorded and the latest'
  return f'the best recorded; the latest is {latest}'


def weights_to_evaluate(config, workdir, abstract_variables) -> tuple[dict, int, str]:
  """({'raw': variables[, 'ema': variables]}, step, where from) for mode=eval and mode=linear_eval; where
  from says why that step, e.g. 'step 700 of WORKDIR (the best recorded; the latest is 800)'.

  The workdir's best (else latest) checkpoint, with its EMA weights when it has them; a workdir without
  checkpoints falls back to `init_from`; neither is one line saying what to do."""
  checkpoints_dir = workdir_lib.checkpoints_dir(workdir)
  has_checkpoints = checkpoints_dir.is_dir() and any(
    path.name.isdigit() for path in checkpoints_dir.iterdir()
  )
  if has_checkpoints:
    variables, step = checkpointing.restore_inference_variables(workdir, abstract_variables)
    weights = {'raw': variables}
    try:
      weights['ema'], _ = checkpointing.restore_inference_variables(
        workdir, abstract_variables, step, use_ema=True
      )
    except checkpointing.DamagedCheckpoint:
      raise
    except checkpointing.CheckpointError:
      pass  # no EMA in this run
    return weights, step, f'step {step} of {workdir} ({_which_step(workdir, step)})'
  if config.init_from:
    fresh = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), abstract_variables)
    variables, step = load(config, fresh)
    return {'raw': variables}, step, f'step {step} of {config.init_from}'
  raise checkpointing.CheckpointError(
    f'nothing to evaluate: {workdir} has no checkpoints and config.init_from is unset; '
    'train first or pass --config.init_from=WORKDIR'
  )
