"""Image decoding for the data sources: any file PIL reads -> uint8 (H, W, 3) RGB, or a BadImageError.

What `decode_image` does with what it meets:
  - EXIF orientation is applied (a photo shot in portrait comes out upright). Unreadable EXIF leaves the
    image as stored.
  - Grayscale, 1-bit, palette, CMYK and YCbCr images are converted to RGB (CMYK without colour management).
  - 16-bit images are scaled to 8 bits (v / 257, so 65535 -> 255), never clipped; 32-bit integer images whose
    values exceed 16 bits and float images are stretched from their minimum to their maximum.
  - Transparency (RGBA, LA, a palette with a transparent colour) is composited on white, as the image shows
    on a white page: dropping the alpha channel would reveal whatever colour the transparent pixels happen
    to hold, often black.
  - Only the first frame of an animated or multi-page file is decoded.
  - An image of more than `max_pixels` pixels is decoded reduced when the format allows it: a JPEG is
    decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, PIL's draft mode), the largest that fits in
    `max_pixels`. Any other format above `max_pixels` is refused: reducing it would mean decoding it whole
    first, the memory `max_pixels` is there to bound.
  - A file whose header claims more than MAX_PIXELS_PER_BYTE pixels per byte of file is refused before any
    pixel is decoded: no real image compresses that well, and a lying header would otherwise cost a huge
    allocation before the data runs out.
  - Empty, truncated (PIL's LOAD_TRUNCATED_IMAGES stays False) and unidentifiable files are refused.
Tiny (1x1) and very wide or tall images are decoded as they are; resizing is the transform's job.

Importing this module turns off PIL's own decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, about 89
megapixels): it would refuse legitimately huge JPEGs before draft mode could reduce them, and the two checks
above replace it.
"""

import io
import os
import pathlib

import numpy as np
from PIL import Image

from atlas_jax.errors import AtlasError

Image.MAX_IMAGE_PIXELS = None

