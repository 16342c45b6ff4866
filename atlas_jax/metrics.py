"""Training metrics: WORKDIR/metrics.jsonl and TensorBoard event files under WORKDIR/tb/.

metrics.jsonl holds one JSON object per `MetricWriter.write`: {"step": int, "kind": str, **metrics}, e.g.
  {"step": 100, "kind": "train", "loss": 2.31, "lr": 0.0004, "grad_norm": 1.7, "images_per_s": 312.4, ...}
  {"step": 2000, "kind": "eval", "top1": 0.71, "top5": 0.90, "loss": 1.2, "weights": "ema"}
Numpy and JAX scalars become Python int, float or bool; strings are kept. JSON has no NaN or infinity, so
non-finite floats are written as the strings "nan", "inf" and "-inf" (every line stays standard JSON, and
a diverged loss still says how it diverged); `read_metrics` turns them back into floats and sorts the
records by step (a later `mode=eval` of an earlier step is appended at the end). The file is opened
in append mode (a resumed run appends) and flushed after every record, so a killed process loses nothing it
wrote. After a resume, `truncate_after(step)` drops the killed run's records past the restored step, so the
file ends up as an uninterrupted run's.

The TensorBoard events are written by tensorboardX, which needs neither TensorFlow nor the tensorboard
package. Every numeric value of a record becomes a scalar tagged '<kind>/<name>'; string values label the
record and join the tag path, so {"weights": "ema", "top1": ...} of kind "eval" is plotted as
'eval/ema/top1'. tensorboardX writes events from a background thread: they reach the file within
`TENSORBOARD_FLUSH_SECS` and on close(); metrics.jsonl, written synchronously, is the record to trust.
The console progress line is atlas_jax/progress.py's.

On object storage (a gs:// workdir; atlas_jax/storage.py) an object cannot be appended to: metrics.jsonl
is kept in memory and uploaded whole, every `REMOTE_SYNC_SECS` and at every `sync()` (the trainer calls
it at every checkpoint) and close(); the events file is written to a local staging folder and uploaded
whole at the same times. A preempted run loses at most the records after its last sync, which its
resume (from the last checkpoint, where it synced) writes again.
"""

from collections.abc import Mapping
import json
import math
import os
import pathlib
import shutil
import socket
import tempfile
import time
from typing import Any

import numpy as np
import tensorboardX
from tensorboardX.proto import event_pb2, summary_pb2

from atlas_jax import storage

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tb'
# Longest a TensorBoard point waits in tensorboardX's queue before it is on disk (a killed run loses those).
TENSORBOARD_FLUSH_SECS = 5
# Longest a record waits in memory before a gs:// workdir's metrics.jsonl and events are uploaded again
# (they are also uploaded at every checkpoint and on close).
REMOTE_SYNC_SECS = 60.0
_RESERVED_KEYS = ('step', 'kind')
# JSON has no NaN or infinity: non-finite floats travel as these strings (float() parses them back).
_NON_FINITE_STRINGS = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf}


def metrics_path(workdir) -> pathlib.Path:
  return storage.join(workdir, METRICS_FILE)


def tensorboard_dir(workdir) -> pathlib.Path:
  return storage.join(workdir, TENSORBOARD_DIR)


# ----------------------------------------------------------------------------------------------------------
# Values.


