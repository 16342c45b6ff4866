"""The only module that talks to orbax: checkpoints under WORKDIR/checkpoints/<step>/.

Items (docs/design.md): params, batch_stats (only when the model has BatchNorm: orbax refuses an empty item),
opt_state, ema_params, train_state, data. Each step records the atlas_jax version and the parameter-tree
version (atlas_jax.models.param_tree): a step of version 1 (one subtree per block) is read and stacked into
today's tree; any other version is refused with a message instead of mis-loaded. A step whose parameters
differ in names or shapes from the model being restored (another model's config) is refused in one line
naming the differing leaves, before orbax reads anything.

A gs:// workdir's checkpoints are written by orbax itself (tensorstore for the arrays, etils.epath for the
rest; atlas_jax/storage.py bounds tensorstore's retries). A save or restore that fails there is one
`storage.StorageError` line; orbax marks a step complete only once every item is written (a
commit_success.txt on object storage), so the previous step stays the latest.
"""

import contextlib
import logging
from typing import Any, Mapping

from absl import logging as absl_logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from atlas_jax import storage
from atlas_jax import workdir as workdir_lib
from atlas_jax.errors import AtlasError
from atlas_jax.models import param_tree

__version__ = '0.1.0'
# Bumped whenever parameter names or layouts change; older versions listed in READABLE_VERSIONS are converted.
PARAM_TREE_VERSION = param_tree.VERSION
READABLE_VERSIONS = (1, PARAM_TREE_VERSION)
ITEMS = ('params', 'batch_stats', 'opt_state', 'ema_params', 'train_state', 'data')
PARAMETER_ITEMS = ('params', 'batch_stats', 'opt_state', 'ema_params')  # the items that hold the tree


class CheckpointError(AtlasError, ValueError):
  """A missing, incomplete or incompatible checkpoint."""


BEST_METRIC = 'top1'
# What orbax's CheckpointManager logs at every save given no metrics while it ranks steps by them: here a
# step saved outside an evaluation (SIGTERM, checkpoint.every_steps, convert_torch), as meant.
_NO_METRICS_WARNING = 'Requested `tracked_metric`; did not provide metrics.'


