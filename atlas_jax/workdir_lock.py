"""WORKDIR/lock: a lease that keeps two jobs from writing one workdir (docs/design.md).

Process 0 of a training run and `mode=eval` take it; `predict` and `inference.load` only read, and take
none. The lock is one small JSON object (holder's host, pid, the process's start ticks, start time, a
heartbeat, a random token), created atomically (`storage.create_if_absent`: O_EXCL locally, the
precondition ifGenerationMatch=0 on gs://). A thread renews the heartbeat every `heartbeat_s`.

A held lock is stale, and taken over, when
- its holder ran on this host and that process is gone (its pid is free or belongs to a process started at
  another time: a killed run is taken over at once), or
- its heartbeat is older than `stale_s` (a job killed on another host: a requeued job resumes after at
  most that long), or
- `--force_unlock` is given.
Otherwise the second job exits with one line naming the holder and when the lock goes stale. The lock is
released (deleted, if still ours) on every exit path but SIGKILL, which the rules above cover.
"""

import datetime
import json
import os
import secrets
import socket
import threading
import time

from atlas_jax import storage
from atlas_jax.errors import AtlasError

LOCK_FILE = 'lock'


class LockHeld(AtlasError, RuntimeError):
  """Another job holds the workdir's lock."""


class LockLost(AtlasError, RuntimeError):
  """This job's lock was taken over (--force_unlock elsewhere) while it ran."""


class WorkdirUnwritable(AtlasError, OSError):
  """The workdir cannot be written: read-only, full, or not permitted."""


def lock_path(workdir):
  return storage.join(workdir, LOCK_FILE)


def _start_ticks(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid; None elsewhere."""
  try:
    with open(f'/proc/{pid}/stat') as stat:
      fields = stat.read().rsplit(')', 1)[1].split()
    return int(fields[19])  # field 22 of stat(5), counted after the command name's ')'
  except (OSError, IndexError, ValueError):
    return None


def _process_alive(pid: int, start_ticks: int | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process: it exists
  return start_ticks is None or _start_ticks(pid) in (None, start_ticks)


def _when(timestamp: float) -> str:
  return datetime.datetime.fromtimestamp(timestamp).strftime('%Y-%m-%d %H:%M:%S')


def _unwritable(workdir, error: OSError) -> WorkdirUnwritable:
  reason = os.strerror(error.errno) if error.errno else str(error)
  return WorkdirUnwritable(
    f'cannot write to the workdir {workdir} ({reason}): free space or give a writable --workdir'
  )


class WorkdirLock:
  """`acquire()` or LockHeld; `check()` at step boundaries raises LockLost once another job took it over;
  `release()` deletes it if it is still ours. Also a context manager."""

  def __init__(self, workdir, purpose: str, heartbeat_s: float = 30, stale_s: float = 120, force=False):
    self.workdir = workdir
    self.path = lock_path(workdir)
    self.purpose = purpose
    self.heartbeat_s = heartbeat_s
    self.stale_s = stale_s
    self.force = force
    self.token = secrets.token_hex(8)
    self.host = socket.gethostname()
    self.started = time.time()
    self.lost: str | None = None  # why this job no longer holds the lock
    self._held = False
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def _record(self) -> bytes:
    return json.dumps(
      {
        'host': self.host,
        'pid': os.getpid(),
        'start_ticks': _start_ticks(os.getpid()),
        'purpose': self.purpose,
        'started': self.started,
        'heartbeat': time.time(),
        'token': self.token,
      },
      sort_keys=True,
    ).encode()

  def _read(self) -> dict | None:
    """The holder's record; None when there is no lock; {} while it is being written or unreadable."""
    try:
      text = storage.read_text(self.path)
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
    except json.JSONDecodeError:
      return {}
    return record if isinstance(record, dict) else {}

  def _stale_reason(self, holder: dict) -> str | None:
    age = time.time() - float(holder.get('heartbeat', 0))
    if holder.get('host') == self.host and not _process_alive(
      int(holder.get('pid', -1)), holder.get('start_ticks')
    ):
      return f'its process {holder.get("pid")} on this host is gone'
    if age > self.stale_s:
      return f'its heartbeat is {age:.0f} s old, over checkpoint.lock_stale_s={self.stale_s:g}'
    return None

  def describe(self, holder: dict) -> str:
    return (
      f'{holder.get("purpose", "a job")} pid {holder.get("pid")} on {holder.get("host")} '
      f'(started {_when(float(holder.get("started", 0)))})'
    )

  def acquire(self) -> 'WorkdirLock':
    try:
      storage.makedirs(self.workdir)
      for attempt in range(20):
        if storage.create_if_absent(self.path, self._record()):
          break
        holder = self._read()
        if holder is None:
          continue  # released meanwhile: try again
        if not holder:  # being written by the job that just created it
          if attempt < 10:
            time.sleep(0.2)
            continue
          holder = {'heartbeat': 0}  # never became readable: a lock file left broken
        reason = 'forced by --force_unlock' if self.force else self._stale_reason(holder)
        if reason is None:
          heartbeat = float(holder.get('heartbeat', 0))
          raise LockHeld(
            f'{self.workdir} is in use by {self.describe(holder)}, heartbeat {time.time() - heartbeat:.0f} s '
            f'ago; the lock goes stale at {_when(heartbeat + self.stale_s)} unless renewed. Wait for that '
            'job, use another --workdir, or pass --force_unlock if you are sure it is gone'
          )
        print(f'taking over the lock of {self.describe(holder)} on {self.workdir}: {reason}', flush=True)
        if self._read() == holder:  # still the one judged stale: another job may have taken it meanwhile
          storage.remove(self.path, missing_ok=True)
      else:
        raise LockHeld(f'could not take the lock {self.path}: other jobs keep taking it; try again')
    except OSError as error:
      if isinstance(error, AtlasError) or isinstance(error, FileNotFoundError):
        raise
      raise _unwritable(self.workdir, error) from None
    self._held = True
    self._thread = threading.Thread(target=self._renew, name='workdir-lock-heartbeat', daemon=True)
    self._thread.start()
    return self

  def _renew(self) -> None:
    warned = False
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = self._read()
        if not holder or holder.get('token') != self.token:
          self.lost = 'deleted' if holder is None else f'taken over by {self.describe(holder)}'
          return
        storage.write_bytes(self.path, self._record())
        warned = False
      except (
        Exception
      ) as error:  # a storage hiccup: the next beat tries again; the lock goes stale if it lasts
        if not warned:
          print(f'warning: could not renew the lock {self.path}: {error}', flush=True)
          warned = True

  def check(self) -> None:
    if self.lost:
      raise LockLost(
        f'the lock on {self.workdir} was {self.lost} while this job ran; stopped without writing more, '
        'so as not to mix two runs in one workdir'
      )

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      holder = self._read()
      if holder and holder.get('token') == self.token:
        storage.remove(self.path, missing_ok=True)
    except Exception as error:  # released at exit: a failure here leaves a lock that goes stale by itself
      print(f'warning: could not release the lock {self.path}: {error}', flush=True)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
