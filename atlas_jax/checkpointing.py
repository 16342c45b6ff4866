"""The only module that talks to orbax: checkpoints under WORKDIR/checkpoints/<step>/.

Items (DESIGN.md): params, batch_stats (only when the model has BatchNorm: orbax refuses an empty item),
opt_state, ema_params, train_state, data. Each step records the atlas_jax version and the parameter-tree
version, so a checkpoint from an incompatible tree is refused with a message instead of mis-loaded.
"""

import pathlib
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from atlas_jax import workdir as workdir_lib

__version__ = '0.1.0'
# Bumped whenever parameter names or layouts change; checkpoints of another version need migrating.
PARAM_TREE_VERSION = 1
ITEMS = ('params', 'batch_stats', 'opt_state', 'ema_params', 'train_state', 'data')


class CheckpointError(ValueError):
  """A missing, incomplete or incompatible checkpoint."""


class Checkpoints:
  """Save and restore the items of a step; `keep` last steps kept (None keeps all)."""

  def __init__(self, workdir, keep: int | None = None, async_save: bool = False):
    self.directory = workdir_lib.checkpoints_dir(workdir).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={name: ocp.StandardCheckpointHandler() for name in ITEMS})

  def save(self, step: int, items: Mapping[str, Any]) -> None:
    """Saves the non-empty items of `items` (names from ITEMS) as step `step`."""
    unknown = set(items) - set(ITEMS)
    if unknown:
      raise ValueError(f'unknown checkpoint items {sorted(unknown)}; known: {ITEMS}')
    present = {name: ocp.args.StandardSave(tree) for name, tree in items.items()
               if tree is not None and jax.tree.leaves(tree)}
    metadata = {'atlas_jax_version': __version__, 'param_tree_version': PARAM_TREE_VERSION}
    self.manager.save(step, args=ocp.args.Composite(**present), custom_metadata=metadata, force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def items_at(self, step: int) -> set[str]:
    step_dir = self.directory / str(step)
    return {name for name in ITEMS if (step_dir / name).is_dir()}

  def _check_version(self, step: int) -> None:
    metadata = self.manager.metadata(step)
    custom = getattr(metadata, 'custom_metadata', None) or {}
    version = custom.get('param_tree_version')
    if version != PARAM_TREE_VERSION:
      raise CheckpointError(
          f'{self.directory / str(step)} has parameter-tree version {version}, this atlas_jax reads version '
          f'{PARAM_TREE_VERSION}: convert it again or use the atlas_jax version that wrote it '
          f'({custom.get("atlas_jax_version", "unknown")})')

  def restore(self, step: int, abstract_items: Mapping[str, Any]) -> dict[str, Any]:
    """Restores the items of `abstract_items` (trees of jax.ShapeDtypeStruct) that the step holds."""
    self._check_version(step)
    present = self.items_at(step)
    wanted = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()
              if name in present and tree is not None and jax.tree.leaves(tree)}
    restored = self.manager.restore(step, args=ocp.args.Composite(**wanted))
    return {name: restored[name] for name in wanted}


def restore_inference_variables(workdir, abstract_variables, step: int | None = None,
                                use_ema: bool = False) -> tuple[dict, int]:
  """params (EMA weights when asked and present) and batch_stats of `step` (default: latest) -> (variables, step)."""
  checkpoints = Checkpoints(workdir)
  try:
    steps = checkpoints.manager.all_steps()
    if not steps:
      raise CheckpointError(f'no checkpoint under {checkpoints.directory}: train or convert one first')
    step = max(steps) if step is None else step
    if step not in steps:
      raise CheckpointError(f'no checkpoint for step {step} under {checkpoints.directory}; '
                            f'steps present: {sorted(steps)}')
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
    raise CheckpointError(f'step {step} under {pathlib.Path(workdir)} has no batch_stats but the model has '
                          'BatchNorm: was it saved for another model?')
  return variables, step
