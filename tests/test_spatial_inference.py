"""Spatial parallelism at inference (docs/spatial.md): `predict --spatial=K` and `inference.load(W,
spatial=K)` split each image's rows over K of 4 faked CPU devices and give the probabilities and feature
maps of one device.

One workdir of the tests' tiny quickstart with windows of 2 (32 px, patch 4: 8 x 8 tokens, 4 x 4 windows at
scale 0, so spatial 4 splits it) and random weights saved as a checkpoint. The command lines and the API
check run as subprocesses at the same time (each its own 4 devices).
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

FOUR_DEVICES = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
# Two images, squashed to 32 x 32 by resize=squash. With resize=none no side of either is whole windows
# (8 px): their canvas is 48 x 72, 6 rows of windows, which spatial 4 pads to 8 and spatial 2 splits as is.
SIZES = ((45, 70), (21, 37))
API_CHECK = (
  'import json, sys; from tests.test_spatial_inference import api_check; '
  'print(json.dumps(api_check(sys.argv[1])))'
)


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


def api_check(workdir) -> dict:
  """In a 4-device process: the largest differences of spatial 2 from spatial 1 through the API (resize='none'
  is checked through predict on the command line)."""
  rng = np.random.default_rng(2)
  photos = [rng.integers(0, 256, size + (3,), dtype=np.uint8) for size in ((40, 24), (45, 70), (21, 37))]
  one, two = inference.load(workdir), inference.load(workdir, spatial=2)
  assert dict(two.mesh.shape) == {'data': 2, 'fsdp': 1, 'spatial': 2} and two.batch_size == 16
  _, images, _ = next(two._batches(two.prepare(photos), 4))
  assert images.sharding.spec == PartitionSpec(('data', 'fsdp'), 'spatial')  # each image's rows split
  squash_one, squash_two = one.features(photos), two.features(photos)
  assert [m.shape for m in squash_two] == [(3, 8, 8, 16), (3, 4, 4, 16), (3, 2, 2, 16)]
  # A canvas of 21 pixel rows, which do not divide by 2: the Predictor pads it to whole bands of windows.
  canvas, sizes = inference.pad_to_canvas(two.prepare_native(photos[2]), 1)
  return {
    'features': float(max(np.abs(a - b).max() for a, b in zip(squash_one, squash_two, strict=True))),
    'odd_canvas': float(np.abs(one.logits(canvas, sizes=sizes) - two.logits(canvas, sizes=sizes)).max()),
    'refused': _refusal(workdir),
  }


def _refusal(workdir) -> str:
  try:
    inference.load(workdir, spatial=3)
  except inference.InferenceError as error:
    return str(error)
  return 'not refused'


def test_predict_and_the_api_split_images_as_on_one_device(workdir, folder, tmp_path):
  outputs = {
    case: tmp_path / f'{case[0]}_{case[1]}.jsonl' for case in ((4, 'squash'), (4, 'none'), (2, 'none'))
  }
  processes = {
    case: _start(
      '-m',
      'atlas_jax.predict',
      f'--checkpoint={workdir}',
      f'--output={output}',
      f'--spatial={case[0]}',
      f'--resize={case[1]}',
      '--batch_size=2',
      str(folder),
    )
    for case, output in outputs.items()
  }
  api = _start('-c', API_CHECK, str(workdir))

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
    for case, process in processes.items():
      returncode, _, stderr = _finish(process)
      assert returncode == 0, (case, stderr[-2000:])
      assert f'on 4 cpu device(s), each image split over {case[0]}' in stderr
      lines = [json.loads(line) for line in outputs[case].read_text().splitlines()]
      assert [line['path'] for line in lines] == [str(path) for path in paths]
      probabilities = _probabilities([line['logits'] for line in lines])
      np.testing.assert_allclose(probabilities, expected[case[1]], atol=1e-5, rtol=0, err_msg=str(case))
      assert np.ptp(probabilities) > 0.02  # informative, not a uniform answer

    returncode, stdout, stderr = _finish(api)
    assert returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert max(report['features'], report['odd_canvas']) < 1e-5, report
    assert report['refused'] == (
      'spatial=3 must be a positive integer dividing the 4 local device(s): use one of 1, 2, 4'
    )
  finally:  # a failed check leaves no process running
    for process in [*processes.values(), api]:
      if process.poll() is None:
        process.kill()
        process.communicate()
