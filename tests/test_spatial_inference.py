"""Spatial parallelism at inference (docs/spatial.md): `predict --spatial=K` and `inference.load(W,
spatial=K)` split each image's rows over K of 4 faked CPU devices and give the probabilities and feature
maps of one device.

One workdir of the tests' tiny quickstart with windows of 2 (32 px, patch 4: 8 x 8 tokens, 4 x 4 windows at
scale 0, so spatial 4 splits it) and random weights saved as a checkpoint. The command lines and the API
check run as two subprocesses at the same time (each its own 4 devices): `predict --spatial=4
--resize=none` on the command line, and one process that runs the other two predict cases through
`predict.run` (what the command line calls after `inference.load`) before the API check, so that it
imports JAX and compiles once for them all.
"""

import json
import os
import subprocess
import sys

from jax.sharding import PartitionSpec
import numpy as np
from PIL import Image
import pytest

from atlas_jax import inference
from atlas_jax.config import resolve
from tests.train_configs import ROOT, random_weights_workdir, tiny_config

# The session's XLA flags (tests/conftest.py) and four devices.
FOUR_DEVICES = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
# Two images, squashed to 32 x 32 by resize=squash. With resize=none no side of either is whole windows
# (8 px): their canvas is 48 x 72, 6 rows of windows, which spatial 4 pads to 8 and spatial 2 splits as is.
SIZES = ((45, 70), (21, 37))
API_CHECK = (
  'import json, sys; from tests.test_spatial_inference import api_check; '
  'print(json.dumps(api_check(sys.argv[1], sys.argv[2], sys.argv[3:])))'
)
# (spatial, resize) of each predict run; the first on the command line, the others through predict.run.
COMMAND_LINE_CASE = (4, 'none')
IN_PROCESS_CASES = ((4, 'squash'), (2, 'none'))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  config = resolve(tiny_config(model__window=2))
  return random_weights_workdir(tmp_path_factory.mktemp('spatial_inference') / 'workdir', config)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp('spatial_images')
  rng = np.random.default_rng(1)
  for name, size in zip('ab', SIZES):
    Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(folder / f'{name}.png')
  return folder


def _start(*args) -> subprocess.Popen:
  return subprocess.Popen(
    [sys.executable, *args],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, 'PYTHONPATH': str(ROOT), 'XLA_FLAGS': FOUR_DEVICES},
  )


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
  stdout, stderr = process.communicate(timeout=300)
  return process.returncode, stdout, stderr


def _probabilities(logits) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return exp / exp.sum(axis=-1, keepdims=True)


def predict_in_process(workdir, folder, outputs) -> None:
  """IN_PROCESS_CASES through `predict.run`, as `python -m atlas_jax.predict --spatial=K --resize=R
  --batch_size=2 --output=OUTPUT FOLDER` runs them, each into its output."""
  from atlas_jax import predict
  from atlas_jax.data import transforms

  paths = predict.image_paths([folder])
  for (spatial, resize), output in zip(IN_PROCESS_CASES, outputs, strict=True):
    predictor = inference.load(workdir, batch_size=2, spatial=spatial)
    assert predictor.spatial == spatial and predictor.mesh.devices.size == 4
    options = {**transforms.eval_resize_options(predictor.config), 'resize': predictor.resize_mode(resize)}
    with open(output, 'w') as file:
      assert predict.run(predictor, paths, file, resize_options=options) == (len(paths), 0)


def _api_inputs(predictor):
  """Three photos of other sizes (squashed by `features`), and a canvas of the third at its own size: 21
  pixel rows, which do not divide by 2, so a Predictor with spatial 2 pads it to whole bands of windows."""
  rng = np.random.default_rng(2)
  photos = [rng.integers(0, 256, size + (3,), dtype=np.uint8) for size in ((40, 24), (45, 70), (21, 37))]
  return photos, inference.pad_to_canvas(predictor.prepare_native(photos[2]), 1)


