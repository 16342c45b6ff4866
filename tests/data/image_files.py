"""Image files of every kind the decoder meets, written by the tests: good ones in odd formats, broken ones.

`write_zoo(directory)` writes one file per kind and returns {kind: path}; GOOD_KINDS decode, BAD_KINDS raise
BadImageError. Images are tiny (at most 64 px a side, except the very wide one) so a test writes them in
milliseconds.
"""

import io
import pathlib
import struct
import zlib

import numpy as np
from PIL import Image

GOOD_KINDS = (
  'rgb_jpeg',
  'grayscale',
  'cmyk',
  'sixteen_bit',
  'palette',
  'palette_transparent',
  'alpha',
  'gray_alpha',
  'tiny',
  'very_wide',
  'exif_rotated',
)
BAD_KINDS = ('truncated', 'empty', 'not_an_image', 'header_lying')
EXIF_ORIENTATION = 0x0112


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
  """A photo-like uint8 image: smooth colour regions plus mild noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
  return np.clip(smooth + rng.normal(0, 4, smooth.shape), 0, 255).astype(np.uint8)


def folder_config(image_size=(96, 128), **augment_fields):
  """A resolved config of an image-folder run at `image_size` with these `data.augment` fields."""
  from atlas_jax import config as config_lib
  from configs import common

  config = common.base_config('T', image_size)
  config.data.source = 'folder'
  config.data.augment.update(augment_fields)
  return config_lib.resolve(config)


def halves(height: int, width: int, left=(220, 30, 30), right=(30, 30, 220)) -> np.ndarray:
  """uint8 (H, W, 3): the left half one colour, the right half another (shows rotations and flips)."""
  image = np.empty((height, width, 3), np.uint8)
  image[:, : width // 2] = left
  image[:, width // 2 :] = right
  return image


def encode(array_or_image, image_format: str, **options) -> bytes:
  image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
  buffer = io.BytesIO()
  image.save(buffer, image_format, **options)
  return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
  """A valid 8x8 PNG whose IHDR is rewritten (with a correct CRC) to claim width x height pixels."""
  data = bytearray(encode(np.zeros((8, 8, 3), np.uint8), 'PNG'))
  ihdr = data.index(b'IHDR')
  data[ihdr + 4 : ihdr + 12] = struct.pack('>II', width, height)
  chunk_end = ihdr + 4 + 13
  data[chunk_end : chunk_end + 4] = struct.pack('>I', zlib.crc32(bytes(data[ihdr:chunk_end])))
  return bytes(data)


def exif_rotated_jpeg() -> bytes:
  """Stored 24 rows x 40 columns, left red / right blue, EXIF orientation 6: shown rotated 90 degrees
  clockwise, 40 rows x 24 columns, red on top."""
  exif = Image.Exif()
  exif[EXIF_ORIENTATION] = 6
  return encode(halves(24, 40), 'JPEG', quality=95, exif=exif.tobytes())


def zoo_bytes() -> dict[str, tuple[str, bytes]]:
  """{kind: (file suffix, encoded bytes)} of every kind."""
  gradient16 = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
  palette = Image.fromarray(halves(16, 16)).convert('P', palette=Image.Palette.ADAPTIVE, colors=4)
  transparent = palette.copy()
  transparent.info['transparency'] = palette.getpixel((0, 0))  # the left half's colour
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, :8, 3] = 0  # left half transparent
  rgba[:, 8:, 3] = 255
  gray_alpha = Image.fromarray(
    np.stack([np.full((16, 16), 10, np.uint8), np.full((16, 16), 128, np.uint8)], axis=-1), mode='LA'
  )
  cmyk = Image.new('CMYK', (16, 16), (255, 0, 0, 0))  # full cyan: RGB (0, 255, 255)
  good_jpeg = encode(halves(48, 64), 'JPEG', quality=90)
  return {
    'rgb_jpeg': ('.jpg', good_jpeg),
    'grayscale': ('.png', encode(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (8, 1)), 'PNG')),
    'cmyk': ('.jpg', encode(cmyk, 'JPEG', quality=95)),
    'sixteen_bit': ('.png', encode(Image.fromarray(gradient16), 'PNG')),
    'palette': ('.png', encode(palette, 'PNG')),
    'palette_transparent': (
      '.gif',
      encode(transparent, 'GIF', transparency=transparent.info['transparency']),
    ),
    'alpha': ('.png', encode(rgba, 'PNG')),
    'gray_alpha': ('.png', encode(gray_alpha, 'PNG')),
    'tiny': ('.png', encode(np.full((1, 1, 3), 77, np.uint8), 'PNG')),
    'very_wide': ('.png', encode(np.full((2, 3000, 3), 140, np.uint8), 'PNG')),
    'exif_rotated': ('.jpg', exif_rotated_jpeg()),
    'truncated': ('.jpg', good_jpeg[: len(good_jpeg) // 2]),
    'empty': ('.jpg', b''),
    'not_an_image': ('.jpg', b'this is a text file that happens to end in .jpg\n' * 4),
    'header_lying': ('.png', png_claiming(60_000, 60_000)),
  }


def write_zoo(directory) -> dict[str, pathlib.Path]:
  """Writes every kind into `directory` as `<kind><suffix>`; returns {kind: path}."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  paths = {}
  for kind, (suffix, data) in zoo_bytes().items():
    paths[kind] = directory / f'{kind}{suffix}'
    paths[kind].write_bytes(data)
  return paths
