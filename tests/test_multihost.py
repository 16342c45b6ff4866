"""Two processes on localhost (`jax.distributed` over CPU, two fake devices each) against one process with four
devices: the same training, collective checkpoints, and SIGTERM on one process stopping both at one step."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from atlas_jax import metrics as metrics_lib
from tests.train_configs import FULL_RECIPE, ROOT, command_line_overrides

STEPS = 16
SYNC_STEPS = 2
# FSDP across the two hosts too: the mesh is 2 (data) x 2 (fsdp), and leaves of >= 512 elements are split.
RUN_FLAGS = [
  '--config=configs/quickstart.py:steps=%d' % STEPS,
  *command_line_overrides(
    **{key.replace('.', '__'): value for key, value in FULL_RECIPE.items()},
    mesh__fsdp=2,
    mesh__fsdp_min_size=512,
    checkpoint__every_steps=8,
    log__every_steps=1,
    eval__every_steps=1000,
    checkpoint__async_save=True,
    checkpoint__preemption_sync_steps=SYNC_STEPS,
  ),
]
ITEMS = ('params', 'opt_state', 'ema_params', 'train_state', 'data')


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return ''  # the test session's compilation cache (conftest.py): restarted runs reuse the compiled steps


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    return probe.getsockname()[1]


def _start(workdir, cache, devices: int, process_id: int | None = None, port: int | None = None, flags=None):
  flags = RUN_FLAGS if flags is None else flags
  command = [
    sys.executable,
    '-m',
    'atlas_jax.main',
    *flags,
    f'--workdir={workdir}',
  ]
  assert f'--config.compilation_cache_dir={cache}' in flags  # given once: a field given twice is refused
  if process_id is not None:
    command += [f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={process_id}']
  env = {
    **os.environ,
    'PYTHONPATH': str(ROOT),
    'PYTHONUNBUFFERED': '1',
    'XLA_FLAGS': f'{os.environ.get("XLA_FLAGS", "")} --xla_force_host_platform_device_count={devices}',
  }
  return subprocess.Popen(
    command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def _finish(processes, timeout=240):
  results = []
  for process in processes:
    try:
      stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for other in processes:
        other.kill()
      raise
    results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
  return results


def _start_pair(workdir, cache, flags=None):
  port = _free_port()
  return [_start(workdir, cache, 2, process_id, port, flags) for process_id in (0, 1)]


def _train_losses(workdir):
  return {
    record['step']: record['loss']
    for record in metrics_lib.read_metrics(workdir)
    if record['kind'] == 'train'
  }


def _final_items(workdir):
  """The items of the last step, restored whole onto this process's first device (they were written
  sharded over 4 devices)."""
  step_dir = pathlib.Path(workdir) / 'checkpoints' / str(STEPS)
  checkpointer = ocp.StandardCheckpointer()
  on_one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  items = {}
  for name in ITEMS:
    metadata = checkpointer.metadata(step_dir / name).item_metadata
    target = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=on_one_device), metadata
    )
    items[name] = checkpointer.restore(step_dir / name, target)
  return items


def _adam_second_moment(opt_state):
  """The `nu` tree (running mean of squared gradients, the params' structure) inside the optax state."""
  if isinstance(opt_state, dict):
    if 'nu' in opt_state:
      return opt_state['nu']
    children = opt_state.values()
  elif isinstance(opt_state, (list, tuple)):
    children = opt_state
  else:
    return None
  for child in children:
    found = _adam_second_moment(child)
    if found is not None:
      return found
  return None


def _relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))


def _assert_same_training(workdir, reference):
  """Losses of every step and the final checkpoint's items within 1e-5 relative per leaf (collectives across
  processes sum in another order, so not bitwise).

  One exception, by construction of attention: the key half of a kv bias gets a gradient that is zero in
  exact arithmetic (softmax ignores a shift shared by all keys), so its gradient is rounding noise (~1e-12)
  and Adam, which divides by the gradient's own size, turns any other summation order into other steps of
  up to the learning rate. Parameters whose gradient RMS is nonzero but below 1e-9 (real ones are above
  1e-6 here; dead ReLU units have exact zeros, which are compared as usual) are held to that bound instead.
  """
  got_losses, want_losses = _train_losses(workdir), _train_losses(reference)
  assert sorted(got_losses) == list(range(1, STEPS + 1))
  for step, loss in want_losses.items():
    assert got_losses[step] == pytest.approx(loss, rel=1e-5), step
  got, want = _final_items(workdir), _final_items(reference)
  noise_only = jax.tree.map(
    lambda nu: (np.asarray(nu) > 0) & (np.sqrt(np.asarray(nu)) < 1e-9), _adam_second_moment(want['opt_state'])
  )
  assert (
    0
    < sum(mask.sum() for mask in jax.tree.leaves(noise_only))
    < 0.01 * sum(mask.size for mask in jax.tree.leaves(noise_only))
  )
  for name in ITEMS:
    got_leaves, want_leaves = jax.tree.leaves(got[name]), jax.tree.leaves(want[name])
    assert len(got_leaves) == len(want_leaves) > 0, name
    masks = jax.tree.leaves(noise_only) if name in ('params', 'ema_params') else [None] * len(want_leaves)
    for got_leaf, want_leaf, mask in zip(got_leaves, want_leaves, masks):
      if mask is None:
        assert _relative_error(got_leaf, want_leaf) < 1e-5, name
        continue
      got_leaf, want_leaf = np.asarray(got_leaf), np.asarray(want_leaf)
      assert _relative_error(got_leaf[~mask], want_leaf[~mask]) < 1e-5, name
      assert np.all(np.abs(got_leaf[mask] - want_leaf[mask]) <= STEPS * 2e-3), name  # quickstart's lr 2e-3


