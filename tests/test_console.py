"""What a researcher reads on the console, through the command line: the start-of-run lines (backend,
devices, mesh, the model, init_from and its head), WORKDIR/labels.txt, one preemption line, no orbax or
top-5 noise, no empty TensorBoard file, 'already complete' for a finished run and mode=eval naming its step.

The tests share one short run on a 4-class image folder, started from a 10-class workdir (init_from),
stopped by SIGTERM after its first step and resumed to the end.
"""

import importlib.util
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
from PIL import Image
import pytest

from atlas_jax import checkpointing, run_setup, sharding
from atlas_jax import config as config_lib
from atlas_jax import metrics as metrics_lib
from atlas_jax import workdir as workdir_lib
from tests.train_configs import ROOT, command_line_overrides, run_module, tiny_config

CLASSES = ('cat', 'dog', 'n01440764', 'zebra')  # folder names, in the order the folder source numbers them
SOURCE_CLASSES = 10  # of the init_from workdir: the head is re-initialized
STEPS = 6
# Saves at every step, evaluated at 3 and 6 only: the others are orbax's tracked_metric warning.
FOLDER_FLAGS = dict(
  data__source='folder',
  model__num_classes=len(CLASSES),
  checkpoint__every_steps=1,
  eval__every_steps=3,
  log__every_steps=1,
)
TRACKED_METRIC = 'tracked_metric'


def _write_folder(root: pathlib.Path) -> pathlib.Path:
  rng = np.random.default_rng(0)
  for split, count in (('train', 4), ('val', 2)):
    for name in reversed(CLASSES):  # created out of order: the source sorts
      directory = root / split / name
      directory.mkdir(parents=True)
      for index in range(count):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(directory / f'{index}.png')
  return root


def _write_source(workdir: pathlib.Path) -> None:
  """A workdir of the tiny model with a 10-class head: config.json and random weights as step 0."""
  config = config_lib.resolve(tiny_config(model__num_classes=SOURCE_CLASSES))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
    lambda leaf: rng.normal(0.0, 0.1, leaf.shape).astype(leaf.dtype),
    run_setup.train_setup(config).abstract_state.params,
  )
  workdir_lib.write_config(workdir, config)
  checkpoints = checkpointing.Checkpoints(workdir)
  checkpoints.save(0, {'params': params})
  checkpoints.wait()
  checkpoints.close()


def _train_command(workdir, data_dir, source, **overrides):
  return [
    sys.executable,
    '-m',
    'atlas_jax.main',
    f'--config=configs/quickstart.py:steps={STEPS}',
    *command_line_overrides(**FOLDER_FLAGS, data__data_dir=str(data_dir), **overrides),
    f'--config.init_from={source}',
    f'--workdir={workdir}',
  ]


def _events_files(workdir) -> list[pathlib.Path]:
  directory = metrics_lib.tensorboard_dir(workdir)
  return sorted(directory.iterdir()) if directory.is_dir() else []


def _logged_train_steps(workdir) -> int:
  path = metrics_lib.metrics_path(workdir)
  return path.read_text().count('"kind": "train"') if path.is_file() else 0


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """{'workdir', 'command', 'stopped', 'resumed'}: the folder run SIGTERMed after its first logged step,
  then the same command run to the end."""
  root = tmp_path_factory.mktemp('console')
  data_dir = _write_folder(root / 'images')
  source = root / 'source'
  _write_source(source)
  workdir = root / 'run'
  command = _train_command(workdir, data_dir, source)
  env = {**os.environ, 'PYTHONPATH': str(ROOT)}
  process = subprocess.Popen(
    command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  deadline = time.monotonic() + 240
  while not _logged_train_steps(workdir):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.monotonic() < deadline, 'the run did not log a step'
    time.sleep(0.02)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=240)
  stopped = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
  assert stopped.returncode == 0, stderr[-3000:]
  resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return {'workdir': workdir, 'command': command, 'source': source, 'stopped': stopped, 'resumed': resumed}


def test_training_starts_with_backend_mesh_model_and_init_from_lines(run):
  lines = run['stopped'].stdout.splitlines()
  assert lines[0] == run_setup.backend_line()  # e.g. 'backend: cpu, 1 device (cpu)'
  mesh = sharding.make_mesh(config_lib.resolve(tiny_config()))
  assert lines[1] == run_setup.mesh_line(mesh) and lines[1].startswith(f'mesh: data {jax.device_count()} x ')
  assert re.fullmatch(
    r'model: atlas T \(dim 16, 2 heads, depths \(1, 1\)\), 4 classes, image 32x32, patch 4, window 4, '
    r'pool 2, [\d,]+ parameters',
    lines[2],
  ), lines[2]
  assert lines[3] == f'init_from: step 0 of {run["source"]}, head re-initialized (10 -> 4 classes)'
  resumed = run['resumed'].stdout.splitlines()
  assert resumed[:2] == lines[:2] and resumed[3].startswith('resuming from step ')
  assert 'init_from' not in run['resumed'].stdout  # a resumed run continues from its own checkpoint


