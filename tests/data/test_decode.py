"""Tests for atlas_jax.data.decode: every odd but valid image becomes uint8 RGB, every broken one a one-line
BadImageError, huge JPEGs are decoded reduced, other formats refused above max_pixels."""

import pickle

import numpy as np
from PIL import Image, ImageFile
import pytest

from atlas_jax.data.decode import BadImageError, decode_image
from atlas_jax.errors import AtlasError
from tests.data import image_files

MAX_PIXELS = 10_000_000


@pytest.fixture(scope='module')
def zoo(tmp_path_factory):
  return image_files.write_zoo(tmp_path_factory.mktemp('zoo'))


@pytest.mark.parametrize('kind', image_files.GOOD_KINDS)
def test_good_files_decode_to_uint8_rgb_from_a_path_and_from_bytes(zoo, kind):
  image = decode_image(zoo[kind], MAX_PIXELS)
  assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.flags.c_contiguous
  np.testing.assert_array_equal(decode_image(zoo[kind].read_bytes(), MAX_PIXELS), image)


def test_what_each_conversion_gives(zoo):
  gray = decode_image(zoo['grayscale'], MAX_PIXELS)
  np.testing.assert_array_equal(gray[0, :, 0], np.arange(0, 256, 8))
  assert (gray == gray[..., :1]).all()  # R = G = B
  np.testing.assert_allclose(
    decode_image(zoo['cmyk'], MAX_PIXELS).reshape(-1, 3).mean(0), [0, 255, 255], atol=3
  )  # full cyan
  palette = decode_image(zoo['palette'], MAX_PIXELS)
  np.testing.assert_allclose(palette[:, :8].reshape(-1, 3).mean(0), [220, 30, 30], atol=2)
  assert decode_image(zoo['tiny'], MAX_PIXELS).tolist() == [[[77, 77, 77]]]
  assert decode_image(zoo['very_wide'], MAX_PIXELS).shape == (2, 3000, 3)


def test_sixteen_bit_is_scaled_not_clipped(zoo):
  image = decode_image(zoo['sixteen_bit'], MAX_PIXELS)[..., 0].astype(np.int64)
  stored = np.asarray(Image.open(zoo['sixteen_bit'])).astype(np.int64)  # 0 .. 65472, 16 bits
  np.testing.assert_array_equal(image, np.round(stored / 257))
  assert image.min() == 0 and image.max() == 255 and len(np.unique(image)) == 256
  assert image[16, 0] == round(16 * 32 * 64 / 257)  # mid-range: 128, not clipped at 255


def test_transparency_is_composited_on_white(zoo):
  alpha = decode_image(zoo['alpha'], MAX_PIXELS)
  assert (alpha[:, :8] == 255).all()  # transparent: white
  assert (alpha[:, 8:] == [200, 0, 0]).all()  # opaque: its colour
  gray_alpha = decode_image(zoo['gray_alpha'], MAX_PIXELS)
  assert (gray_alpha == round((10 * 128 + 255 * 127) / 255)).all()  # half-opaque dark gray over white
  transparent = decode_image(zoo['palette_transparent'], MAX_PIXELS)
  assert (transparent[:, :8] == 255).all()  # the transparent palette entry
  np.testing.assert_allclose(transparent[:, 8:].reshape(-1, 3).mean(0), [30, 30, 220], atol=2)


def test_exif_orientation_is_applied(zoo):
  image = decode_image(zoo['exif_rotated'], MAX_PIXELS)
  assert image.shape == (40, 24, 3)  # stored 24 x 40, shown portrait
  top, bottom = image[:16].reshape(-1, 3).mean(0), image[24:].reshape(-1, 3).mean(0)
  assert top[0] > 180 > top[2] and bottom[2] > 180 > bottom[0]  # the red left half is now on top


@pytest.mark.parametrize(
  'kind, reason',
  [
    ('truncated', 'truncated'),
    ('empty', 'empty file'),
    ('not_an_image', 'not an image'),
    ('header_lying', '60000x60000 pixels'),
  ],
)
def test_broken_files_raise_one_line_with_their_path(zoo, kind, reason):
  with pytest.raises(BadImageError, match=reason) as caught:
    decode_image(zoo[kind], MAX_PIXELS)
  message = str(caught.value)
  assert '\n' not in message and message.startswith(str(zoo[kind]))
  assert caught.value.path == str(zoo[kind])
  assert str(pickle.loads(pickle.dumps(caught.value))) == message  # crosses process boundaries
  assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bytes_are_named_in_errors():
  with pytest.raises(BadImageError, match=r'^tfds x train\[3\]: empty file$'):
    decode_image(b'', MAX_PIXELS, name='tfds x train[3]')
  assert issubclass(BadImageError, AtlasError) and issubclass(BadImageError, ValueError)


def test_a_large_jpeg_is_decoded_reduced_and_other_formats_are_refused():
  jpeg = image_files.encode(image_files.halves(480, 640), 'JPEG', quality=90)  # 307,200 pixels
  assert decode_image(jpeg, 640 * 480).shape == (480, 640, 3)
  assert decode_image(jpeg, 100_000).shape == (240, 320, 3)  # 1/2 is the largest that fits
  reduced = decode_image(jpeg, 5_000)
  assert reduced.shape == (60, 80, 3)  # 1/8
  np.testing.assert_allclose(reduced[:, :35].reshape(-1, 3).mean(0), [220, 30, 30], atol=4)
  with pytest.raises(BadImageError, match='even 1/8 scale is larger'):
    decode_image(jpeg, 1_000)
  png = image_files.encode(image_files.halves(480, 640), 'PNG')
  with pytest.raises(BadImageError, match=r'exceeds data.max_pixels=100000; raise data.max_pixels'):
    decode_image(png, 100_000)
