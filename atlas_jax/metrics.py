"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard event files under WORKDIR/tb/, a console progress.

metrics.jsonl holds one JSON object per `MetricWriter.write`: {"step": int, "kind": str, **metrics}, e.g.
  {"step": 100, "kind": "train", "loss": 2.31, "lr": 0.0004, "grad_norm": 1.7, "images_per_s": 312.4, ...}
  {"step": 2000, "kind": "eval", "top1": 0.71, "top5": 0.90, "loss": 1.2, "weights": "ema"}
Numpy and JAX scalars become Python int, float or bool; strings are kept. JSON has no NaN or infinity, so
non-finite floats are written as the strings "nan", "inf" and "-inf" (every line stays standard JSON, and
a diverged loss still says how it diverged); `read_metrics` turns them back into floats. The file is opened
in append mode (a resumed run appends) and flushed after every record, so a killed process loses nothing it
wrote. After a resume, `truncate_after(step)` drops the killed run's records past the restored step, so the
file ends up as an uninterrupted run's.

The TensorBoard events are written without TensorFlow or the tensorboard package: the Event protobuf is
encoded by hand (only the few fields scalars need) and framed as TFRecords with masked CRC-32C checksums.
Every numeric value of a record becomes a scalar tagged '<kind>/<name>'; string values label the record and
join the tag path, so {"weights": "ema", "top1": ...} of kind "eval" is plotted as 'eval/ema/top1'.
"""

import json
import math
import os
import pathlib
import socket
import struct
import time
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tb'
_RESERVED_KEYS = ('step', 'kind')
# JSON has no NaN or infinity: non-finite floats travel as these strings (float() parses them back).
_NON_FINITE_STRINGS = {'nan': math.nan, 'inf': math.inf, '-inf': -math.inf}


def metrics_path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / METRICS_FILE


def tensorboard_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / TENSORBOARD_DIR


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
# TFRecord framing and the Event protobuf, by hand.


def _crc32c_table() -> tuple[int, ...]:
  """The byte-at-a-time table of CRC-32C (Castagnoli), reflected polynomial 0x82F63B78."""
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C of `data`, in pure Python: fast enough for records of a few hundred bytes per logged step."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotated and offset, because a CRC of data that holds CRCs is weak."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: uint64 length, masked CRC of the length, data, masked CRC of the data (little-endian)."""
  length = struct.pack('<Q', len(data))
  return length + struct.pack('<I', masked_crc32c(length)) + data + struct.pack('<I', masked_crc32c(data))


def _varint(number: int) -> bytes:
  number &= 0xFFFFFFFFFFFFFFFF  # negative int64 values take ten bytes, as protobuf encodes them
  out = bytearray()
  while True:
    low_bits = number & 0x7F
    number >>= 7
    if number:
      out.append(low_bits | 0x80)
    else:
      out.append(low_bits)
      return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _float32_bytes(value: float) -> bytes:
  with np.errstate(over='ignore'):  # beyond float32's range is +-inf, as TensorFlow would store it
    return np.float32(value).astype('<f4').tobytes()


def _scalar_value(tag: str, value: float) -> bytes:
  """Summary.Value{tag = 1 (string), simple_value = 2 (float, fixed32)}."""
  return _length_delimited(1, tag.encode('utf-8')) + _varint(2 << 3 | 5) + _float32_bytes(value)


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None, session_start: bool = False) -> bytes:
  """Serialized tensorboard Event: wall_time = 1 (double), step = 2 (int64), then one of (a protobuf oneof)
  file_version = 3 (string), summary = 5 (Summary{repeated Value value = 1}) or session_log = 7
  (SessionLog{status = 1, START = 1})."""
  if (file_version is not None) + bool(scalars) + session_start > 1:
    raise ValueError('an Event holds one of file_version, scalars and session_start (a protobuf oneof)')
  event = _varint(1 << 3 | 1) + struct.pack('<d', wall_time) + _varint(2 << 3 | 0) + _varint(step)
  if file_version is not None:
    event += _length_delimited(3, file_version.encode('utf-8'))
  if scalars:
    summary = b''.join(_length_delimited(1, _scalar_value(tag, value)) for tag, value in scalars.items())
    event += _length_delimited(5, summary)
  if session_start:
    event += _length_delimited(7, _varint(1 << 3 | 0) + _varint(1))
  return event


def scalar_tags(kind: str, record: Mapping[str, Any]) -> dict[str, float]:
  """TensorBoard tag -> value for the numeric values of `record`; its string values join the tag path."""
  labels = [value for key, value in record.items() if key not in _RESERVED_KEYS and isinstance(value, str)]
  prefix = '/'.join([kind, *labels])
  return {f'{prefix}/{key}': float(value) for key, value in record.items()
          if key not in _RESERVED_KEYS and _numeric(value)}


def _events_file_name() -> str:
  return f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.atlas_jax'


# ----------------------------------------------------------------------------------------------------------
# The writer.


def _parse_lines(path: pathlib.Path) -> list[dict]:
  """Records of a metrics.jsonl; a last line without its newline is a write in progress and is skipped."""
  records = []
  text = path.read_text(encoding='utf-8')
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
  """The records of WORKDIR/metrics.jsonl in file order, with "nan"/"inf"/"-inf" turned back into floats."""
  path = metrics_path(workdir)
  if not path.is_file():
    raise FileNotFoundError(f'{path} not found: has a run with this workdir logged any metrics yet?')
  return [{key: _from_json_value(value) for key, value in record.items()} for record in _parse_lines(path)]