class _DropNoMetricsWarning(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.getMessage() != _NO_METRICS_WARNING


@contextlib.contextmanager
def _without_no_metrics_warning():
  """orbax's one warning above left out of absl's log (where orbax logs) for the duration of a save."""
  logger, dropper = absl_logging.get_absl_logger(), _DropNoMetricsWarning()
  logger.addFilter(dropper)
  try:
    yield
  finally:
    logger.removeFilter(dropper)


def _best_metric(metrics) -> float:
  return float(metrics[BEST_METRIC])


_UNREACHABLE_HINTS = (
  'unavailable',
  'deadline',
  'connect',
  'timed out',
  'timeout',
  'refused',
  'reset by peer',
  'retries',
)


@contextlib.contextmanager
def _storage_errors(directory, operation: str):
  """On object storage, what orbax raises becomes one StorageError line (StorageUnavailable when the
  storage did not answer); local checkpoints keep orbax's exceptions."""
  try:
    yield
  except AtlasError:
    raise
  except Exception as error:
    if not storage.is_remote(directory):
      raise
    text = ' '.join(str(error).split())
    if any(hint in text.lower() for hint in _UNREACHABLE_HINTS) or isinstance(
      error, (ConnectionError, TimeoutError)
    ):
      raise storage.unavailable(directory, operation, error) from None
    raise storage.StorageError(f'{operation} {directory}: {type(error).__name__}: {text[:300]}') from None


class Checkpoints:
  """Save and restore the items of a step; the last `keep` steps (None: all) and the best one are kept.

  The best step is the one saved with the highest `metrics['top1']` (validation top-1); steps saved
  without metrics are kept only while they are among the last `keep`.
  """

  def __init__(self, workdir, keep: int | None = None, async_save: bool = False):
    directory = workdir_lib.checkpoints_dir(workdir)
    self.directory = directory if storage.is_remote(workdir) else directory.absolute()
    policies = [
      preservation_policy.LatestN(n=keep),
      preservation_policy.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
    ]
    options = ocp.CheckpointManagerOptions(
      create=True,
      enable_async_checkpointing=async_save,
      best_fn=_best_metric,
      best_mode='max',
      preservation_policy=preservation_policy.AnyPreservationPolicy(policies),
    )
    with _storage_errors(self.directory, 'opening checkpoints in'):
      self.manager = ocp.CheckpointManager(
        self.directory,
        options=options,
        item_handlers={name: ocp.StandardCheckpointHandler() for name in ITEMS},
      )

  def save(self, step: int, items: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> None:
    """Saves the non-empty items of `items` (names from ITEMS) as step `step`, ranked by `metrics`."""
    unknown = set(items) - set(ITEMS)
    if unknown:
      raise ValueError(f'unknown checkpoint items {sorted(unknown)}; known: {ITEMS}')
    present = {
      name: ocp.args.StandardSave(tree)
      for name, tree in items.items()
      if tree is not None and jax.tree.leaves(tree)
    }
    metadata = {'atlas_jax_version': __version__, 'param_tree_version': PARAM_TREE_VERSION}
    metrics = None if metrics is None else {name: float(value) for name, value in metrics.items()}
    with _storage_errors(self.directory, f'saving step {step} to'), _without_no_metrics_warning():
      # the warning is emitted by the call itself, before any asynchronous part
      self.manager.save(
        step, args=ocp.args.Composite(**present), custom_metadata=metadata, metrics=metrics, force=True
      )

  def wait(self) -> None:
    with _storage_errors(self.directory, 'saving a checkpoint to'):
      self.manager.wait_until_finished()

  def close(self) -> None:
    with _storage_errors(self.directory, 'closing the checkpoints in'):
      self.manager.close()

  def latest_step(self) -> int | None:
    with _storage_errors(self.directory, 'listing the checkpoints in'):
      return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step saved with the highest validation top-1; None when no step was saved with metrics."""
    ranked = [
      (_best_metric(metrics), step)
      for step in self.manager.all_steps()
      if (metrics := self.manager.metrics(step))
    ]
    # Ties go to the later step, the one orbax's BestN keeps.
    return max(ranked)[1] if ranked else None

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def items_at(self, step: int) -> set[str]:
    step_dir = self.directory / str(step)
    return {name for name in ITEMS if storage.isdir(step_dir / name)}

  def tree_version(self, step: int) -> int:
    """The parameter-tree version step `step` was written with; CheckpointError if this code cannot read it."""
    metadata = self.manager.metadata(step)
    custom = getattr(metadata, 'custom_metadata', None) or {}
    version = custom.get('param_tree_version')
    if version not in READABLE_VERSIONS:
      raise CheckpointError(
        f'{self.directory / str(step)} has parameter-tree version {version}, this atlas_jax reads versions '
        f'{", ".join(map(str, READABLE_VERSIONS))}: convert it again or use the atlas_jax version that '
        f'wrote it ({custom.get("atlas_jax_version", "unknown")})'
      )
    return version

  def restore(self, step: int, abstract_items: Mapping[str, Any]) -> dict[str, Any]:
    """Restores the items of `abstract_items` (trees of jax.ShapeDtypeStruct, today's tree) that the step
    holds; a version-1 step is read in its own tree and stacked, placed as the abstract leaves say."""
    version = self.tree_version(step)
    present = self.items_at(step)
    wanted = {
      name: tree
      for name, tree in abstract_items.items()
      if name in present and tree is not None and jax.tree.leaves(tree)
    }
    stored = {
      name: param_tree.unstack_blocks(tree) if version == 1 and name in PARAMETER_ITEMS else tree
      for name, tree in wanted.items()
    }
    self._check_shapes(step, stored)
    with _storage_errors(self.directory, f'restoring step {step} from'):
      restored = self.manager.restore(
        step,
        args=ocp.args.Composite(**{name: ocp.args.StandardRestore(tree) for name, tree in stored.items()}),
      )
    restored = {name: restored[name] for name in wanted}
    if version == 1:
      for name in PARAMETER_ITEMS:
        if name in restored:
          restored[name] = _stacked_as(restored[name], wanted[name])
    return restored

  def _check_shapes(self, step: int, stored: Mapping[str, Any]) -> None:
    """CheckpointError, naming up to two leaves, when the parameters of step `step` differ in names or
    shapes from `stored` (the trees to restore, as stored): the model of another config.

    The parameter items are compared leaf by leaf; the optimizer state only on the leaves both hold (its
    container names are the optimizer's, not the model's). The rest (train_state, data) is not compared.
    """
    try:
      metadata = self.manager.item_metadata(step)
    except Exception:  # unreadable metadata: orbax's restore says what it finds
      return
    differences = []
    for name, tree in stored.items():
      try:
        item_metadata = metadata[name] if name in PARAMETER_ITEMS else None
      except KeyError:
        item_metadata = None
      if item_metadata is None:
        continue
      in_checkpoint = _leaf_shapes(item_metadata)
      in_config = _leaf_shapes(tree)
      prefix = '' if name == 'params' else f'{name}/'
      for path in sorted(set(in_checkpoint) | set(in_config), key=lambda path: (path.count('/'), path)):
        if name == 'opt_state' and not (path in in_checkpoint and path in in_config):
          continue
        if path not in in_config:
          differences.append(f'{prefix}{path} {in_checkpoint[path]} in the checkpoint only')
        elif path not in in_checkpoint:
          differences.append(f'{prefix}{path} {in_config[path]} in the config only')
        elif in_checkpoint[path] != in_config[path]:
          differences.append(
            f'{prefix}{path} {in_checkpoint[path]} in the checkpoint vs {in_config[path]} in the config'
          )
      if differences:
        break  # the first item that differs names the leaves; the items after it differ alike
    if differences:
      shown = ', '.join(differences[:2])
      more = f' (and {len(differences) - 2} more)' if len(differences) > 2 else ''
      workdir = self.directory.parent
      raise CheckpointError(
        f'the checkpoint at {self.directory / str(step)} holds a model of a different shape than the config: '
        f'{shown}{more}; the config stored in the workdir ({workdir_lib.config_path(workdir)}) is the one '
        'to use with it'
      )


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'a/b/kernel': shape} of every array leaf of `tree` (arrays, jax.ShapeDtypeStruct or orbax's metadata)."""
  return {
    '/'.join(_key_name(key) for key in path): tuple(int(size) for size in leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    if hasattr(leaf, 'shape')
  }


def _key_name(key) -> str:
  for attribute in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _stacked_as(tree, abstract):
  """A version-1 tree stacked into version 2, each leaf placed with its abstract leaf's sharding if any."""
  shardings = jax.tree.map(lambda leaf: getattr(leaf, 'sharding', None), abstract)
  if any(sharding is None for sharding in jax.tree.leaves(shardings, is_leaf=lambda x: x is None)):
    return param_tree.stack_blocks(tree)
  return jax.jit(param_tree.stack_blocks, out_shardings=shardings)(tree)


def restore_inference_variables(
  workdir, abstract_variables, step: int | None = None, use_ema: bool = False
) -> tuple[dict, int]:
  """params (EMA weights when asked and present) and batch_stats of `step` -> (variables, step).

  `step` None picks the best step by validation top-1 when one is recorded, else the latest.
  """
  checkpoints = Checkpoints(workdir)
  try:
    steps = checkpoints.all_steps()
    if not steps:
      raise CheckpointError(f'no checkpoint under {checkpoints.directory}: train or convert one first')
    if step is None:
      step = checkpoints.best_step()
      step = max(steps) if step is None else step
    if step not in steps:
      raise CheckpointError(
        f'no checkpoint for step {step} under {checkpoints.directory}; steps present: {sorted(steps)}'
      )
    abstract = {'batch_stats': abstract_variables.get('batch_stats')}
    params_item = 'params'
    if use_ema:
      if 'ema_params' not in checkpoints.items_at(step):
        raise CheckpointError(f'step {step} under {checkpoints.directory} has no EMA weights')
      params_item = 'ema_params'
    abstract[params_item] = abstract_variables['params']
    restored = checkpoints.restore(step, abstract)
  finally:
    checkpoints.close()
  variables = {'params': restored[params_item]}
  if 'batch_stats' in restored:
    variables['batch_stats'] = restored['batch_stats']
  elif abstract_variables.get('batch_stats'):
    raise CheckpointError(
      f'step {step} under {workdir} has no batch_stats but the model has '
      'BatchNorm: was it saved for another model?'
    )
  return variables, step
