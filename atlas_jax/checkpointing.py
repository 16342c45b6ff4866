"""The only module that talks to orbax: checkpoints under WORKDIR/checkpoints/<step>/.

Items (docs/design.md): params, batch_stats (only when the model has BatchNorm: orbax refuses an empty item),
opt_state, ema_params, train_state, data. Each step records the atlas_jax version and the parameter-tree
version (atlas_jax.models.param_tree): a step of version 1 (one subtree per block) is read and stacked into
today's tree; any other version is refused with a message instead of mis-loaded. A step whose parameters
differ in names or shapes from the model being restored (another model's config) is refused in one line
naming the differing leaves, before orbax reads anything.

Every step records, in its own metadata, a fingerprint of each leaf of each item (atlas_jax/fingerprints.py:
independent of the array's layout, device count and storage backend). A restore checks that the step is
complete (orbax's commit_success.txt, its metadata) and that what it read matches the fingerprints; a step
that does not is a `DamagedCheckpoint`, and `restore_newest_good` reports it in one line and goes on to the
step before. Training sets a damaged or diverged step aside (`set_aside`: renamed `<step>.damaged` or
`<step>.diverged`, never deleted) so that the step can be written again.

Retention: the last `keep` steps (at least 1), the best one by validation top-1, and always the two newest:
the newest step is good only once the loss computed from its weights (the next step's) is known finite
(train.py), so the step before it stays until then.

A gs:// workdir's checkpoints are written by orbax itself (tensorstore for the arrays, etils.epath for the
rest; atlas_jax/storage.py bounds tensorstore's retries). A save or restore that fails there is one
`storage.StorageError` line; orbax marks a step complete only once every item is written (a
commit_success.txt on object storage), so the previous step stays the latest.
"""

import contextlib
import json
import logging
import os
import shutil
import sys
import threading
from typing import Any, Mapping

from absl import logging as absl_logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from atlas_jax import fingerprints, storage
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


class DamagedCheckpoint(CheckpointError):
  """A step that is incomplete, unreadable, or whose arrays do not match their recorded fingerprints."""


class CheckpointSaveError(AtlasError, OSError):
  """A save that failed (a full or read-only disk, storage gone): the previous step stays the latest."""


COMMIT_MARKER = 'commit_success.txt'  # orbax writes it last, locally and on object storage
METADATA_FILE = '_CHECKPOINT_METADATA'


BEST_METRIC = 'top1'
# What orbax's CheckpointManager logs at every save given no metrics while it ranks steps by them: here a
# step saved outside an evaluation (SIGTERM, checkpoint.every_steps, convert_torch), as meant.
_NO_METRICS_WARNING = 'Requested `tracked_metric`; did not provide metrics.'


