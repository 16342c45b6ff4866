"""metrics.jsonl records, and tensorboardX's TensorBoard events read back by TensorBoard's own reader."""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator, event_file_loader
from tensorboard.compat.proto import event_pb2

from atlas_jax import metrics

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _strict_json(line: str):
  """json.loads that refuses the non-standard NaN / Infinity tokens Python would otherwise accept."""

  def refuse(token):
    raise ValueError(f'non-standard JSON token {token}')

  return json.loads(line, parse_constant=refuse)


def _scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
  accumulator = event_accumulator.EventAccumulator(str(tb_dir))
  accumulator.Reload()
  return {
    tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
    for tag in accumulator.Tags()['scalars']
  }


def _events(path) -> list:
  return list(event_file_loader.EventFileLoader(str(path)).Load())


def test_jsonl_round_trip_in_order(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:
    train = writer.write(
      10, 'train', {'loss': 1.25, 'lr': 4e-4, 'grad_norm': 0.5, 'images_per_s': 312.5, 'step_time_s': 0.1}
    )
    evaluation = writer.write(20, 'eval', {'top1': 0.5, 'top5': 0.75, 'loss': 2.0, 'weights': 'ema'})
  assert train == {
    'step': 10,
    'kind': 'train',
    'loss': 1.25,
    'lr': 4e-4,
    'grad_norm': 0.5,
    'images_per_s': 312.5,
    'step_time_s': 0.1,
  }
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert [list(_strict_json(line)) for line in lines] == [list(train), list(evaluation)]  # key order kept
  assert metrics.read_metrics(tmp_path) == [train, evaluation]
  # A second writer (a resumed run) appends.
  with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
    writer.write(30, 'train', {'loss': 1.0})
  assert [record['step'] for record in metrics.read_metrics(tmp_path)] == [10, 20, 30]


def test_numpy_and_jax_scalars_become_python_values(tmp_path):
  values = {
    'f32': np.float32(1.5),
    'f64': np.float64(2.5),
    'i64': np.int64(3),
    'u8': np.uint8(4),
    'flag': np.bool_(True),
    'jax_f32': jnp.asarray(0.25),
    'jax_i32': jnp.asarray(7, jnp.int32),
    'jax_bf16': jnp.asarray(1.5, jnp.bfloat16),
    'zero_d': np.array(6.5),
    'label': np.str_('raw'),
    'python_int': 8,
    'none': None,
  }
  with metrics.MetricWriter(tmp_path) as writer:
    record = writer.write(np.int64(5), 'train', values)
  expected = {
    'step': 5,
    'kind': 'train',
    'f32': 1.5,
    'f64': 2.5,
    'i64': 3,
    'u8': 4,
    'flag': True,
    'jax_f32': 0.25,
    'jax_i32': 7,
    'jax_bf16': 1.5,
    'zero_d': 6.5,
    'label': 'raw',
    'python_int': 8,
    'none': None,
  }
  assert record == expected
  types = {key: type(value) for key, value in record.items()}
  assert types == {key: type(value) for key, value in expected.items()}
  assert metrics.read_metrics(tmp_path) == [expected]


def test_non_scalars_and_reserved_names_are_refused(tmp_path):
  with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(TypeError, match="'loss' has shape"):
      writer.write(1, 'train', {'loss': np.zeros(2)})
    with pytest.raises(TypeError, match="'nested' is a dict"):
      writer.write(1, 'train', {'nested': {'a': 1}})
    with pytest.raises(ValueError, match='reserved'):
      writer.write(1, 'train', {'step': 3})
  assert (tmp_path / 'metrics.jsonl').read_text() == ''


def test_nan_and_inf_give_standard_json_and_read_back_as_floats(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:
    record = writer.write(
      1,
      'train',
      {
        'loss': float('nan'),
        'grad_norm': np.float32(np.inf),
        'lr': jnp.asarray(-jnp.inf),
        'images_per_s': 3.0,
      },
    )
  assert math.isnan(record['loss']) and record['grad_norm'] == math.inf and record['lr'] == -math.inf
  [line] = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  assert _strict_json(line) == {
    'step': 1,
    'kind': 'train',
    'loss': 'nan',
    'grad_norm': 'inf',
    'lr': '-inf',
    'images_per_s': 3.0,
  }
  [read] = metrics.read_metrics(tmp_path)
  assert math.isnan(read['loss']) and read['grad_norm'] == math.inf and read['lr'] == -math.inf
  scalars = _scalars(tmp_path / 'tb')
  assert math.isnan(scalars['train/loss'][0][1]) and scalars['train/grad_norm'] == [(1, math.inf)]


def _log_run(writer, steps, offset=0.0):
  for step in steps:
    writer.write(step, 'train', {'loss': 1.0 / step + offset, 'lr': 1e-3})
    if step % 2 == 0:
      writer.write(step, 'eval', {'top1': step / 10 + offset, 'weights': 'ema'})


def test_truncate_after_makes_a_resumed_run_equal_an_uninterrupted_one(tmp_path):
  uninterrupted, resumed = tmp_path / 'uninterrupted', tmp_path / 'resumed'
  with metrics.MetricWriter(uninterrupted) as writer:
    _log_run(writer, range(1, 4), offset=100.0)
    _log_run(writer, range(4, 7))
  killed = metrics.MetricWriter(resumed)
  _log_run(killed, range(1, 6), offset=100.0)  # steps 4 and 5 were logged but their checkpoint was lost
  killed.close()
  with open(resumed / 'metrics.jsonl', 'a') as file:
    file.write('{"step": 6, "kind": "tr')  # killed in the middle of a line
  with metrics.MetricWriter(resumed) as writer:  # restored from the checkpoint of step 3
    writer.truncate_after(3)
    _log_run(writer, range(4, 7))
  assert (resumed / 'metrics.jsonl').read_text() == (uninterrupted / 'metrics.jsonl').read_text()
  assert sorted(p.name for p in resumed.iterdir()) == ['metrics.jsonl', 'tb']  # no temporary file left
  assert len(list((resumed / 'tb').iterdir())) == 2  # one events file per writer, none for the purge
  # TensorBoard drops the killed run's points past step 3 (the SessionLog START at step 4).
  assert _scalars(resumed / 'tb') == _scalars(uninterrupted / 'tb')


def test_truncate_after_keeps_the_records_of_the_restored_step(tmp_path):
  with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
    _log_run(writer, range(1, 5))
    writer.truncate_after(2)
    assert [(r['step'], r['kind']) for r in metrics.read_metrics(tmp_path)] == [
      (1, 'train'),
      (2, 'train'),
      (2, 'eval'),
    ]
    writer.write(3, 'train', {'loss': 0.5})  # the writer appends after a truncation
  assert [r['step'] for r in metrics.read_metrics(tmp_path)] == [1, 2, 2, 3]


def test_tensorboard_reads_back_tags_steps_and_values(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:
    writer.write(
      100, 'train', {'loss': 2.302585, 'lr': 4e-4, 'images_per_s': np.float32(312.4), 'flag': True}
    )
    writer.write(200, 'train', {'loss': 1.1, 'lr': 3e-4, 'images_per_s': 300.0, 'flag': False})
    writer.write(200, 'eval', {'top1': 0.7125, 'top5': jnp.asarray(0.9), 'loss': 1.3, 'weights': 'ema'})
    writer.write(200, 'eval', {'top1': 0.70, 'top5': 0.89, 'loss': 1.35, 'weights': 'raw'})
    writer.write(300, 'note', {'message': 'only strings: no event'})
  scalars = _scalars(tmp_path / 'tb')
  assert set(scalars) == {
    'train/loss',
    'train/lr',
    'train/images_per_s',
    'train/flag',
    'eval/ema/top1',
    'eval/ema/top5',
    'eval/ema/loss',
    'eval/raw/top1',
    'eval/raw/top5',
    'eval/raw/loss',
  }
  f32 = lambda value: float(np.float32(value))
  assert scalars['train/loss'] == [(100, f32(2.302585)), (200, f32(1.1))]
  assert scalars['train/lr'] == [(100, f32(4e-4)), (200, f32(3e-4))]
  assert scalars['train/flag'] == [(100, 1.0), (200, 0.0)]
  assert scalars['eval/ema/top1'] == [(200, f32(0.7125))]
  assert scalars['eval/ema/top5'] == [(200, f32(0.9))]
  assert scalars['eval/raw/loss'] == [(200, f32(1.35))]
  # One event per record with numbers, after the file_version event; the name says host and process.
  [events_file] = list((tmp_path / 'tb').iterdir())
  assert events_file == writer.events_path
  assert events_file.name.startswith('events.out.tfevents.') and events_file.name.endswith(
    f'.{socket.gethostname()}.{os.getpid()}.atlas_jax'
  )
  events = _events(events_file)
  assert len(events) == 5 and events[0].file_version == 'brain.Event:2'
  assert [event.step for event in events[1:]] == [100, 200, 200, 200]
  assert [len(event.summary.value) for event in events[1:]] == [4, 4, 3, 3]


def test_tags_keep_their_characters_and_values_beyond_float32_become_inf(tmp_path):
  with metrics.MetricWriter(tmp_path) as writer:
    writer.write(1, 'eval', {'top1': 1e300, 'loss': -1e300, 'tiny': 1e-50, 'weights': 'ema é 2'})
  label = 'eval/ema é 2'  # kept as is (tensorboardX's add_scalar would make the space a '_')
  assert _scalars(tmp_path / 'tb') == {
    f'{label}/top1': [(1, math.inf)],
    f'{label}/loss': [(1, -math.inf)],
    f'{label}/tiny': [(1, 0.0)],
  }


def test_each_writer_has_its_own_events_file_sorted_in_opening_order(tmp_path):
  paths = []
  for step in range(3):  # in the same second, mostly: numbered names
    with metrics.MetricWriter(tmp_path) as writer:
      writer.write(step, 'train', {'loss': float(step)})
      paths.append(writer.events_path)
  assert sorted((tmp_path / 'tb').iterdir()) == paths and len(set(paths)) == 3
  assert _scalars(tmp_path / 'tb') == {'train/loss': [(0, 0.0), (1, 1.0), (2, 2.0)]}


def test_truncate_after_on_a_writer_that_already_logged_purges_in_its_own_file(tmp_path):
  uninterrupted, truncated = tmp_path / 'uninterrupted', tmp_path / 'truncated'
  with metrics.MetricWriter(uninterrupted) as writer:
    _log_run(writer, range(1, 4), offset=100.0)
    _log_run(writer, range(4, 7))
  with metrics.MetricWriter(truncated) as writer:
    _log_run(writer, range(1, 6), offset=100.0)
    writer.truncate_after(3)
    _log_run(writer, range(4, 7))
  assert (truncated / 'metrics.jsonl').read_text() == (uninterrupted / 'metrics.jsonl').read_text()
  [events_file] = list((truncated / 'tb').iterdir())
  restarts = [event.step for event in _events(events_file) if event.HasField('session_log')]
  assert restarts == [4] and [
    event.session_log.status for event in _events(events_file) if event.HasField('session_log')
  ] == [event_pb2.SessionLog.START]
  assert _scalars(truncated / 'tb') == _scalars(uninterrupted / 'tb')


def test_writes_events_with_tensorflow_and_tensorboard_unimportable(tmp_path):
  script = textwrap.dedent(f"""
      import sys
      for name in ('tensorflow', 'tensorboard'):
        sys.modules[name] = None  # makes `import {{name}}` raise ImportError
      from atlas_jax import metrics
      with metrics.MetricWriter({str(tmp_path)!r}) as writer:
        writer.write(1, 'train', {{'loss': 0.5, 'lr': 1e-3}})
        writer.write(2, 'eval', {{'top1': 0.25, 'weights': 'raw'}})
      assert sys.modules['tensorflow'] is None and sys.modules['tensorboard'] is None
  """)
  python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get('PYTHONPATH')]))
  env = {**os.environ, 'PYTHONPATH': python_path}
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert _scalars(tmp_path / 'tb') == {
    'train/loss': [(1, 0.5)],
    'train/lr': [(1, float(np.float32(1e-3)))],
    'eval/raw/top1': [(2, 0.25)],
  }
  assert [record['step'] for record in metrics.read_metrics(tmp_path)] == [1, 2]