# Blank images, the best any format compresses, measured with PIL at 4096x4096: lossless WebP ~24,000 pixels
# per byte, 1-bit PNG ~2,500, GIF ~1,200, RGB PNG ~290, JPEG ~170 (Huffman-coded JPEG spends at least one
# bit per 8x8 block, so at most 512). Twice WebP's leaves room for larger blank images.
MAX_PIXELS_PER_BYTE = 50_000
# Headers claiming fewer pixels than this are not judged by their byte size: a small file, even a lying one,
# costs little to try, and tiny legitimate files carry headers that outweigh their pixel data.
_MIN_JUDGED_PIXELS = 1 << 20
_EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the image upright (orientation 1 is upright already).
_ORIENTATION_TRANSPOSE = {
  2: Image.Transpose.FLIP_LEFT_RIGHT,
  3: Image.Transpose.ROTATE_180,
  4: Image.Transpose.FLIP_TOP_BOTTOM,
  5: Image.Transpose.TRANSPOSE,
  6: Image.Transpose.ROTATE_270,
  7: Image.Transpose.TRANSVERSE,
  8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_ALPHA_MODES = ('RGBA', 'RGBa', 'LA', 'La', 'PA')
_JPEG_SCALES = (1, 2, 4, 8)


class BadImageError(AtlasError, ValueError):
  """A file that cannot be turned into an RGB image: `path` names it, `reason` says why (one line)."""

  def __init__(self, path, reason: str):
    self.path = str(path)
    self.reason = ' '.join(str(reason).split())  # one line, whatever the underlying error printed
    super().__init__(f'{self.path}: {self.reason}')

  def __reduce__(self):  # picklable across worker processes
    return type(self), (self.path, self.reason)


def decode_image(path_or_bytes, max_pixels: int, name: str | None = None) -> np.ndarray:
  """A file path or its encoded bytes -> uint8 (H, W, 3) RGB, at most `max_pixels` pixels; see the module doc.

  `name` labels the image in errors when given bytes (a record of a dataset); a path names itself.
  Raises BadImageError for anything that cannot be decoded.
  """
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    name = name or '<encoded image>'
    num_bytes = len(path_or_bytes)
    opener = lambda: io.BytesIO(path_or_bytes)
  else:
    name = name or os.fspath(path_or_bytes)
    try:
      num_bytes = os.path.getsize(path_or_bytes)
    except OSError as error:
      raise BadImageError(name, f'cannot read the file ({error.strerror or error})') from error
    opener = lambda: pathlib.Path(path_or_bytes).open('rb')
  if num_bytes == 0:
    raise BadImageError(name, 'empty file')
  try:
    with opener() as stream, Image.open(stream) as image:
      return _decode_opened(image, num_bytes, max_pixels, name)
  except BadImageError:
    raise
  except Image.UnidentifiedImageError as error:
    raise BadImageError(name, 'not an image PIL can identify') from error
  except Exception as error:  # PIL reports malformed data as OSError, SyntaxError, ValueError, struct.error
    raise BadImageError(name, f'cannot decode: {type(error).__name__}: {error}') from error


def _decode_opened(image: Image.Image, num_bytes: int, max_pixels: int, name: str) -> np.ndarray:
  width, height = image.size
  pixels = width * height
  if pixels > max(_MIN_JUDGED_PIXELS, MAX_PIXELS_PER_BYTE * num_bytes):
    raise BadImageError(
      name,
      f'the header claims {width}x{height} pixels, more than {num_bytes} bytes can '
      'hold: a corrupt or forged header',
    )
  if pixels > max_pixels:
    _reduce_on_decode(image, max_pixels, name)
  image.load()  # raises on a truncated file (PIL's LOAD_TRUNCATED_IMAGES is False unless set)
  image = _upright(image)
  return _to_rgb(image, name)


def _reduce_on_decode(image: Image.Image, max_pixels: int, name: str) -> None:
  """Asks the JPEG decoder for the largest 1/s scale within `max_pixels`; refuses anything else that large."""
  width, height = image.size
  too_large = (
    f'{width}x{height} = {width * height} pixels exceeds data.max_pixels={max_pixels}; raise data.max_pixels'
  )
  if image.format != 'JPEG':
    raise BadImageError(name, f'{too_large} (only JPEGs are decoded reduced)')
  for scale in _JPEG_SCALES:
    if -(-width // scale) * -(-height // scale) <= max_pixels:
      break
  else:
    raise BadImageError(name, f'{too_large} (even 1/8 scale is larger)')
  image.draft(None, (max(1, width // scale), max(1, height // scale)))
  if image.size[0] * image.size[1] > max_pixels:
    raise BadImageError(name, f'{too_large} (this JPEG cannot be decoded reduced)')


def _upright(image: Image.Image) -> Image.Image:
  try:
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
  except Exception:  # broken EXIF: keep the image as stored rather than lose it
    return image
  transpose = _ORIENTATION_TRANSPOSE.get(orientation)
  return image if transpose is None else image.transpose(transpose)


def _to_rgb(image: Image.Image, name: str) -> np.ndarray:
  """Any PIL mode -> uint8 (H, W, 3)."""
  mode = image.mode
  if mode in ('P', 'L', 'RGB') and 'transparency' in image.info:  # a transparent colour or palette entry
    image, mode = image.convert('RGBA'), 'RGBA'
  if mode == 'RGB':
    return np.ascontiguousarray(np.asarray(image, np.uint8))
  if mode in _ALPHA_MODES:
    rgba = np.asarray(image.convert('RGBA'), np.uint32)  # (H, W, 4)
    alpha = rgba[..., 3:]
    # Integer "over white": rgb * a + 255 * (255 - a), divided by 255 with rounding.
    return ((rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
  if mode in _SIXTEEN_BIT_MODES or mode in ('I', 'F'):
    gray = _scale_to_8_bits(np.asarray(image), mode)  # (H, W)
    return np.repeat(gray[..., None], 3, axis=-1)
  try:
    return np.ascontiguousarray(np.asarray(image.convert('RGB'), np.uint8))
  except (ValueError, OSError) as error:
    raise BadImageError(name, f'cannot convert PIL mode {mode} to RGB ({error})') from error


def _scale_to_8_bits(values: np.ndarray, mode: str) -> np.ndarray:
  """A 16-bit, 32-bit integer or float single-channel image -> uint8, scaled (not clipped)."""
  if mode in _SIXTEEN_BIT_MODES or (mode == 'I' and values.min() >= 0 and values.max() <= 65535):
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
  values = values.astype(np.float64)
  low, high = float(values.min()), float(values.max())
  if not np.isfinite(low) or not np.isfinite(high) or high <= low:
    return np.zeros(values.shape, np.uint8)
  return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)