class MetricWriter:
  """Appends records to WORKDIR/metrics.jsonl and, with `tensorboard`, scalars to a new WORKDIR/tb/ file.

  `enabled=False` (every process but the first in a multi-host run) turns every method into a no-op that
  creates nothing. Opening the writer cuts off a half-written last line left by a killed process, so the
  next record starts on a line of its own. Use as a context manager, or call close().
  """

  def __init__(self, workdir, enabled: bool = True, tensorboard: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.enabled = enabled
    self.path = metrics_path(workdir)
    self.events_path: pathlib.Path | None = None
    self._jsonl = None
    self._events = None
    self._closed = False
    if not enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._drop_partial_last_line()
    self._jsonl = open(self.path, 'a', encoding='utf-8')
    if tensorboard:
      self._open_events_file()

  def _drop_partial_last_line(self) -> None:
    if not self.path.is_file() or self.path.stat().st_size == 0:
      return
    with open(self.path, 'r+b') as file:
      data = file.read()
      if not data.endswith(b'\n'):
        file.truncate(data.rfind(b'\n') + 1)  # 0 when the partial line is the only one

  def _open_events_file(self) -> None:
    directory = tensorboard_dir(self.workdir)
    directory.mkdir(parents=True, exist_ok=True)
    name = _events_file_name()
    # Unique per writer: a second writer of this process in the same second gets a numbered name, which
    # sorts after the first (TensorBoard reads a directory's files in name order).
    candidate, number = directory / name, 0
    while True:
      try:
        self._events = open(candidate, 'xb')
        break
      except FileExistsError:
        number += 1
        candidate = directory / f'{name}.{number}'
    self.events_path = candidate
    self._write_event(encode_event(time.time(), 0, file_version='brain.Event:2'))

  def _write_event(self, event: bytes) -> None:
    self._events.write(tfrecord(event))
    self._events.flush()

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
    self._jsonl.write(line + '\n')  # one write call per record, so a kill leaves at most one partial line
    self._jsonl.flush()
    if self._events is not None:
      scalars = scalar_tags(kind, record)
      if scalars:
        self._write_event(encode_event(time.time(), record['step'], scalars=scalars))
    return record

  def truncate_after(self, step: int) -> None:
    """Keeps only the records with "step" <= `step` in metrics.jsonl (called on resume from `step`).

    The file is rewritten to a temporary file that then replaces it, so a crash leaves the old or the new
    file, never a mix. In TensorBoard, a SessionLog START event at step + 1 makes the reader discard the
    killed run's points past `step` from the older event files.
    """
    if not self.enabled:
      return
    self._check_open()
    step = int(step)
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
    if self._events is not None:
      self._write_event(encode_event(time.time(), step + 1, session_start=True))

  def flush(self) -> None:
    if not self.enabled or self._closed:
      return
    self._jsonl.flush()
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    """Closes the files; closing twice is harmless."""
    if not self.enabled or self._closed:
      return
    self._closed = True
    self._jsonl.close()
    if self._events is not None:
      self._events.close()

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


# ----------------------------------------------------------------------------------------------------------
# Console progress.


def format_duration(seconds: float) -> str:
  """'H:MM:SS' (hours not wrapped at 24), rounded to the second; '--:--:--' when not finite."""
  if not math.isfinite(seconds):
    return '--:--:--'
  total = max(0, round(seconds))
  hours, rest = divmod(total, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}:{minutes:02d}:{secs:02d}'


def _format_metric(key: str, value: Any) -> str:
  if key == 'images_per_s' and _numeric(value):
    return f'{value:.1f} img/s'
  if key == 'lr' and _numeric(value):
    return f'lr {value:.1e}'
  if isinstance(value, int):  # bool included
    return f'{key} {value}'
  if isinstance(value, float):
    if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1e5:
      return f'{key} {value:.4f}'
    return f'{key} {value:.3e}'
  return f'{key} {value}'


class Progress:
  """A console progress line: step/total, percentage, the given metrics and the ETA.

  The first call to `line` sets the baseline (its time and step): the ETA uses the average time per step
  since then, which leaves out what came before it, such as compiling the train step. `start_step` is the
  step the run (re)started from; a step before it is a caller error.
  """

  def __init__(self, total_steps: int, start_step: int = 0, clock: Callable[[], float] = time.monotonic):
    if total_steps <= 0:
      raise ValueError(f'total_steps must be > 0, got {total_steps}')
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.clock = clock
    self._baseline: tuple[float, int] | None = None

  def eta_seconds(self, step: int) -> float:
    """Seconds left at the average pace since the baseline (which the first call sets); NaN before a pace
    is known."""
    now = self.clock()
    if self._baseline is None:
      self._baseline = (now, step)
    baseline_time, baseline_step = self._baseline
    if step >= self.total_steps:
      return 0.0
    if step <= baseline_step:
      return math.nan
    return (now - baseline_time) / (step - baseline_step) * (self.total_steps - step)

  def line(self, step: int, metrics: Mapping[str, Any] | None = None) -> str:
    """E.g. 'step 120/2000 (6.0%)  loss 1.2345  lr 4.0e-04  312.4 img/s  ETA 0:05:12'."""
    step = int(step)
    if step < self.start_step:
      raise ValueError(f'step {step} is before the start step {self.start_step}')
    parts = [f'step {step}/{self.total_steps} ({100.0 * step / self.total_steps:.1f}%)']
    for key, value in (metrics or {}).items():
      value = to_python_scalar(value, key)
      if value is not None:
        parts.append(_format_metric(key, value))
    parts.append(f'ETA {format_duration(self.eta_seconds(step))}')
    return '  '.join(parts)
