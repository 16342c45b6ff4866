"""Train or evaluate: `python -m atlas_jax.main --config=configs/NAME.py[:ARG] --workdir=DIR [--config.F=V]`.

`--config.mode` picks the job: `train` (default; resumes by itself from the workdir's latest checkpoint),
`eval` (the workdir's best or latest checkpoint, or `init_from`), `linear_eval` (a closed-form linear
classifier on that checkpoint's frozen features, top-1 on the validation split), or `compile` (compile the train step for
the configured mesh and batch, report the memory it needs per device and whether that fits
`device_memory_gib`; exit code 1 when it does not; needs no `--workdir`). Training and the evaluations hold
WORKDIR/lock while they run; `--force_unlock` takes it over from a job that is gone (docs/workdir_integrity.md).

A config mistake on the command line (a config file that does not exist, a bad `:ARG`, a misspelt
`--config.FIELD`, with the nearest field named, or one given twice) is one `error:` line and exit code 1,
before absl parses the flags (`atlas_jax.config.check_command_line`); a value absl cannot parse
(`--config.lr=abc`) is one line from `atlas_jax.config.parse_flags`, a value out of range one line from
`atlas_jax.config.resolve`.
"""

import os
import signal


class PendingSigterm:
  """The SIGTERM handler until training installs its own: it only records the signal, which training's
  handler (train.Preemption) takes over, so a SIGTERM while the run starts up is a clean stop."""

  requested = False

  def __call__(self, signum, frame):
    del signum, frame
    self.requested = True


# First, before the slow imports: a SIGTERM from here on no longer kills the process half-started.
PENDING_SIGTERM = PendingSigterm()
signal.signal(signal.SIGTERM, PENDING_SIGTERM)

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from atlas_jax.errors import AtlasError, one_line_errors  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'A config file under configs/, optionally with `:ARG`.', lock_config=True
)
flags.DEFINE_string(
  'workdir', None, 'Where config.json, checkpoints/, tb/ and metrics.jsonl live; mode=compile needs none.'
)
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-host runs.')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-host run.')
flags.DEFINE_integer('process_id', None, 'This process of a multi-host run, 0 to num_processes - 1.')
flags.DEFINE_bool(
  'multihost',
  False,
  'Initialize jax.distributed from the cluster environment (SLURM, Cloud '
  'TPU, Open MPI) instead of --coordinator_address/--num_processes/--process_id.',
)
flags.DEFINE_bool(
  'force_unlock',
  False,
  'Take WORKDIR/lock over from the job holding it (training, mode=eval): only when that job is gone.',
)
flags.mark_flags_as_required(['config'])  # --workdir too, except for mode=compile: checked in main


@one_line_errors  # an AtlasError is one line a user can act on, exit code 1; any other error is a bug
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS['verbosity'].present:
    # orbax and JAX log every save at INFO; the run prints its own progress. --verbosity=0 brings INFO back.
    logging.set_verbosity(logging.WARNING)
  import jax  # after absl parsed the flags, so XLA_FLAGS set by a launcher apply

  from atlas_jax import config as config_lib

  config = config_lib.resolve(FLAGS.config)  # every field checked before anything starts or compiles
  if config.mode != 'train':  # only training stops cleanly; any other job ends on SIGTERM as usual
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if PENDING_SIGTERM.requested:
      os.kill(os.getpid(), signal.SIGTERM)
  if config.mode != 'compile' and not FLAGS.workdir:
    raise AtlasError(
      f'--workdir is required for mode={config.mode}; pass --workdir=DIR, '
      'where the run keeps its checkpoints and metrics'
    )
  _start_distributed(jax)
  if config.compilation_cache_dir:
    from atlas_jax import storage  # a gs:// cache: JAX writes it through etils.epath (gcsfs)

    jax.config.update('jax_compilation_cache_dir', storage.expand(config.compilation_cache_dir))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  logging.info(
    'JAX %s on %d %s devices, process %d of %d',
    jax.__version__,
    jax.device_count(),
    jax.default_backend(),
    jax.process_index(),
    jax.process_count(),
  )
  from atlas_jax import evaluate, train  # after distributed initialization

  if config.mode == 'eval':
    evaluate.run(config, FLAGS.workdir, force_unlock=FLAGS.force_unlock)
  elif config.mode == 'linear_eval':
    from atlas_jax import linear_eval

    linear_eval.run(config, FLAGS.workdir, force_unlock=FLAGS.force_unlock)
  elif config.mode == 'compile':
    return 0 if train.compile_only(config)['fits'] else 1  # absl exits with it: 1 = does not fit
  else:
    train.run(config, FLAGS.workdir, force_unlock=FLAGS.force_unlock)


def _start_distributed(jax) -> None:
  try:
    if FLAGS.coordinator_address or FLAGS.num_processes:
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.multihost:
      jax.distributed.initialize()  # JAX reads the coordinator, process count and id from the environment
  except (ValueError, RuntimeError) as error:
    where = (
      '--coordinator_address/--num_processes/--process_id'
      if FLAGS.coordinator_address or FLAGS.num_processes
      else 'the environment (SLURM, Cloud TPU, Open MPI)'
    )
    reason = str(error).rstrip('.')
    raise AtlasError(
      f"jax.distributed could not start from {where}: {reason}. Run under the cluster's "
      'launcher or pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I'
    ) from None


def _parse_flags(argv: list[str]) -> list[str]:
  """app.run's flag parser: config.parse_flags, every command-line mistake (a config file that does not
  exist, a misspelt or repeated --config.FIELD, a value of the wrong type, an unknown flag) one line."""
  from atlas_jax import config as config_lib

  return config_lib.parse_flags(argv)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