def to_python_scalar(value: Any, name: str = 'value') -> Any:
  """A Python int, float, bool, str or None for `value`, which may be a numpy or JAX scalar (0-d array).

  Raises TypeError for anything else (arrays with elements, nested mappings, complex numbers): a metric is
  one number or a label.
  """
  if value is None or type(value) in (bool, int, float, str):
    return value
  # Before the Python types: np.float64 subclasses float and np.str_ subclasses str.
  if isinstance(value, np.generic) or hasattr(value, 'shape'):
    if np.ndim(value) != 0:
      raise TypeError(f'metric {name!r} has shape {np.shape(value)}; only scalars can be logged')
    array = np.asarray(value)  # a JAX array is copied to the host here
    kind = array.dtype.kind
    if kind == 'b':
      return bool(array)
    if kind in 'iu':
      return int(array)
    if kind in 'US':
      return str(array.item())
    if kind != 'c':
      try:
        return float(array)  # also bfloat16 and the other ml_dtypes floats, whose dtype kind is 'V'
      except (TypeError, ValueError):
        pass
  else:
    for python_type in (bool, int, float, str):  # subclasses such as IntEnum; bool before int
      if isinstance(value, python_type):
        return python_type(value)
  raise TypeError(f'metric {name!r} is a {type(value).__name__}; expected a number, a string or a 0-d array')


def _json_value(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return 'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')
  return value


def _from_json_value(value: Any) -> Any:
  if isinstance(value, str) and value in _NON_FINITE_STRINGS:
    return _NON_FINITE_STRINGS[value]
  return value


def _numeric(value: Any) -> bool:
  return isinstance(value, (int, float))  # bool is an int: plotted as 0/1


# ----------------------------------------------------------------------------------------------------------
# TensorBoard.


def scalar_tags(kind: str, record: Mapping[str, Any]) -> dict[str, float]:
  """TensorBoard tag -> value for the numeric values of `record`; its string values join the tag path."""
  labels = [value for key, value in record.items() if key not in _RESERVED_KEYS and isinstance(value, str)]
  prefix = '/'.join([kind, *labels])
  return {
    f'{prefix}/{key}': float(value)
    for key, value in record.items()
    if key not in _RESERVED_KEYS and _numeric(value)
  }


def _events_file_suffix(directory) -> str:
  """A `filename_suffix` for tensorboardX that no events file of this host in `directory` ends with:
  '.<pid>.atlas_jax', numbered ('.<pid>.atlas_jax.1', ...) when taken.

  tensorboardX names a file 'events.out.tfevents.<seconds>.<host>' + suffix and overwrites one of that name,
  so a second writer of this process in the same second needs a number; it sorts after the first, and
  TensorBoard reads a directory's files in name order (a resumed run's purge comes after the killed run).
  """
  names = storage.listdir(directory) if storage.isdir(directory) else []
  number = 0
  while True:
    suffix = f'.{os.getpid()}.atlas_jax' + (f'.{number}' if number else '')
    if not any(name.endswith(f'.{socket.gethostname()}{suffix}') for name in names):
      return suffix
    number += 1


# ----------------------------------------------------------------------------------------------------------
# The writer.