def test_disabled_writer_creates_nothing(tmp_path):
  workdir = tmp_path / 'workdir'
  with metrics.MetricWriter(workdir, enabled=False) as writer:
    record = writer.write(1, 'train', {'loss': 0.5})
    writer.truncate_after(0)
    writer.flush()
  writer.close()
  assert record == {'step': 1, 'kind': 'train', 'loss': 0.5}
  assert not workdir.exists() and writer.events_path is None


def test_closed_writer_refuses_writes(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  writer.close()
  writer.close()
  with pytest.raises(ValueError, match='closed'):
    writer.write(1, 'train', {'loss': 0.5})


def test_read_metrics_of_a_workdir_without_records(tmp_path):
  with pytest.raises(FileNotFoundError, match='metrics.jsonl'):
    metrics.read_metrics(tmp_path)


def test_a_corrupt_line_is_reported_not_skipped(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "kind": "train"}\nnot json\n{"step": 2, "kind": "tr')
  with pytest.raises(ValueError, match='metrics.jsonl:2 is not a JSON record'):
    metrics.read_metrics(tmp_path)
  with metrics.MetricWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(ValueError, match='metrics.jsonl:2'):
      writer.truncate_after(1)
    writer.write(3, 'train', {'loss': 0.5})  # the writer stays usable; the partial last line was cut off
  assert (tmp_path / 'metrics.jsonl').read_text().splitlines()[1:] == [
    'not json',
    '{"step": 3, "kind": "train", "loss": 0.5}',
  ]