def api_check(workdir, folder=None, outputs=()) -> dict:
  """In a 4-device process: the predict cases of `predict_in_process` (with `folder`), then spatial 2
  through the API: its feature maps and the odd canvas's logits, for the test to compare with one device
  (resize='none' is checked through predict)."""
  if folder is not None:
    predict_in_process(workdir, folder, outputs)
  two = inference.load(workdir, spatial=2)
  assert dict(two.mesh.shape) == {'data': 2, 'fsdp': 1, 'spatial': 2} and two.batch_size == 16
  photos, (canvas, sizes) = _api_inputs(two)
  _, images, _ = next(two._batches(two.prepare(photos), 4))
  assert images.sharding.spec == PartitionSpec(('data', 'fsdp'), 'spatial')  # each image's rows split
  features = two.features(photos)
  assert [m.shape for m in features] == [(3, 8, 8, 16), (3, 4, 4, 16), (3, 2, 2, 16)]
  return {
    'features': [np.asarray(m).tolist() for m in features],
    'odd_canvas': np.asarray(two.logits(canvas, sizes=sizes)).tolist(),
    'refused': _refusal(workdir),
  }


def _refusal(workdir) -> str:
  try:
    inference.load(workdir, spatial=3)
  except inference.InferenceError as error:
    return str(error)
  return 'not refused'


def test_predict_and_the_api_split_images_as_on_one_device(workdir, folder, tmp_path):
  outputs = {case: tmp_path / f'{case[0]}_{case[1]}.jsonl' for case in (COMMAND_LINE_CASE, *IN_PROCESS_CASES)}
  spatial, resize = COMMAND_LINE_CASE
  command_line = _start(
    '-m',
    'atlas_jax.predict',
    f'--checkpoint={workdir}',
    f'--output={outputs[COMMAND_LINE_CASE]}',
    f'--spatial={spatial}',
    f'--resize={resize}',
    '--batch_size=2',
    str(folder),
  )
  api = _start('-c', API_CHECK, str(workdir), str(folder), *(str(outputs[case]) for case in IN_PROCESS_CASES))

  try:
    # One device, spatial 1: the reference probabilities, from the same files in the same groups.
    atlas = inference.load(workdir)
    paths = sorted(folder.glob('*.png'))
    data = atlas.config.data
    squashed = np.stack(
      [inference.load_image(path, atlas.image_size, data.max_pixels, data.max_decode_bytes) for path in paths]
    )
    canvas, sizes = inference.pad_to_canvas(
      [inference.load_image(path, None, data.max_pixels, data.max_decode_bytes, 'none') for path in paths],
      atlas.canvas_multiple,
    )
    expected = {
      'squash': _probabilities(atlas.logits(squashed)),
      'none': _probabilities(atlas.logits(canvas, sizes=sizes)),
    }
    # And the API check's, while the subprocesses still run.
    photos, (odd_canvas, odd_sizes) = _api_inputs(atlas)
    expected_features = atlas.features(photos)
    expected_odd_canvas = atlas.logits(odd_canvas, sizes=odd_sizes)
    returncode, _, stderr = _finish(command_line)
    assert returncode == 0, stderr[-2000:]
    assert f'on 4 cpu device(s), each image split over {spatial}' in stderr
    returncode, stdout, stderr = _finish(api)
    assert returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    for case in outputs:
      lines = [json.loads(line) for line in outputs[case].read_text().splitlines()]
      assert [line['path'] for line in lines] == [str(path) for path in paths]
      probabilities = _probabilities([line['logits'] for line in lines])
      np.testing.assert_allclose(probabilities, expected[case[1]], atol=1e-5, rtol=0, err_msg=str(case))
      assert np.ptp(probabilities) > 0.02  # informative, not a uniform answer
    for got, want in zip(report['features'], expected_features, strict=True):
      assert np.abs(np.asarray(got) - want).max() < 1e-5
    assert np.abs(np.asarray(report['odd_canvas']) - expected_odd_canvas).max() < 1e-5
    assert report['refused'] == (
      'spatial=3 must be a positive integer dividing the 4 local device(s): use one of 1, 2, 4'
    )
  finally:  # a failed check leaves no process running
    for process in (command_line, api):
      if process.poll() is None:
        process.kill()
        process.communicate()