def _parse_lines(path, text: str | None = None) -> list[dict]:
  """Records of a metrics.jsonl (or of its `text`); a last line without its newline is a write in progress
  and is skipped."""
  records = []
  text = storage.read_text(path) if text is None else text
  complete_lines = text.split('\n')[:-1]  # the last piece is '' or a line still being written
  for number, line in enumerate(complete_lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise ValueError(f'{path}:{number} is not a JSON record ({error})') from None
    if not isinstance(record, dict) or not isinstance(record.get('step'), int):
      raise ValueError(f'{path}:{number} is not a metrics record with an integer "step": {line[:200]}')
    records.append(record)
  return records


def read_metrics(workdir) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl sorted by step (file order within a step: a later mode=eval of an
  earlier step is appended after later steps), with "nan"/"inf"/"-inf" turned back into floats."""
  path = metrics_path(workdir)
  if not storage.isfile(path):
    raise FileNotFoundError(f'{path} not found: has a run with this workdir logged any metrics yet?')
  records = sorted(_parse_lines(path), key=lambda record: record['step'])  # stable
  return [{key: _from_json_value(value) for key, value in record.items()} for record in records]


class MetricWriter:
  """Appends records to WORKDIR/metrics.jsonl and, with `tensorboard`, scalars to a new WORKDIR/tb/ file
  (created at the first record with a number: a writer that logs none leaves no events file).

  `enabled=False` (every process but the first in a multi-host run) turns every method into a no-op that
  creates nothing. Opening the writer cuts off a half-written last line left by a killed process, so the
  next record starts on a line of its own. Use as a context manager, or call close().
  """

  def __init__(self, workdir, enabled: bool = True, tensorboard: bool = True):
    self.workdir = storage.path(workdir)
    self.enabled = enabled
    self.path = metrics_path(workdir)
    self.events_path: pathlib.Path | None = None
    self._jsonl = None
    self._events: tensorboardX.FileWriter | None = None
    self._tensorboard = False
    self._closed = False
    self._remote = storage.is_remote(workdir)
    self._lines: list[str] = []  # a gs:// workdir's metrics.jsonl, uploaded whole by sync()
    self._staging: str | None = None  # where a gs:// workdir's events file is written before its upload
    self._local_events: str | None = None
    self._last_sync = time.monotonic()
    if not enabled:
      return
    self._tensorboard = tensorboard
    self._purge_step: int | None = None  # truncate_after's restart, for an events file not yet opened
    if self._remote:
      if storage.isfile(self.path):
        text = storage.read_text(self.path)
        self._lines = [line + '\n' for line in text.split('\n')[:-1]]
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._drop_partial_last_line()
    self._jsonl = open(self.path, 'a', encoding='utf-8')

  def sync(self) -> None:
    """On a gs:// workdir, uploads metrics.jsonl and this writer's events file as they are now; locally a
    flush (records are on disk after each write already)."""
    if not self.enabled or self._closed:
      return
    if not self._remote:
      self.flush()
      return
    storage.write_text(self.path, ''.join(self._lines))
    if self._events is not None:
      self._events.flush()
      storage.upload_file(self._local_events, self.events_path)
    self._last_sync = time.monotonic()

  def _drop_partial_last_line(self) -> None:
    if not self.path.is_file() or self.path.stat().st_size == 0:
      return
    with open(self.path, 'r+b') as file:
      data = file.read()
      if not data.endswith(b'\n'):
        file.truncate(data.rfind(b'\n') + 1)  # 0 when the partial line is the only one

  def _open_events_file(self) -> None:
    """One new events file per writer, opened at its first scalar (an invocation that logs none, such as
    a re-run of a finished workdir, leaves none); tensorboardX writes its file_version event first."""
    directory = tensorboard_dir(self.workdir)
    storage.makedirs(directory)
    suffix = _events_file_suffix(directory)
    local = directory
    if self._remote:
      self._staging = tempfile.mkdtemp(prefix='atlas_jax_tb_')
      local = pathlib.Path(self._staging)
    self._events = tensorboardX.FileWriter(
      str(local), flush_secs=TENSORBOARD_FLUSH_SECS, filename_suffix=suffix
    )
    ending = f'.{socket.gethostname()}{suffix}'
    [written] = [path for path in local.iterdir() if path.name.endswith(ending)]
    self.events_path = directory / written.name
    self._local_events = str(written)
    if self._purge_step is not None:
      self._add_restart(self._purge_step)
      self._purge_step = None

  def _add_restart(self, step: int) -> None:
    restart = event_pb2.Event(session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
    self._events.add_event(restart, step=step)

  def _check_open(self) -> None:
    if self._closed:
      raise ValueError(f'MetricWriter for {self.workdir} is closed')

  def write(self, step: int, kind: str, metrics: Mapping[str, Any]) -> dict:
    """Writes {"step", "kind", **metrics} to metrics.jsonl and its numeric values to TensorBoard.

    Returns the record as written (Python scalars; non-finite floats stay floats in the returned dict).
    Disabled, it writes nothing and returns the record without converting the values, so no array is
    read back from a device.
    """
    clashing = [key for key in _RESERVED_KEYS if key in metrics]
    if clashing:
      raise ValueError(f'metric names {clashing} are reserved for the record itself')
    if not self.enabled:
      return {'step': step, 'kind': kind, **metrics}
    self._check_open()
    record = {'step': to_python_scalar(step, 'step'), 'kind': kind}
    if not isinstance(record['step'], int) or isinstance(record['step'], bool):
      raise TypeError(f'step must be an integer, got {step!r}')
    record.update((str(key), to_python_scalar(value, str(key))) for key, value in metrics.items())
    line = json.dumps({key: _json_value(value) for key, value in record.items()}, allow_nan=False)
    if self._remote:
      self._lines.append(line + '\n')
    else:
      self._jsonl.write(line + '\n')  # one write call per record, so a kill leaves at most one partial line
      self._jsonl.flush()
    if self._tensorboard:
      scalars = scalar_tags(kind, record)
      if scalars:  # one event per record, float32 values as TensorBoard stores them (beyond range: +-inf)
        if self._events is None:
          self._open_events_file()
        summary = summary_pb2.Summary(
          value=[summary_pb2.Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()]
        )
        self._events.add_summary(summary, record['step'])
    if self._remote and time.monotonic() - self._last_sync >= REMOTE_SYNC_SECS:
      self.sync()
    return record

  def truncate_after(self, step: int) -> None:
    """Keeps only the records with "step" <= `step` in metrics.jsonl (called on resume from `step`).

    The file is rewritten to a temporary file that then replaces it, so a crash leaves the old or the new
    file, never a mix. In TensorBoard, a SessionLog START event at step + 1 makes the reader discard the
    points past `step` that it read before it: the killed run's, in the older event files, and any this
    writer logged. It is the event tensorboardX's `SummaryWriter(purge_step=step + 1)` starts a file with;
    written into this writer's file (the first event after file_version when the file is not yet open), a
    resume needs no second file.
    """
    if not self.enabled:
      return
    self._check_open()
    step = int(step)
    if self._remote:
      kept = [record for record in _parse_lines(self.path, ''.join(self._lines)) if record['step'] <= step]
      self._lines = [json.dumps(record, allow_nan=False) + '\n' for record in kept]
      storage.write_text(self.path, ''.join(self._lines))
    else:
      self._truncate_local_file(step)
    if self._events is not None:
      self._add_restart(step + 1)
    elif self._tensorboard:
      self._purge_step = step + 1  # the first event of the file this writer opens, if it opens one

  def _truncate_local_file(self, step: int) -> None:
    self._jsonl.close()
    try:
      kept = [record for record in _parse_lines(self.path) if record['step'] <= step]
      temporary = self.path.with_name(self.path.name + '.tmp')
      with open(temporary, 'w', encoding='utf-8') as file:
        # Parsed records dump back to the text they were written as ("nan" strings included).
        file.writelines(json.dumps(record, allow_nan=False) + '\n' for record in kept)
        file.flush()
        os.fsync(file.fileno())  # the new content is on disk before it replaces the old
      os.replace(temporary, self.path)
    finally:
      self._jsonl = open(self.path, 'a', encoding='utf-8')  # still usable after a corrupt-file error

  def flush(self) -> None:
    """Flushes metrics.jsonl and the TensorBoard events that tensorboardX's thread has written so far."""
    if not self.enabled or self._closed:
      return
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    """Closes the files, once every queued TensorBoard event is written; closing twice is harmless."""
    if not self.enabled or self._closed:
      return
    if self._remote:
      try:
        if self._events is not None:
          self._events.close()  # every queued event in the staged file, then the last upload
          self._events = None
          storage.upload_file(self._local_events, self.events_path)
        storage.write_text(self.path, ''.join(self._lines))
      finally:
        self._closed = True
        if self._staging is not None:
          shutil.rmtree(self._staging, ignore_errors=True)
      return
    self._closed = True
    self._jsonl.close()
    if self._events is not None:
      self._events.close()

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
