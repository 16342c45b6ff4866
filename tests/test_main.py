"""`python -m atlas_jax.main` end to end: exact resume after SIGKILL and SIGTERM, leftover partial saves,
TensorBoard events without TensorFlow, and the one-line errors."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import chex
import jax
import orbax.checkpoint as ocp
import pytest

from atlas_jax import metrics as metrics_lib
from tests.train_configs import FULL_RECIPE, ROOT, command_line_overrides

STEPS = 32
# The full recipe at 64 px (three scales). An asynchronous save takes longer than a few steps here, and a
# save waits for the one before, so a run is still early when its first checkpoint completes.
RUN_FLAGS = [
  '--config=configs/quickstart.py:steps=%d' % STEPS,
  *command_line_overrides(
    **{key.replace('.', '__'): value for key, value in FULL_RECIPE.items()},
    image_size=(64, 64),
    checkpoint__every_steps=8,
    log__every_steps=1,
    eval__every_steps=1000,
    checkpoint__async_save=True,
  ),
]
# Every run imports atlas_jax with TensorFlow unimportable: the events must still be written.
NO_TENSORFLOW = "import sys; sys.modules['tensorflow'] = None\n"


@pytest.fixture(scope='module')
def environment(tmp_path_factory):
  site = tmp_path_factory.mktemp('site')
  (site / 'sitecustomize.py').write_text(NO_TENSORFLOW)
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(site), str(ROOT)]), 'PYTHONUNBUFFERED': '1'}
  # RUN_FLAGS turn the run's own cache off (compilation_cache_dir ''), so the runs use the test session's
  # compilation cache (conftest.py): restarted runs and the other command-line tests reuse each other's
  # compiled programs.
  return env, []


def _command(workdir, extra):
  return [sys.executable, '-m', 'atlas_jax.main', *RUN_FLAGS, *extra, f'--workdir={workdir}']


def _run(workdir, environment, timeout=300):
  env, extra = environment
  return subprocess.run(
    _command(workdir, extra), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
  )


def _logged_steps(workdir) -> int:
  path = metrics_lib.metrics_path(workdir)
  if not path.exists():
    return 0
  lines = [line for line in path.read_text().splitlines() if '"kind": "train"' in line]
  return len(lines)


def _complete_checkpoints(workdir) -> list[int]:
  directory = pathlib.Path(workdir) / 'checkpoints'
  return (
    sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())
    if directory.is_dir()
    else []
  )


def _interrupt(workdir, environment, sig, ready) -> subprocess.CompletedProcess:
  """Starts a run and sends `sig` once `ready(workdir)` holds; returns the finished process."""
  env, extra = environment
  process = subprocess.Popen(
    _command(workdir, extra), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.monotonic() + 300
  while not ready(workdir):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.monotonic() < deadline, 'the run did not reach the step to interrupt'
    time.sleep(0.01)
  process.send_signal(sig)
  stdout, stderr = process.communicate(timeout=300)
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _final_items(workdir):
  step_dir = pathlib.Path(workdir) / 'checkpoints' / str(STEPS)
  checkpointer = ocp.StandardCheckpointer()
  return {
    name: checkpointer.restore(step_dir / name)
    for name in ('params', 'opt_state', 'ema_params', 'train_state', 'data')
  }


def _train_losses(workdir):
  return {
    record['step']: record['loss']
    for record in metrics_lib.read_metrics(workdir)
    if record['kind'] == 'train'
  }


@pytest.fixture(scope='module')
def uninterrupted(environment, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  result = _run(workdir, environment)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _assert_same_run(workdir, reference):
  assert _train_losses(workdir) == _train_losses(reference)
  assert sorted(_train_losses(workdir)) == list(range(1, STEPS + 1))
  got, want = _final_items(workdir), _final_items(reference)
  for name in want:
    assert jax.tree.leaves(want[name]), name
    chex.assert_trees_all_equal(got[name], want[name], custom_message=name)  # same tree, bitwise


def test_sigkill_between_checkpoints_then_restart_is_bitwise_the_uninterrupted_run(
  uninterrupted, environment, tmp_path
):
  def past_a_checkpoint(workdir):
    complete = _complete_checkpoints(workdir)
    return bool(complete) and _logged_steps(workdir) > complete[-1]

  killed = _interrupt(tmp_path, environment, signal.SIGKILL, past_a_checkpoint)
  assert killed.returncode == -signal.SIGKILL
  logged = _logged_steps(tmp_path)
  assert logged < STEPS
  last_complete = _complete_checkpoints(tmp_path)[-1]
  # What a kill during an asynchronous save leaves: a temporary directory orbax must not take for a step.
  partial = tmp_path / 'checkpoints' / f'{last_complete + 8}.orbax-checkpoint-tmp-1764000000000000'
  (partial / 'params').mkdir(parents=True, exist_ok=True)
  (partial / 'params' / 'garbage').write_bytes(b'\0' * 64)
  resumed = _run(tmp_path, environment)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resuming from step {last_complete}' in resumed.stdout  # the steps after it were redone
  _assert_same_run(tmp_path, uninterrupted)


def test_sigterm_saves_at_the_next_step_and_exits_cleanly_then_resumes_exactly(
  uninterrupted, environment, tmp_path
):
  env, extra = environment
  # keep=1: retention never removes the step saved at SIGTERM (it keeps the two newest steps).
  keep_one = (env, [*extra, '--config.checkpoint.keep=1'])
  stopped = _interrupt(tmp_path, keep_one, signal.SIGTERM, lambda workdir: _logged_steps(workdir) >= 5)
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  saved = int(stopped.stdout.split('preempted: saved step ')[1].split(';')[0])
  assert 5 <= saved < STEPS
  kept = _complete_checkpoints(tmp_path)
  assert kept[-1] == saved and len(kept) <= 2, kept
  # One line says so; orbax does not warn that the save (no evaluation) has no metrics.
  assert stopped.stdout.count('preempted') == 1 and 'SIGTERM' not in stopped.stderr
  assert 'tracked_metric' not in stopped.stdout + stopped.stderr
  assert (tmp_path / 'checkpoints' / str(saved)).is_dir()
  resumed = _run(tmp_path, environment)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resuming from step {saved}' in resumed.stdout
  _assert_same_run(tmp_path, uninterrupted)


def test_tensorboard_events_are_written_without_tensorflow(uninterrupted):
  from tensorboard.backend.event_processing import event_accumulator

  accumulator = event_accumulator.EventAccumulator(str(uninterrupted / 'tb'))
  accumulator.Reload()
  losses = accumulator.Scalars('train/loss')
  assert [event.step for event in losses] == list(range(1, STEPS + 1))
  expected = _train_losses(uninterrupted)
  for event in losses:
    assert event.value == pytest.approx(expected[event.step], rel=1e-6)
  assert 'eval/raw/top1' in accumulator.Tags()['scalars'] and 'eval/ema/top1' in accumulator.Tags()['scalars']


def test_a_config_without_data_fails_in_one_line_naming_where_it_looked(tmp_path):
  result = subprocess.run(
    [sys.executable, '-m', 'atlas_jax.main', '--config=configs/atlas_s_2048.py', f'--workdir={tmp_path}'],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, 'PYTHONPATH': str(ROOT)},
  )
  assert result.returncode == 1
  error_lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(error_lines) == 1 and 'data_dir' in error_lines[0] and '--config.data' in error_lines[0]
  assert 'Traceback' not in result.stderr


# The task is learnt in a jump somewhere past step 200, whose exact step moves with the CPU's floating point
# (250 steps at the peak rate held reached 65.5% on this machine one day, 300 reached 100%; the next day,
# another CPU, 300 ended at 74% after 94% at step 250: at the held peak rate the accuracy swung). So the
# quickstart's own schedule, cosine down to its min_lr, which settles instead of swinging: seed 1 reached
# 88% at 300 steps and 100% (loss 0.013) at 350, 2026-12-02.
QUICKSTART_TEST_STEPS = 350


def test_the_quickstart_learns_the_task_and_ends_saying_what_it_got(tmp_path):
  """The CI version of the README's first command: the quickstart on seed 1 (the README's is 42) for 350
  steps; at least 80% on the 4-class task (chance 25%); then the closing lines."""
  flags = [
    f'--config=configs/quickstart.py:steps={QUICKSTART_TEST_STEPS}',
    '--config.seed=1',
    '--config.data.synthetic_val_size=200',
    '--config.eval.every_steps=175',
    '--config.eval.batch_size=100',
    '--config.compilation_cache_dir=',
  ]
  # XLA's full optimisation here: this test is dominated by running steps, not compiling them.
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'XLA_FLAGS': ''}
  result = subprocess.run(
    [sys.executable, '-m', 'atlas_jax.main', *flags, f'--workdir={tmp_path}'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  evals = [record for record in metrics_lib.read_metrics(tmp_path) if record['kind'] == 'eval']
  final = evals[-1]
  assert final['step'] == QUICKSTART_TEST_STEPS and final['top1'] >= 0.8, evals
  best = max(evals, key=lambda record: (record['top1'], record['step']))
  lines = result.stdout.strip().splitlines()
  assert lines[-2] == (
    f'final validation top-1 {100 * final["top1"]:.1f}% (chance 25.0%) at step {QUICKSTART_TEST_STEPS}; '
    f'best {100 * best["top1"]:.1f}% at step {best["step"]}, checkpoint '
    f'{(tmp_path / "checkpoints").absolute()}/{best["step"]}'
  ), lines[-3:]
  assert (tmp_path / 'checkpoints' / str(best['step'])).is_dir()
  assert (
    lines[-1]
    == f'classify images with: python -m atlas_jax.predict --checkpoint={tmp_path} IMAGE_OR_FOLDER...'
  )
  assert 'top-5' not in result.stdout  # 4 classes: top-5 is always 1


def test_sigterm_while_the_run_starts_exits_0_saying_nothing_was_trained(tmp_path, environment):
  """SIGTERM a second after launch (imports, setup, compile: well before the first step ends)."""
  env, extra = environment
  process = subprocess.Popen(
    _command(tmp_path / 'run', extra),
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  time.sleep(1.0)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-2000:]
  assert 'SIGTERM before step 1: nothing was trained' in stdout
  assert not _complete_checkpoints(tmp_path / 'run')
