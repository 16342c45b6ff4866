"""data.resize = 'crop' in the inference API and predict: images go through transforms.eval_resize with the
config's data.resize and data.crop_pct (the transform itself is tested in tests/data/test_transforms.py)."""

import io
import json

import jax.numpy as jnp
import numpy as np
from PIL import Image

from atlas_jax import inference, predict
from atlas_jax.config import resolve
from atlas_jax.data.pipeline import normalize_image
from atlas_jax.data.transforms import eval_resize
from configs import common
from tests.data.image_files import photo


class _SumModel:
  """A stand-in model: 4 "logits" per image, sums of its pixels, so they tell the preprocessings apart."""

  def apply(self, variables, images, method=None):
    del variables, method
    return jnp.stack([images.sum((1, 2, 3)), *(images[..., c].sum((1, 2)) for c in range(3))], axis=-1)


def _crop_config():
  config = common.base_config('T', 32)
  config.data.source = 'synthetic'  # 4 class names, no files needed
  config.data.resize, config.data.crop_pct = 'crop', 0.8
  return resolve(config)


def test_the_api_and_predict_prepare_images_as_the_config_says(tmp_path):
  config = _crop_config()
  predictor = inference.Predictor(_SumModel(), {}, config)
  images = [photo(40, 70), photo(90, 33, seed=1)]
  expected = np.stack([normalize_image(eval_resize(image, (32, 32), 'crop', 0.8)) for image in images])
  np.testing.assert_array_equal(predictor.prepare(images), expected)
  squashed = normalize_image(eval_resize(images[0], (32, 32)))
  assert not np.allclose(predictor.prepare(images[0])[0], squashed)
  # predict's run reads the files through the same function (load_image with the config's options).
  path = tmp_path / 'a.png'
  Image.fromarray(images[0]).save(path)
  np.testing.assert_array_equal(
    inference.load_image(path, (32, 32), config.data.max_pixels, config.data.max_decode_bytes, 'crop', 0.8),
    expected[0],
  )
  output = io.StringIO()
  assert predict.run(predictor, [path], output, top_k=2) == (1, 0)
  logits = np.asarray(json.loads(output.getvalue())['logits'])
  np.testing.assert_allclose(logits, predictor.logits(expected[:1])[0], rtol=1e-6)
