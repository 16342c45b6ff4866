"""A workdir nothing can corrupt, through the command line: the lease lock, verified checkpoints (damaged
steps skipped and set aside), retention, save failures on a full or read-only disk, divergence.

Most runs reuse one trained workdir (6 steps, checkpoints 2, 4, 6), copied per test; a run on a finished
workdir ("already complete") takes the lock and reads the newest good step without compiling the step.
"""

import fcntl
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest

from atlas_jax import metrics as metrics_lib
from tests import conftest
from tests.train_configs import ROOT, command_line_overrides

STEPS = 6
FLAGS = command_line_overrides(
  log__every_steps=1, eval__every_steps=1000, checkpoint__every_steps=2, checkpoint__async_save=False
)


def _command(workdir, *extra, steps=STEPS):
  """The tiny run; a --config.FIELD=VALUE in `extra` replaces FLAGS' value of that field."""
  given = {flag.split('=')[0] for flag in extra}
  flags = [flag for flag in FLAGS if flag.split('=')[0] not in given]
  return [
    sys.executable,
    '-m',
    'atlas_jax.main',
    f'--config=configs/quickstart.py:steps={steps}',
    *flags,
    *extra,
    f'--workdir={workdir}',
  ]


def _env():
  return {**os.environ, 'PYTHONPATH': str(ROOT), 'PYTHONUNBUFFERED': '1'}


def _run(workdir, *extra, steps=STEPS) -> subprocess.CompletedProcess:
  return subprocess.run(
    _command(workdir, *extra, steps=steps), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
  )


def _error_line(result) -> str:
  """The one `error:` line of a refused run (and nothing else on stderr but warnings)."""
  lines = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(lines) == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  return lines[0]


def _steps(workdir) -> list[str]:
  return sorted(os.listdir(pathlib.Path(workdir) / 'checkpoints'))


def _items(workdir, step):
  step_dir = pathlib.Path(workdir) / 'checkpoints' / str(step)
  checkpointer = ocp.StandardCheckpointer()
  return {
    name: checkpointer.restore(step_dir / name) for name in ('params', 'opt_state', 'train_state', 'data')
  }


def _losses(workdir):
  return {
    record['step']: record['loss']
    for record in metrics_lib.read_metrics(workdir)
    if record['kind'] == 'train'
  }


def _assert_same_final_state(workdir, reference):
  assert _losses(workdir) == _losses(reference)
  got, want = _items(workdir, STEPS), _items(reference, STEPS)
  for name in want:
    chex.assert_trees_all_equal(got[name], want[name], custom_message=name)  # bitwise


@pytest.fixture(scope='session')
def trained():
  """A finished 6-step run (checkpoints 2, 4, 6), trained once per test session: the pytest workers share
  it through a directory beside the session's compilation cache (tests/conftest.py removes both), the first
  to get there trains it under a file lock. Tests copy it before changing anything."""
  shared = pathlib.Path(conftest.SHARED_DIR) / 'workdir_integrity'
  shared.mkdir(parents=True, exist_ok=True)
  workdir = shared / 'run'
  with open(shared / 'lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (shared / 'done').exists():
      shutil.rmtree(workdir, ignore_errors=True)
      result = _run(workdir)
      assert result.returncode == 0, result.stderr[-3000:]
      (shared / 'done').touch()
  assert _steps(workdir) == ['2', '4', '6'] and not (workdir / 'lock').exists()
  return workdir


def _copy(trained, tmp_path) -> pathlib.Path:
  copy = tmp_path / 'run'
  shutil.copytree(trained, copy)
  return copy


def _largest_data_files(item_dir: pathlib.Path) -> list[pathlib.Path]:
  """The item's largest OCDBT data file (under d/ or ocdbt.process_N/d/: where the arrays land depends on
  how orbax merged the processes' writes), the one holding its biggest arrays."""
  files = [*item_dir.glob('d/*'), *item_dir.glob('ocdbt.process_*/d/*')]
  return [max(files, key=lambda path: path.stat().st_size)]


def _flip_bytes(step_dir: pathlib.Path, count: int = 64) -> None:
  """Inverts `count` bytes of the parameters' largest data file where the arrays still decode, with other
  numbers: the damage only the fingerprints can tell (where the flip lands on a chunk's header or
  compressed framing instead, orbax cannot read it at all: the truncated file's case). Tries offsets from
  the middle on, keeping the first such flip."""
  import jax

  [target] = _largest_data_files(step_dir / 'params')
  original = target.read_bytes()
  want = jax.tree.leaves(ocp.StandardCheckpointer().restore(step_dir / 'params'))
  for offset in range(len(original) // 2, len(original) - count, 997):
    data = bytearray(original)
    for index in range(offset, offset + count):
      data[index] ^= 0xFF
    target.write_bytes(bytes(data))
    try:
      got = jax.tree.leaves(ocp.StandardCheckpointer().restore(step_dir / 'params'))
    except Exception:  # unreadable: try the next offset
      continue
    if any(not np.array_equal(g, w, equal_nan=True) for g, w in zip(got, want)):
      return
  target.write_bytes(original)
  raise AssertionError(f'no flip of {count} bytes in {target} decodes')


def _truncate(step_dir: pathlib.Path) -> None:
  for target in _largest_data_files(step_dir / 'opt_state'):
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])


