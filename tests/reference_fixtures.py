"""The parity fixtures of the reference implementation (tests/fixtures/*.npz) and their input."""

import json
import pathlib

import numpy as np

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
PARITY_FILES = ('atlas_tiny_512', 'atlas_tiny_1024', 'atlas_tiny_2048_raster', 'atlas_tiny_2048_spatial')


def reference_input(batch: int, resolution: int) -> np.ndarray:
  """The fixtures' input, NHWC: x[b, c, h, w] = sin(.021 (c+1) h + .013 w + .7 b) cos(.017 (c+1) w - .011 h)."""
  b, c, h, w = np.meshgrid(
    *(np.arange(n, dtype=np.float64) for n in (batch, 3, resolution, resolution)), indexing='ij'
  )
  x = np.sin(0.021 * (c + 1) * h + 0.013 * w + 0.7 * b) * np.cos(0.017 * (c + 1) * w - 0.011 * h)
  return x.astype(np.float32).transpose(0, 2, 3, 1)


def load_fixture(name: str):
  """(meta, state dict by reference name, eval/train outputs by key) of tests/fixtures/<name>.npz."""
  arrays = np.load(FIXTURES / f'{name}.npz')
  meta = json.loads(str(arrays['meta']))
  state_dict = {
    key[len('state_dict/') :]: arrays[key] for key in arrays.files if key.startswith('state_dict/')
  }
  outputs = {key: arrays[key] for key in arrays.files if key.startswith(('eval/', 'train/'))}
  return meta, state_dict, outputs


def fixture_config(meta: dict, parent_window: str | None = None):
  """A resolved config (configs/common.py) building exactly the fixture's model, float32."""
  from atlas_jax import config as config_lib
  from configs import common

  config = common.base_config('T', meta['resolution'])
  config.model.update(
    dim=meta['dim'],
    num_heads=meta['num_heads'],
    stem_width=meta['stem_width'],
    depths=tuple(meta['depths']),
    num_classes=meta['num_classes'],
    dtype='float32',
    drop_path_rate=0.0,
    parent_window=parent_window or meta['parent_window'].split()[0],
  )
  return config_lib.resolve(config)
