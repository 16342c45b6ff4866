"""The experiment commands (experiments/*/run.py) in their seconds-long --quick mode.

A quick training costs 10-20 s here (mostly XLA compiling the train, eval and init steps), so the file
trains once: `communication --quick --variants=full` through the real trainer, end to end. `composition`
then runs end to end on a copy of that finished run (the same config as its `atlas`), without its
benchmark timing; `scaling` measures one tiny point in this process (what each child runs), runs a sweep
whose child fails at once (the subprocess path), and a sweep over faked points (where curves stop). The
other variants differ only in a config switch that tests/models covers. About 30 s on 2 cores.
"""

import contextlib
import csv
import importlib.util
import io
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def load_command(name: str):
  """experiments/NAME/run.py as a module, so its main() runs in this process (JAX imported once)."""
  spec = importlib.util.spec_from_file_location(f'experiment_{name}', ROOT / 'experiments' / name / 'run.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def read_csv(path: pathlib.Path) -> list[dict]:
  with open(path, newline='') as file:
    return list(csv.DictReader(file))


@pytest.fixture(scope='module')
def quick_full_run(tmp_path_factory):
  """`communication/run.py --quick --variants=full` once for the module: (its --output, its stdout)."""
  output = tmp_path_factory.mktemp('communication')
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    load_command('communication').main(['--quick', '--variants=full', f'--output={output}'])
  return output, stdout.getvalue()


def test_communication_quick_writes_results_and_reuses_finished_runs(quick_full_run, capsys):
  output, stdout = quick_full_run
  assert 'step 2/2' in stdout  # the trainer's progress line
  results = read_csv(output / 'results.csv')
  assert [(row['variant'], row['seed'], row['steps']) for row in results] == [('full', '0', '2')]
  assert 0.0 <= float(results[0]['top1']) <= 1.0 and float(results[0]['wall_s']) > 0
  summary = read_csv(output / 'summary.csv')
  assert summary[0]['variant'] == 'full' and float(summary[0]['paper_top1']) == 72.02
  assert [row['step'] for row in read_csv(output / 'curves.csv')] == ['2']
  assert (output / 'communication.png').read_bytes().startswith(PNG_SIGNATURE)

  # Started again with the same arguments, the finished run is read back, not trained again.
  metrics = output / 'workdirs' / 'full_seed0' / 'metrics.jsonl'
  before = metrics.read_text()
  load_command('communication').main(['--quick', '--variants=full', f'--output={output}'])
  assert metrics.read_text() == before
  assert read_csv(output / 'results.csv') == results
  assert 'step 2/2' not in capsys.readouterr().out


def test_communication_refuses_an_unknown_variant(tmp_path):
  with pytest.raises(SystemExit, match='unknown --variants'):
    load_command('communication').main(['--variants=full,global', f'--output={tmp_path}'])


def test_quickstart_vs_windows_refuses_an_unknown_model_and_writes_outside_the_repository(tmp_path):
  command = load_command('quickstart_vs_windows')
  with pytest.raises(SystemExit, match='unknown --variants'):
    command.main(['--variants=atlas,vit', f'--output={tmp_path}'])
  from experiments import common

  for name in ('communication', 'quickstart_vs_windows'):
    default = pathlib.Path(common.accuracy_parser('x', name, {}, 1, '0').parse_args([]).output).resolve()
    assert ROOT.resolve() not in default.parents and default.name == name


def test_composition_quick_reuses_a_finished_run_of_the_same_config(quick_full_run, tmp_path):
  # Quick `full` (communication) and quick `atlas` (composition) are the same config: the finished run is
  # accepted and read back; the timing is left out (--bench_steps=0) to keep the test short.
  output, _ = quick_full_run
  shutil.copytree(output / 'workdirs' / 'full_seed0', tmp_path / 'workdirs' / 'atlas_seed0')
  load_command('composition').main(['--quick', '--variants=atlas', '--bench_steps=0', f'--output={tmp_path}'])
  (row,) = read_csv(tmp_path / 'results.csv')
  (full,) = read_csv(output / 'results.csv')
  assert (row['variant'], row['top1'], row['wall_s']) == ('atlas', full['top1'], full['wall_s'])
  assert float(read_csv(tmp_path / 'summary.csv')[0]['paper_top1']) == 70.09
  assert (tmp_path / 'composition.png').read_bytes().startswith(PNG_SIGNATURE)
  assert not (tmp_path / 'step_time.csv').exists()


def test_composition_refuses_a_workdir_of_another_config(quick_full_run, tmp_path):
  output, _ = quick_full_run
  shutil.copytree(output / 'workdirs' / 'full_seed0', tmp_path / 'workdirs' / 'stack_seed0')
  with pytest.raises(SystemExit, match=r"stack_seed0 holds a run with model=.*'composition': 'atlas'"):
    load_command('composition').main(['--quick', '--variants=stack', f'--output={tmp_path}'])


def test_scaling_point_measures_a_compiled_step(capsys):
  # What each point's child process runs and prints (in this process: JAX is already warm).
  scaling = load_command('scaling')
  scaling.main(['--point=atlas:128', '--quick', '--steps=1', '--warmup=0'])
  (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith(scaling.RESULT_PREFIX)]
  point = json.loads(line[len(scaling.RESULT_PREFIX) :])
  assert (point['model'], point['resolution'], point['tokens'], point['status']) == ('atlas', 128, 256, 'ok')
  assert point['step_s_median'] > 0 and point['train_gflops'] > 0 and point['memory_analysis_gib'] > 0


def test_scaling_runs_each_point_in_a_child_process_and_reports_its_failure(tmp_path):
  # A child that fails at once (before importing JAX): the sweep records why and stops that model's curve.
  command = [
    sys.executable,
    'experiments/scaling/run.py',
    '--quick',
    '--models=atlas',
    '--steps=0',
    f'--output={tmp_path}',
  ]
  scaling = load_command('scaling')
  args = scaling.argparse.Namespace(
    models='atlas',
    quick=True,
    max_resolution=128,
    output=str(tmp_path),
    point_time_limit_s=60.0,
    steps=0,
    warmup=0,
    max_memory_gib=None,
  )
  (row,) = scaling.sweep(args)
  assert row['status'] == 'error' and '--steps must be >= 1' in row['note']
  assert read_csv(tmp_path / 'points.csv')[0]['status'] == 'error'
  assert not (tmp_path / 'scaling.png').exists()  # nothing measured, nothing to plot
  # The command line refuses the same arguments with the same one line.
  refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  assert refused.returncode == 1 and refused.stderr.strip() == 'error: --steps must be >= 1 and --warmup >= 0'


def test_scaling_stops_a_curve_at_the_first_point_that_does_not_fit(tmp_path, monkeypatch):
  scaling = load_command('scaling')
  launched = []

  def fake_point(args, model, resolution):
    # Compiling takes 10 s, a step 1 s per 256 tokens (vit 0.1 s), and vit does not fit from 512 px.
    launched.append((model, resolution))
    tokens = (resolution // 8) ** 2
    if model == 'vit' and resolution >= 512:
      return {
        'model': model,
        'resolution': resolution,
        'tokens': tokens,
        'status': 'over_memory',
        'memory_analysis_gib': 99.0,
      }
    return {
      'model': model,
      'resolution': resolution,
      'tokens': tokens,
      'status': 'ok',
      'step_s_median': tokens / 256 * (0.1 if model == 'vit' else 1.0),
      'compile_s': 10.0,
      'memory_analysis_gib': tokens / 1e4,
      'device': 'test',
    }

  monkeypatch.setattr(scaling, 'run_point', fake_point)
  # Predicted from the last point, 4 steps growing 4x per doubling: 10 + 4 x 1 x 4 = 26 s for 256 px fits the
  # 60 s limit; 10 + 4 x 4 x 4 = 74 s for 512 px does not, so atlas and window_vit stop unlaunched there.
  args = scaling.argparse.Namespace(
    models='atlas,vit,window_vit',
    quick=False,
    max_resolution=1024,
    output=str(tmp_path),
    point_time_limit_s=60.0,
    steps=3,
    warmup=1,
  )
  rows = scaling.sweep(args)
  models = ('atlas', 'vit', 'window_vit')
  assert launched == [(model, resolution) for resolution in (128, 256) for model in models] + [('vit', 512)]
  assert [(row['model'], row['resolution'], row['status']) for row in rows[6:]] == [
    ('atlas', 512, 'predicted_over_time'),
    ('vit', 512, 'over_memory'),
    ('window_vit', 512, 'predicted_over_time'),
  ]
  assert all(row['status'] == 'ok' for row in rows[:6]) and len(rows) == 9
  assert len(read_csv(tmp_path / 'points.csv')) == 9
  assert (tmp_path / 'scaling.png').read_bytes().startswith(PNG_SIGNATURE)


def test_split_depths_covers_every_scale():
  scaling = load_command('scaling')
  depths = [scaling.split_depths(scales, 6) for scales in (1, 2, 3, 4)]
  assert depths == [(6,), (2, 4), (2, 2, 2), (1, 1, 1, 3)]
  with pytest.raises(scaling.common.ExperimentError, match='cannot cover'):
    scaling.split_depths(4, 3)