# ---------------------------------------------------------------------------------------------------
# Damaged checkpoints: each reported in one line, set aside (never deleted), the step before resumed.


def test_flipped_bytes_a_truncated_file_no_commit_marker_and_an_empty_step_are_each_skipped(
  trained, tmp_path
):
  """Four damaged steps, newest first: a half-copied step 10 (no commit marker), an empty step 8, 64 flipped
  bytes in step 6's parameters, step 4's optimizer state cut in half. Each is one line and set aside; step 2
  resumes, bitwise the uninterrupted run."""
  workdir = _copy(trained, tmp_path)
  checkpoints = workdir / 'checkpoints'
  shutil.copytree(checkpoints / '2', checkpoints / '10')
  (checkpoints / '10' / 'commit_success.txt').unlink()
  (checkpoints / '8').mkdir()
  _flip_bytes(checkpoints / '6')
  _truncate(checkpoints / '4')
  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  skipped = [line for line in result.stdout.splitlines() if line.startswith('skipping step')]
  assert [line.split(':')[0] for line in skipped] == [f'skipping step {step}' for step in (10, 8, 6, 4)]
  assert 'is incomplete: its commit marker' in skipped[0] and 'is incomplete' in skipped[1]
  assert 'does not match the fingerprint' in skipped[2] and 'cannot be read' in skipped[3]
  assert 'resuming from step 2' in result.stdout
  assert _steps(workdir) == ['10.damaged', '2', '4', '4.damaged', '6', '6.damaged', '8.damaged']
  _assert_same_final_state(workdir, trained)


def test_predict_and_the_api_read_the_newest_good_step_past_a_damaged_one(trained, tmp_path):
  from atlas_jax import inference

  workdir = _copy(trained, tmp_path)
  _flip_bytes(workdir / 'checkpoints' / '6')
  model = inference.load(workdir)  # step 6 is the best (the only evaluation) but damaged
  assert model.step == 4
  assert (workdir / 'checkpoints' / '6').is_dir()  # readers never move or delete anything


# ---------------------------------------------------------------------------------------------------
# The lock.


def _write_lock(workdir, host, pid, heartbeat):
  record = {'host': host, 'pid': pid, 'purpose': 'training', 'started': heartbeat, 'heartbeat': heartbeat}
  (pathlib.Path(workdir) / 'lock').write_text(json.dumps({**record, 'token': 'theirs'}))


def _start(workdir, *extra, steps=STEPS) -> subprocess.Popen:
  return subprocess.Popen(
    _command(workdir, *extra, steps=steps),
    cwd=ROOT,
    env=_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_two_trainers_the_second_refused_the_first_finishes_and_a_later_run_resumes(trained, tmp_path):
  """The first run (resuming the trained workdir from step 2) is held still with SIGSTOP once it holds the
  lock, before its first step: a second trainer and an evaluation started then are refused while the first
  is alive, and the first, let go, trains to the end; a later run takes the lock and resumes its step."""
  workdir = _copy(trained, tmp_path)
  for step in ('4', '6'):
    shutil.rmtree(workdir / 'checkpoints' / step)
  first = _start(workdir)
  try:
    deadline = time.monotonic() + 240
    while not (workdir / 'lock').exists():
      assert first.poll() is None, first.communicate()[1][-3000:]
      assert time.monotonic() < deadline
      time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # alive and holding the lock for as long as the test needs
    holder = json.loads((workdir / 'lock').read_text())
    assert holder['pid'] == first.pid and holder['host'] == socket.gethostname()
    second, evaluation = _start(workdir), _start(workdir, '--config.mode=eval')
    for refused in (second, evaluation):
      stdout, stderr = refused.communicate(timeout=120)
      assert refused.returncode == 1
      line = _error_line(subprocess.CompletedProcess(refused.args, 1, stdout, stderr))
      assert f'is in use by training pid {first.pid} on {socket.gethostname()}' in line
      assert 'goes stale at' in line and '--force_unlock' in line
    first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=240)
  finally:
    if first.poll() is None:
      first.kill()
      first.communicate()
  assert first.returncode == 0, stderr[-3000:]  # the first run went on, untouched, to the end
  assert 'resuming from step 2' in stdout and f'step {STEPS}/{STEPS}' in stdout
  assert not (workdir / 'lock').exists()  # released
  later = _run(workdir)
  assert later.returncode == 0, later.stderr[-3000:]
  assert f'already complete at step {STEPS}' in later.stdout  # took the lock, read the first run's last step
  _assert_same_final_state(workdir, trained)