def test_a_folder_run_writes_its_class_names_to_labels_txt(run):
  assert (run['workdir'] / 'labels.txt').read_text() == 'cat\ndog\nn01440764\nzebra\n'
  assert workdir_lib.read_labels(run['workdir']) == list(CLASSES)


def test_sigterm_prints_one_preemption_line_and_no_save_prints_orbax_warnings(run):
  stopped, resumed = run['stopped'], run['resumed']
  assert stopped.stdout.count('preempted: saved step') == 1 and 'SIGTERM' not in stopped.stderr
  assert f'resuming from step {stopped.stdout.split("preempted: saved step ")[1].split(";")[0]} ' in (
    resumed.stdout
  )
  for result in (stopped, resumed):  # saves at every step, evaluated or not, and the SIGTERM save
    assert TRACKED_METRIC not in result.stdout + result.stderr


def test_4_classes_print_no_top_5(run):
  evals = [line for line in run['resumed'].stdout.splitlines() if line.startswith('eval step')]
  assert evals and all(
    re.fullmatch(r'eval step [36] \(raw weights\): top-1 [\d.]+  loss [\d.]+', line) for line in evals
  ), evals
  assert 'top-5' not in run['resumed'].stdout


def test_rerunning_a_finished_run_says_so_in_one_line_and_writes_no_events_file(run):
  workdir = run['workdir']
  events_before, metrics_before = _events_files(workdir), metrics_lib.metrics_path(workdir).read_text()
  assert len(events_before) == 2  # the stopped run's and the resumed run's
  result = subprocess.run(
    run['command'], cwd=ROOT, env={**os.environ, 'PYTHONPATH': str(ROOT)}, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.splitlines() == [
    f'already complete at step {STEPS}: checkpoints in {(workdir / "checkpoints").absolute()}'
  ]
  assert _events_files(workdir) == events_before
  assert metrics_lib.metrics_path(workdir).read_text() == metrics_before


def test_mode_eval_names_its_step_and_weights_before_the_json_line(run, tmp_path):
  workdir = run['workdir']
  best = max(
    (record['top1'], record['step'])
    for record in metrics_lib.read_metrics(workdir)
    if record['kind'] == 'eval'
  )[1]  # ties go to the later step, as the checkpoints rank them
  # A machine that shows an NVIDIA GPU (nvidia-smi on the PATH) while JAX runs on the CPU.
  fake_bin = tmp_path / 'bin'
  fake_bin.mkdir()
  (fake_bin / 'nvidia-smi').write_text('#!/bin/sh\nexit 0\n')
  (fake_bin / 'nvidia-smi').chmod(0o755)
  env = {'PATH': f'{fake_bin}{os.pathsep}{os.environ["PATH"]}', 'JAX_PLATFORMS': ''}
  result = run_module(*run['command'][2:], '--config.mode=eval', env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  cpu_jaxlib = jax.default_backend() == 'cpu' and not any(
    importlib.util.find_spec(name) for name in run_setup.CUDA_PLUGINS
  )
  if cpu_jaxlib:
    warning = lines.pop(0)
    assert warning.startswith('warning: this machine has an NVIDIA GPU but JAX runs on the CPU'), warning
    assert 'pip install -U "jax[cuda12]"' in warning
  assert lines[0] == run_setup.backend_line() and not any('warning' in line for line in lines)
  which = 'the best recorded and the latest' if best == STEPS else f'the best recorded; the latest is {STEPS}'
  assert re.fullmatch(
    rf'evaluated step {best} of {re.escape(str(workdir))} \({re.escape(which)}\), raw weights: '
    r'top-1 [\d.]+  loss [\d.]+',
    lines[-2],
  ), lines[-2]
  report = json.loads(lines[-1])
  assert report['step'] == best and report['weights'] == 'raw'


def test_the_benchmark_drops_jaxs_no_tpu_line_on_a_machine_without_a_tpu(caplog):
  from atlas_jax import benchmark

  if importlib.util.find_spec('libtpu') is not None or os.path.exists('/dev/accel0'):
    pytest.skip('this machine may have a TPU: the line stays')
  logger = logging.getLogger('jax._src.xla_bridge')
  filters = list(logger.filters)
  try:
    benchmark._quiet_tpu_probe()
    with caplog.at_level(logging.INFO, logger=logger.name):
      logger.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so")
      logger.info("Unable to initialize backend 'cuda': no CUDA plugin")
    assert [record.getMessage() for record in caplog.records] == [
      "Unable to initialize backend 'cuda': no CUDA plugin"
    ]
  finally:
    logger.filters[:] = filters