@pytest.fixture(scope='module')
def one_process(cache, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one_process')
  [result] = _finish([_start(workdir, cache, 4)])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_two_processes_train_as_one_and_a_sigterm_to_either_stops_both_at_one_step_then_they_resume(
  one_process, cache, tmp_path
):
  """The pair is interrupted (SIGTERM to the second process only), restarted, and then has trained exactly
  as one process with the same four devices does."""
  pair = _start_pair(tmp_path, cache)
  metrics_file = metrics_lib.metrics_path(tmp_path)
  deadline = time.monotonic() + 240
  while not metrics_file.exists() or metrics_file.read_text().count('"kind": "train"') < 3:
    assert all(process.poll() is None for process in pair), pair[0].communicate()[1][-3000:]
    assert time.monotonic() < deadline, 'the pair did not reach the step to interrupt'
    time.sleep(0.01)
  pair[1].send_signal(signal.SIGTERM)
  first, second = _finish(pair)
  assert first.returncode == 0, first.stderr[-3000:]
  assert second.returncode == 0, second.stderr[-3000:]
  # Both agreed at a sync step and saved that one step, collectively.
  saved = [int(result.stdout.split('preempted: saved step ')[1].split(';')[0]) for result in (first, second)]
  assert saved[0] == saved[1] and saved[0] % SYNC_STEPS == 0 and 3 <= saved[0] < STEPS, saved
  assert (tmp_path / 'checkpoints' / str(saved[0])).is_dir()

  first, second = _finish(_start_pair(tmp_path, cache))
  assert first.returncode == 0, first.stderr[-3000:]
  assert second.returncode == 0, second.stderr[-3000:]
  assert f'resuming from step {saved[0]}' in first.stdout
  _assert_same_training(tmp_path, one_process)
  # Only process 0 printed progress and wrote the config, metrics and TensorBoard events (one file per run).
  assert f'step {STEPS}/' in first.stdout and f'step {STEPS}/' not in second.stdout
  assert len(list((tmp_path / 'tb').iterdir())) == 2
  assert json.loads((tmp_path / 'config.json').read_text())
  # Evaluation counted every validation example once across the two processes.
  evals = [record for record in metrics_lib.read_metrics(tmp_path) if record['kind'] == 'eval']
  reference = [record for record in metrics_lib.read_metrics(one_process) if record['kind'] == 'eval']
  assert [(record['weights'], record['examples']) for record in evals] == [('raw', 12), ('ema', 12)]
  for got, want in zip(evals, reference, strict=True):
    assert (got['weights'], got['top1']) == (want['weights'], want['top1'])
    assert got['loss'] == pytest.approx(want['loss'], rel=1e-5)


# One image's rows split over the four devices of both processes (docs/spatial.md): 8x8 tokens in 2x2
# windows give 4 rows of windows; the batch is one data-parallel group, so both processes load the same
# examples and each hands over only its two devices' rows. The plain recipe: what is particular to two
# processes is the data each supplies and the collectives between them; the full recipe under the split
# (drop path, Mixup/CutMix, accumulation, EMA) is tests/spatial_check.py's, on 8 devices. Compiling it
# was most of this test: each process took 37 s alone with it, 28 s without.
SPATIAL_STEPS = 3
SPATIAL_FLAGS = [
  '--config=configs/quickstart.py:steps=%d' % SPATIAL_STEPS,
  *command_line_overrides(
    model__window=2,
    mesh__data=1,
    mesh__spatial=4,
    checkpoint__every_steps=SPATIAL_STEPS,
    log__every_steps=1,
    eval__every_steps=1000,
    optimizer__eps=1e-3,  # as tests/spatial_check.py: zero-in-exact-arithmetic gradients stay small
  ),
]


def test_two_processes_split_each_image_over_both_and_train_as_one(cache, tmp_path):
  pair_dir, one_dir = tmp_path / 'pair', tmp_path / 'one'
  processes = _start_pair(pair_dir, cache, SPATIAL_FLAGS) + [_start(one_dir, cache, 4, flags=SPATIAL_FLAGS)]
  for result in _finish(processes):
    assert result.returncode == 0, result.stderr[-3000:]
  got, want = _train_losses(pair_dir), _train_losses(one_dir)
  assert sorted(got) == list(range(1, SPATIAL_STEPS + 1))
  for step, loss in want.items():
    assert got[step] == pytest.approx(loss, rel=1e-5), step
  checkpointer = ocp.StandardCheckpointer()
  on_one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = []
  for workdir in (pair_dir, one_dir):
    step_dir = workdir / 'checkpoints' / str(SPATIAL_STEPS) / 'params'
    target = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=on_one_device),
      checkpointer.metadata(step_dir).item_metadata,
    )
    params.append(checkpointer.restore(step_dir, target))
  for got_leaf, want_leaf in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1]), strict=True):
    # Adam's first steps move each parameter by about lr; summation order moves them by far less.
    assert np.abs(np.asarray(got_leaf) - np.asarray(want_leaf)).max() <= 1e-5


def test_multihost_outside_a_cluster_fails_in_one_line(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'atlas_jax.main',
      '--config=configs/quickstart.py',
      f'--workdir={tmp_path}',
      '--multihost',
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, 'PYTHONPATH': str(ROOT)},
  )
  assert result.returncode == 1
  error_lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(error_lines) == 1 and '--coordinator_address' in error_lines[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr and not (tmp_path / 'config.json').exists()