def test_a_dead_processs_lock_on_this_host_is_taken_over_at_once(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  gone = subprocess.run(
    [sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True
  )
  _write_lock(workdir, socket.gethostname(), int(gone.stdout), time.time())
  result = _run(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'its process {int(gone.stdout)} on this host is gone' in result.stdout
  assert 'already complete at step 6' in result.stdout
  assert not (workdir / 'lock').exists()


def test_another_hosts_lock_is_refused_until_its_heartbeat_is_stale(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  stale_flags = ('--config.checkpoint.lock_heartbeat_s=1', '--config.checkpoint.lock_stale_s=6')
  from atlas_jax import workdir_lock

  # While its heartbeat is fresh it holds (the refusal's command-line line is checked with two trainers).
  _write_lock(workdir, 'tpu-vm-7', 4242, time.time())
  with pytest.raises(workdir_lock.LockHeld, match='is in use by training pid 4242 on tpu-vm-7'):
    workdir_lock.WorkdirLock(workdir, 'training', stale_s=6).acquire()
  assert json.loads((workdir / 'lock').read_text())['token'] == 'theirs'  # left as it was
  _write_lock(workdir, 'tpu-vm-7', 4242, time.time() - 7)  # a job on another host that stopped beating
  taken = _run(workdir, *stale_flags)
  assert taken.returncode == 0, taken.stderr[-3000:]
  assert re.search(r'heartbeat is \d+ s old, over checkpoint.lock_stale_s=6', taken.stdout), taken.stdout
  assert not (workdir / 'lock').exists()


# ---------------------------------------------------------------------------------------------------
# Retention, the config check, divergence.


def test_keep_0_is_refused_in_one_line(tmp_path):
  result = _run(tmp_path / 'run', '--config.checkpoint.keep=0')
  assert result.returncode == 1 and 'config.checkpoint.keep' in _error_line(result)
  assert not (tmp_path / 'run').exists()


def test_nothing_is_written_before_the_config_is_checked_against_the_checkpoints(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  (workdir / 'config.json').unlink()
  metrics_before = (workdir / 'metrics.jsonl').read_bytes()
  result = _run(workdir, '--config.model.dim=32')
  assert result.returncode == 1 and 'holds a model of a different shape' in _error_line(result)
  assert not (workdir / 'config.json').exists() and not (workdir / 'lock').exists()
  assert (workdir / 'metrics.jsonl').read_bytes() == metrics_before
  assert _steps(workdir) == ['2', '4', '6']


def test_a_divergence_sets_the_blown_up_step_aside_and_a_sane_restart_resumes_from_the_good_one(
  trained, tmp_path
):
  workdir = _copy(trained, tmp_path)
  shutil.rmtree(workdir / 'checkpoints' / '6')
  # Resumed at step 4 after 4 sane steps, with an absurd learning rate: step 5's update blows the weights
  # up, step 6's loss (from step 5's weights) is not finite.
  diverged = _run(workdir, '--config.lr=1e20', '--config.checkpoint.every_steps=1')
  assert diverged.returncode == 1, diverged.stderr[-3000:]
  line = _error_line(diverged)
  assert 'at step 6 (computed from the weights of step 5); stopped' in line
  assert "Step 5's checkpoint, whose weights gave that loss, was set aside as" in line
  assert 'The newest good checkpoint is step 4' in line and 'a lower --config.lr' in line
  assert _steps(workdir) == ['2', '4', '5.diverged']
  restarted = _run(workdir)  # the sane learning rate again: resumes from step 4, exactly as first trained
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert 'resuming from step 4' in restarted.stdout
  _assert_same_final_state(workdir, trained)


# ---------------------------------------------------------------------------------------------------
# A full disk and a read-only workdir: small tmpfs mounts (root only; CI runs as root).


@pytest.fixture
def mount(tmp_path):
  if os.geteuid() != 0:
    pytest.skip('mounting a tmpfs needs root (CI runs as root)')
  mounted = []

  def make(name, options):
    point = tmp_path / name
    point.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(point)], check=True)
    mounted.append(point)
    return point

  yield make
  for point in mounted:
    subprocess.run(['umount', '-l', str(point)], check=False)


def test_a_read_only_workdir_and_a_full_disk_are_refused_at_start(mount):
  read_only = mount('read_only', 'size=1m,ro')
  result = _run(read_only / 'run')
  assert result.returncode == 1
  assert 'cannot write to the workdir' in _error_line(result) and 'Read-only file system' in _error_line(
    result
  )
  full = mount('full', 'size=256k')
  result = _run(full / 'run')
  assert result.returncode == 1
  line = _error_line(result)
  assert 'MiB free but one checkpoint needs about' in line
  assert os.listdir(full / 'run') == []  # the lock it took is gone again


def test_a_save_that_runs_out_of_space_is_one_line_and_the_previous_step_resumes(mount, tmp_path):
  disk = mount('disk', 'size=1400k')  # room for one checkpoint of the tiny model (~0.8 MiB), not two
  workdir = disk / 'run'
  result = _run(workdir, '--config.checkpoint.async_save=True', '--config.checkpoint.every_steps=2')
  assert result.returncode == 1
  line = _error_line(result)
  assert 'saving step 4' in line and 'MiB free; nothing was written' in line
  assert 'The newest complete checkpoint is step 2' in line
  assert [name for name in _steps(workdir) if name.isdigit()] == ['2']
  subprocess.run(['mount', '-o', 'remount,size=16m', str(disk)], check=True)  # space freed
  resumed = _run(workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming from step 2' in resumed.stdout


def test_an_asynchronous_save_that_fails_while_writing_is_one_line_and_leaves_no_step(mount):
  # Room for the state's bytes (the check before the first save) but not for the checkpoint on disk.
  disk = mount('small', 'size=700k')
  result = _run(disk / 'run', '--config.checkpoint.async_save=True', '--config.checkpoint.every_steps=2')
  assert result.returncode == 1
  # Under load, tensorstore's C++ callbacks can still meet orbax's closed event loop and print that error
  # straight to stderr, past every Python hook (once in the 2-worker run of these tests, 2026-12-02): not
  # this run's failure, which must still be one line with no other traceback.
  closed_loop = re.compile(
    r'Traceback \(most recent call last\):\n(?:  .*\n)*RuntimeError: Event loop is closed\n'
  )
  stderr = closed_loop.sub('', result.stderr)
  line = _error_line(subprocess.CompletedProcess(result.args, 1, result.stdout, stderr))
  # Which write meets the full disk first varies: tensorstore's array data (RESOURCE_EXHAUSTED) or one of
  # orbax's own files (OSError: No space left on device). Either is this one line.
  assert 'RESOURCE_EXHAUSTED' in line or 'No space left on device' in line, line
  assert 'The newest complete checkpoint is none' in line, line
  assert [name for name in _steps(disk / 'run') if name.isdigit()] == []  # the cut-short save is no step


# ---------------------------------------------------------------------------------------------------
# Fingerprints hold across device counts.

WRITE_ON_8_DEVICES = textwrap.dedent(
  """
  import sys
  import jax, jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from atlas_jax import checkpointing
  mesh = jax.make_mesh((4, 2), ('a', 'b'))
  values = jnp.sin(jnp.arange(192.0)).reshape(16, 12)
  tree = {'kernel': jax.device_put(values, NamedSharding(mesh, P('a', 'b'))), 'bias': jnp.arange(6.0)}
  checkpoints = checkpointing.Checkpoints(sys.argv[1])
  checkpoints.save(1, {'params': tree})
  checkpoints.close()
  # Small leaves are summed on the host shard by shard, large ones on the devices: the same sums.
  from atlas_jax import fingerprints
  leaves = [
    tree['kernel'],
    jax.device_put(values.astype(jnp.bfloat16).reshape(8, 2, 12), NamedSharding(mesh, P(None, 'b', 'a'))),
    jax.device_put(jnp.arange(48, dtype=jnp.int32).reshape(4, 12) % 5 == 0, NamedSharding(mesh, P('a'))),
    jnp.float32(2.5),
  ]
  on_host, on_devices = fingerprints.leaf_sums(leaves), fingerprints.leaf_sums(leaves, device_min_elements=0)
  assert all((h == d).all() for h, d in zip(on_host, on_devices, strict=True)), (on_host, on_devices)
  """
)


def test_fingerprints_of_a_checkpoint_written_on_8_devices_verify_on_1(tmp_path):
  import jax
  import jax.numpy as jnp

  from atlas_jax import checkpointing

  env = {**_env(), 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  written = subprocess.run(
    [sys.executable, '-c', WRITE_ON_8_DEVICES, str(tmp_path)], env=env, capture_output=True, text=True
  )
  assert written.returncode == 0, written.stderr[-3000:]
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {
    'params': {
      'kernel': jax.ShapeDtypeStruct((16, 12), jnp.float32, sharding=one_device),
      'bias': jax.ShapeDtypeStruct((6,), jnp.float32, sharding=one_device),
    }
  }
  checkpoints = checkpointing.Checkpoints(tmp_path)
  assert jax.device_count() == 1
  restored = checkpoints.restore(1, abstract)  # verified against the fingerprints written on 8 devices
  np.testing.assert_array_equal(restored['params']['kernel'], jnp.sin(jnp.arange(192.0)).reshape(16, 12))
  checkpoints.close()
  # The verification is real on this side too: a recorded fingerprint changed by one bit is caught.
  metadata_file = tmp_path / 'checkpoints' / '1' / '_CHECKPOINT_METADATA'
  metadata = json.loads(metadata_file.read_text())
  recorded = metadata['custom_metadata']['fingerprints']['params']['kernel']
  metadata['custom_metadata']['fingerprints']['params']['kernel'] = f'{int(recorded, 16) ^ 1:016x}'
  metadata_file.write_text(json.dumps(metadata))
  checkpoints = checkpointing.Checkpoints(tmp_path)
  with pytest.raises(checkpointing.DamagedCheckpoint, match='params/kernel does not match the fingerprint'):
    checkpoints.restore(1, abstract)
  checkpoints.close()


# ---------------------------------------------------------------------------------------------------
# The same on gs:// (a real fake-gcs-server, tests/gcs_server.py).


def test_on_gcs_the_lock_is_exclusive_and_a_damaged_step_is_skipped_and_set_aside(gcs_dir):
  import jax
  import jax.numpy as jnp

  from atlas_jax import checkpointing, storage, workdir_lock

  with workdir_lock.WorkdirLock(gcs_dir, 'training') as held:
    assert json.loads(storage.read_text(f'{gcs_dir}/lock'))['token'] == held.token
    with pytest.raises(workdir_lock.LockHeld, match=f'is in use by training pid {os.getpid()}'):
      workdir_lock.WorkdirLock(gcs_dir, 'evaluation', stale_s=3600).acquire()
  assert not storage.exists(f'{gcs_dir}/lock')  # released

  tree = {'params': {'kernel': jnp.arange(64.0).reshape(8, 8)}}
  checkpoints = checkpointing.Checkpoints(gcs_dir, keep=3)
  for step in (1, 2):
    checkpoints.save(step, tree)
  checkpoints.wait()
  # Step 2's recorded fingerprint no longer matches its arrays, as after flipped bytes.
  metadata_path = f'{gcs_dir}/checkpoints/2/_CHECKPOINT_METADATA'
  metadata = json.loads(storage.read_text(metadata_path))
  metadata['custom_metadata']['fingerprints']['params']['kernel'] = '0' * 16
  storage.write_text(metadata_path, json.dumps(metadata))
  abstract = {'params': {'kernel': jax.ShapeDtypeStruct((8, 8), jnp.float32)}}

  def set_aside(step, error):
    checkpoints.set_aside(step, 'damaged')

  restored, step = checkpoints.restore_newest_good(
    lambda step: checkpoints.restore(step, abstract), on_damaged=set_aside
  )
  assert step == 1
  np.testing.assert_array_equal(restored['params']['kernel'], tree['params']['kernel'])
  assert checkpoints.all_steps() == [1]
  assert storage.isfile(f'{gcs_dir}/checkpoints/2.damaged/commit_success.txt')  # moved, not deleted
  checkpoints.close()


def test_force_unlock_takes_a_live_lock_over_and_the_job_that_lost_it_stops_writing(tmp_path):
  from atlas_jax import workdir_lock

  holder = workdir_lock.WorkdirLock(tmp_path, 'training', heartbeat_s=0.05).acquire()
  taker = workdir_lock.WorkdirLock(tmp_path, 'training', force=True).acquire()
  assert json.loads((tmp_path / 'lock').read_text())['token'] == taker.token
  deadline = time.monotonic() + 10
  while holder.lost is None and time.monotonic() < deadline:
    time.sleep(0.02)
  with pytest.raises(workdir_lock.LockLost, match='was taken over by training pid'):
    holder.check()
  holder.release()  # not its lock any more: left in place
  assert json.loads((tmp_path / 'lock').read_text())['token'] == taker.token
  taker.release()
  assert not (tmp_path / 'lock').exists()