class _DropNoMetricsWarning(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.getMessage() != _NO_METRICS_WARNING


class _DropBackgroundSaveFailures(logging.Filter):
  """orbax's own error records (with tracebacks) from its background save threads: a failed save is
  reported instead as one CheckpointSaveError line at the next step boundary. `--verbosity=1` keeps them."""

  def filter(self, record: logging.LogRecord) -> bool:
    from_orbax = f'{os.sep}orbax{os.sep}checkpoint{os.sep}' in record.pathname
    return not (from_orbax and record.levelno >= logging.ERROR and absl_logging.get_verbosity() < 1)


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


# What reading a step whose files are cut short, flipped or missing raises (tensorstore, zarr, OCDBT,
# orbax's metadata): only these make a step damaged.
_UNREADABLE_HINTS = (
  'while reading',
  'error reading',
  'data_loss',
  'decod',
  'corrupt',
  'checksum',
  'not_found',
  'no such file',
  'out_of_range',
  'unexpected end',
  'truncated',
  'failed to parse',
  'invalid',
  'metadata',
)


def _unreadable(error: BaseException) -> bool:
  text = str(error).lower()
  return isinstance(error, (FileNotFoundError, EOFError)) or any(hint in text for hint in _UNREADABLE_HINTS)


def _unreachable(error: BaseException) -> bool:
  text = str(error).lower()
  return isinstance(error, (ConnectionError, TimeoutError)) or any(
    hint in text for hint in _UNREACHABLE_HINTS
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
    if _unreachable(error):
      raise storage.unavailable(directory, operation, error) from None
    raise storage.StorageError(f'{operation} {directory}: {type(error).__name__}: {text[:300]}') from None


def _drop_closed_loop_callbacks(excepthook):
  """sys.excepthook without the 'Event loop is closed' errors that tensorstore's callbacks print (through
  PyErr_Print) when orbax gave up on a damaged step's reads, or on a failed save, and closed its event
  loop: the step or the save is reported in one line instead."""

  def hook(kind, value, traceback):
    if not _closed_loop(value):
      excepthook(kind, value, traceback)

  hook.wrapped = excepthook
  return hook


def _closed_loop(value) -> bool:
  return isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'


def _quiet_closed_loop_everywhere() -> None:
  """The same errors by the other routes a background thread's failure reaches stderr: sys.excepthook
  (tensorstore's callbacks), threading.excepthook, sys.unraisablehook; and asyncio's 'exception was never
  retrieved' records of the failed save's writes (the save is the one line). Kept with `--verbosity=1`."""
  if hasattr(sys.excepthook, 'wrapped'):
    return
  sys.excepthook = _drop_closed_loop_callbacks(sys.excepthook)
  thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook

  def thread_excepthook(arguments):
    if not _closed_loop(arguments.exc_value):
      thread_hook(arguments)

  def unraisablehook(unraisable):
    if not _closed_loop(unraisable.exc_value):
      unraisable_hook(unraisable)

  threading.excepthook, sys.unraisablehook = thread_excepthook, unraisablehook
  logging.getLogger('asyncio').addFilter(_DropUnretrievedSaveErrors())


class _DropUnretrievedSaveErrors(logging.Filter):
  """asyncio's 'exception was never retrieved' records: what orbax's cancelled writes leave behind when a
  save fails (reported as one CheckpointSaveError line). `--verbosity=1` keeps them."""

  def filter(self, record: logging.LogRecord) -> bool:
    unretrieved = 'exception was never retrieved' in str(record.msg)
    return not (unretrieved and absl_logging.get_verbosity() < 1)


class Checkpoints:
  """Save and restore the items of a step; the last `keep` steps (None: all) and the best one are kept.

  The best step is the one saved with the highest `metrics['top1']` (validation top-1); steps saved
  without metrics are kept only while they are among the last `keep`.
  """

  def __init__(self, workdir, keep: int | None = None, async_save: bool = False):
    directory = workdir_lib.checkpoints_dir(workdir)
    self.directory = directory if storage.is_remote(workdir) else directory.absolute()
    if keep is not None and keep < 1:
      raise ValueError(f'keep must be at least 1 (or None: every step), got {keep}')
    policies = [
      preservation_policy.LatestN(n=None if keep is None else max(keep, 2)),  # the newest good step stays
      preservation_policy.BestN(get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False),
    ]
    options = ocp.CheckpointManagerOptions(
      create=True,
      enable_async_checkpointing=async_save,
      best_fn=_best_metric,
      best_mode='max',
      preservation_policy=preservation_policy.AnyPreservationPolicy(policies),
    )
    self._quiet = _DropBackgroundSaveFailures()
    absl_logging.get_absl_logger().addFilter(self._quiet)
    _quiet_closed_loop_everywhere()
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
    self._check_room(step, items)
    present = {
      name: ocp.args.StandardSave(tree)
      for name, tree in items.items()
      if tree is not None and jax.tree.leaves(tree)
    }
    metadata = {
      'atlas_jax_version': __version__,
      'param_tree_version': PARAM_TREE_VERSION,
      'fingerprints': {name: fingerprints.fingerprints(items[name]) for name in present},
    }
    metrics = None if metrics is None else {name: float(value) for name, value in metrics.items()}
    with (
      self._save_errors(f'saving step {step}'),
      _storage_errors(self.directory, f'saving step {step} to'),
      _without_no_metrics_warning(),
    ):
      # the warning is emitted by the call itself, before any asynchronous part
      self.manager.save(
        step, args=ocp.args.Composite(**present), custom_metadata=metadata, metrics=metrics, force=True
      )

  @contextlib.contextmanager
  def _save_errors(self, operation: str):
    """A failed save (raised now, or by an asynchronous save finishing) as one CheckpointSaveError line."""
    try:
      yield
    except (AtlasError, KeyboardInterrupt):
      raise
    except Exception as error:
      text = ' '.join(str(error).split())[:300] or type(error).__name__
      try:
        latest = self.manager.latest_step()
      except Exception:
        latest = None
      where = f'step {latest}' if latest is not None else 'none'
      raise CheckpointSaveError(
        f'{operation} to {self.directory} failed: {type(error).__name__}: {text}. The newest complete '
        f'checkpoint is {where}; free space or fix the workdir, then run the same command again to resume'
      ) from None

  def _check_room(self, step: int, items: Mapping[str, Any]) -> None:
    """CheckpointSaveError before a local save that cannot fit: the disk's free bytes against the size of
    the newest step on disk (or the items' bytes before the first), so a full disk is one line before
    orbax starts writing. Object storage has no free space to read; a multi-process run (whose processes
    would have to agree on the refusal) leaves it to the save's own failure."""
    if storage.is_remote(self.directory) or jax.process_count() > 1:
      return
    self.wait()  # the save before this one is complete: its size is final
    latest = self.manager.latest_step()
    needed = sum(leaf.nbytes for leaf in jax.tree.leaves(items) if hasattr(leaf, 'nbytes'))
    if latest is not None:
      needed = max(needed, _disk_bytes(self.directory / str(latest)))
    free = shutil.disk_usage(self.directory).free
    if free < needed:
      where = f'step {latest}' if latest is not None else 'none'
      raise CheckpointSaveError(
        f'saving step {step} to {self.directory} needs about {needed / 2**20:.1f} MiB but its disk has '
        f'{free / 2**20:.1f} MiB free; nothing was written. The newest complete checkpoint is {where}; free '
        'space, then run the same command again to resume'
      )

  def check_for_errors(self) -> None:
    """CheckpointSaveError when an asynchronous save has failed since the last call (no waiting)."""
    with self._save_errors('an asynchronous save'):
      self.manager.check_for_errors()

  def wait(self) -> None:
    with self._save_errors('saving a checkpoint'), _storage_errors(self.directory, 'saving a checkpoint to'):
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      with (
        self._save_errors('saving a checkpoint'),
        _storage_errors(self.directory, 'closing the checkpoints in'),
      ):
        self.manager.close()
    finally:
      absl_logging.get_absl_logger().removeFilter(self._quiet)

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

  def check_complete(self, step: int) -> None:
    """DamagedCheckpoint when step `step` lacks orbax's commit marker or its metadata: a save cut short, a
    half-copied or emptied step directory."""
    step_dir = self.directory / str(step)
    for name, what in ((COMMIT_MARKER, 'its commit marker'), (METADATA_FILE, 'its metadata')):
      if not storage.isfile(step_dir / name):
        raise DamagedCheckpoint(f'{step_dir} is incomplete: {what} ({name}) is missing')

  def set_aside(self, step: int, reason: str) -> str:
    """Renames step `step` to `<step>.<reason>` (or `<step>.<reason>-N`), out of orbax's sight and never
    deleted, so the step can be saved again; returns the new path."""
    self.wait()
    source = self.directory / str(step)
    for number in range(1, 1000):
      target = self.directory / (f'{step}.{reason}' if number == 1 else f'{step}.{reason}-{number}')
      if not storage.exists(target):
        break
    with _storage_errors(self.directory, f'setting step {step} aside in'):
      storage.move_tree(source, target)
      self.manager.reload()
    return str(target)

  def items_at(self, step: int) -> set[str]:
    step_dir = self.directory / str(step)
    return {name for name in ITEMS if storage.isdir(step_dir / name)}

  def tree_version(self, step: int) -> int:
    """The parameter-tree version step `step` was written with; CheckpointError if this code cannot read it."""
    custom = self._custom_metadata(step)
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
    self.check_complete(step)
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
      try:
        restored = self.manager.restore(
          step,
          args=ocp.args.Composite(**{name: ocp.args.StandardRestore(tree) for name, tree in stored.items()}),
        )
      except (AtlasError, KeyboardInterrupt):
        raise
      except Exception as error:
        if storage.is_remote(self.directory) and _unreachable(error):
          raise  # the storage, not the step: one StorageUnavailable line, no fallback to an older step
        if not _unreadable(error):
          raise  # not the step's files (a target that does not fit, a bug): never a reason to skip it
        text = ' '.join(str(error).split())[:200]
        raise DamagedCheckpoint(
          f'{self.directory / str(step)} cannot be read: {type(error).__name__}: {text}'
        ) from None
    restored = {name: restored[name] for name in wanted}
    self._verify(step, restored)
    if version == 1:
      for name in PARAMETER_ITEMS:
        if name in restored:
          restored[name] = _stacked_as(restored[name], wanted[name])
    return restored

  def _verify(self, step: int, restored: Mapping[str, Any]) -> None:
    """DamagedCheckpoint when a restored item differs from the fingerprints its step recorded (steps
    written before fingerprints existed are read unverified)."""
    recorded = self._custom_metadata(step).get('fingerprints') or {}
    for name, tree in restored.items():
      if name not in recorded:
        continue
      differing = fingerprints.differing(recorded[name], tree)
      if differing:
        shown = ', '.join(f'{name}/{path}' for path in differing[:2])
        more = f' and {len(differing) - 2} more' if len(differing) > 2 else ''
        verb = 'does' if len(differing) == 1 else 'do'
        raise DamagedCheckpoint(
          f'{self.directory / str(step)} is damaged: {shown}{more} {verb} not match the fingerprint '
          'recorded when it was saved'
        )

  def _custom_metadata(self, step: int) -> dict:
    """What `save` recorded in the step's own metadata file, read as JSON (orbax's `metadata()` would also
    open every array); DamagedCheckpoint when that file is unreadable."""
    path = self.directory / str(step) / METADATA_FILE
    try:
      with _storage_errors(self.directory, f'reading the metadata of step {step} in'):
        recorded = json.loads(storage.read_text(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
      if isinstance(error, storage.StorageUnavailable):
        raise
      raise DamagedCheckpoint(f'{path} cannot be read: {type(error).__name__}: {error}') from None
    custom = recorded.get('custom_metadata') if isinstance(recorded, dict) else None
    return dict(custom) if isinstance(custom, dict) else {}

  def restore_newest_good(self, restore_step, steps=None, on_damaged=None):
    """`restore_step(step)` for the newest of `steps` (default: all, newest first) that restores without a
    DamagedCheckpoint -> (its result, step); each damaged step is printed in one line (process 0) and
    passed to `on_damaged(step, error)`. (None, None) when there is no step; CheckpointError when every step
    is damaged."""
    steps = list(reversed(self.all_steps())) if steps is None else list(steps)
    damaged = []
    for step in steps:
      try:
        return restore_step(step), step
      except DamagedCheckpoint as error:
        damaged.append(step)
        if jax.process_index() == 0:
          print(f'skipping step {step}: {error}', flush=True)
        if on_damaged is not None:
          on_damaged(step, error)
    if damaged:
      raise CheckpointError(
        f'every checkpoint under {self.directory} is damaged (steps {", ".join(map(str, damaged))}): '
        'start a new --workdir, or restore the files from a copy'
      )
    return None, None

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


def _disk_bytes(directory) -> int:
  """Bytes the files under a local directory take on disk (whole blocks, as a full disk counts them)."""
  total = 0
  for root, _, files in os.walk(directory):
    for name in files:
      try:
        total += os.stat(os.path.join(root, name)).st_blocks * 512
      except OSError:
        pass
  return total


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'a/b/kernel': shape} of every array leaf of `tree` (arrays, jax.ShapeDtypeStruct or orbax's metadata)."""
  return {
    fingerprints.leaf_path(path): tuple(int(size) for size in leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    if hasattr(leaf, 'shape')
  }


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

  `step` None picks the best step by validation top-1 when one is recorded, else the latest; a damaged
  step is reported in one line and the newest good one read instead. A damaged `step` given explicitly is
  one DamagedCheckpoint line.
  """
  checkpoints = Checkpoints(workdir)
  params_item = 'ema_params' if use_ema else 'params'

  def restore(step):
    if use_ema and 'ema_params' not in checkpoints.items_at(step):
      raise CheckpointError(f'step {step} under {checkpoints.directory} has no EMA weights')
    abstract = {
      'batch_stats': abstract_variables.get('batch_stats'),
      params_item: abstract_variables['params'],
    }
    return checkpoints.restore(step, abstract)

  try:
    steps = checkpoints.all_steps()
    if not steps:
      raise CheckpointError(f'no checkpoint under {checkpoints.directory}: train or convert one first')
    if step is not None:
      if step not in steps:
        raise CheckpointError(
          f'no checkpoint for step {step} under {checkpoints.directory}; steps present: {sorted(steps)}'
        )
      restored = restore(step)
    else:
      best = checkpoints.best_step()
      order = sorted(steps, reverse=True)
      if best is not None:
        order = [best] + [other for other in order if other != best]
      restored, step = checkpoints.restore_newest_good(restore, order)
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
