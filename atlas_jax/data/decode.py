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
  - A file whose decode would allocate more than `max_decode_bytes` (data.max_decode_bytes) is refused
    before any pixel is decoded. The estimate is made from the header alone (`decode_bytes`): PIL's
    in-memory image (1 byte a pixel for '1', 'L', 'P', 2 for 16-bit gray, 4 for RGB, RGBA, LA, CMYK, 32-bit),
    the decoder's own buffers (a progressive or multi-scan JPEG keeps every DCT coefficient of the full-size
    image, 2 bytes a sample, whatever the draft scale; WebP decodes to a full RGBA buffer; TIFF may read a
    whole strip) and the conversion to RGB (the EXIF transpose frees the stored image, so costs no more).
    Nothing in the estimate reads past the header (PIL's PNG getexif() would decode the whole image). A baseline JPEG over the budget is decoded
    reduced when a draft scale fits, as above `max_pixels`.
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
# The default of data.max_decode_bytes (configs/common.py): 1 GiB per decode, 8 GiB for the 8 default workers.
DEFAULT_MAX_DECODE_BYTES = 1 << 30
# PIL's in-memory bytes per pixel by mode (libImaging: '1' is stored a byte a pixel, 'RGB' and 'LA' in 4).
_STORED_BYTES = {'1': 1, 'L': 1, 'P': 1, 'I;16': 2, 'I;16L': 2, 'I;16B': 2, 'I;16N': 2}  # any other: 4
# Peak bytes per pixel `_to_rgb` allocates beyond the decoded image, by what it does (measured peak RSS at
# 4000x4000 with Pillow 13): RGB -> the array (tobytes joins its chunks: 2 x 3); alpha -> RGBA copy 4 +
# array 4 + output 3 (composited in blocks of rows); 16-bit -> array 2 + gray 1 + output 3 (+ slack);
# 32-bit/float -> array 2 x 4 + float64 passes 3 x 8 + output 3 + gray 1; else convert('RGB') 4 + array 2 x 3.
_CONVERSION_BYTES = {'RGB': 6, 'alpha': 12, 'sixteen': 7, 'wide': 36, 'other': 10}
_COMPOSITE_BLOCK_PIXELS = 1 << 20  # pixels composited at a time: bounds the uint32 temporaries (~64 MB)


class BadImageError(AtlasError, ValueError):
  """A file that cannot be turned into an RGB image: `path` names it, `reason` says why (one line)."""

  def __init__(self, path, reason: str):
    self.path = str(path)
    self.reason = ' '.join(str(reason).split())  # one line, whatever the underlying error printed
    super().__init__(f'{self.path}: {self.reason}')

  def __reduce__(self):  # picklable across worker processes
    return type(self), (self.path, self.reason)


def decode_image(
  path_or_bytes, max_pixels: int, name: str | None = None, max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
) -> np.ndarray:
  """A file path or its encoded bytes -> uint8 (H, W, 3) RGB, at most `max_pixels` pixels, decoded within
  about `max_decode_bytes` of memory; see the module doc.

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
      return _decode_opened(image, stream, num_bytes, max_pixels, max_decode_bytes, name)
  except BadImageError:
    raise
  except Image.UnidentifiedImageError as error:
    raise BadImageError(name, 'not an image PIL can identify') from error
  except Exception as error:  # PIL reports malformed data as OSError, SyntaxError, ValueError, struct.error
    raise BadImageError(name, f'cannot decode: {type(error).__name__}: {error}') from error


def _decode_opened(
  image: Image.Image, stream, num_bytes: int, max_pixels: int, max_decode_bytes: int, name: str
) -> np.ndarray:
  width, height = image.size
  pixels = width * height
  if pixels > max(_MIN_JUDGED_PIXELS, MAX_PIXELS_PER_BYTE * num_bytes):
    raise BadImageError(
      name,
      f'the header claims {width}x{height} pixels, more than {num_bytes} bytes can '
      'hold: a corrupt or forged header',
    )
  budget = _Budget(image, stream, max_decode_bytes)
  if pixels > max_pixels or budget.needed(width, height) > max_decode_bytes:
    _reduce_on_decode(image, max_pixels, budget, name)
  image.load()  # raises on a truncated file (PIL's LOAD_TRUNCATED_IMAGES is False unless set)
  upright = _upright(image)
  if upright is not image:  # free the stored pixels: a transpose then never outweighs the RGB conversion
    image.close()
  return _to_rgb(upright, name)


def _reduce_on_decode(image: Image.Image, max_pixels: int, budget: '_Budget', name: str) -> None:
  """Asks the JPEG decoder for the largest 1/s scale within `max_pixels` and the decode budget; refuses
  anything else that large."""
  width, height = image.size
  if width * height > max_pixels:
    too_large = (
      f'{width}x{height} = {width * height} pixels exceeds data.max_pixels={max_pixels}; '
      'raise data.max_pixels'
    )
  else:
    too_large = budget.refusal(width, height)
  if image.format != 'JPEG':
    raise BadImageError(name, f'{too_large} (only JPEGs are decoded reduced)')
  for scale in _JPEG_SCALES:
    reduced = (-(-width // scale), -(-height // scale))
    if reduced[0] * reduced[1] <= max_pixels and budget.needed(*reduced) <= budget.limit:
      break
  else:
    if -(-width // 8) * -(-height // 8) <= max_pixels:
      too_large = budget.refusal(-(-width // 8), -(-height // 8))
    raise BadImageError(name, f'{too_large} (even 1/8 scale is larger)')
  image.draft(None, (max(1, width // scale), max(1, height // scale)))
  if image.size[0] * image.size[1] > max_pixels or budget.needed(*image.size) > budget.limit:
    raise BadImageError(name, f'{too_large} (this JPEG cannot be decoded reduced)')


class _Budget:
  """The bytes decoding `image` (opened, not loaded) will allocate, from its header alone (module doc)."""

  def __init__(self, image: Image.Image, stream, limit: int):
    self.limit = int(limit)
    self.format, self.mode, self.full_size = image.format, image.mode, image.size
    self.transparent = 'transparency' in image.info
    # Decoder-held bytes that draft mode does not reduce: a JPEG decoded in several scans (progressive,
    # or baseline with non-interleaved components) keeps its full-size coefficients.
    self.fixed = 0
    if self.format in ('JPEG', 'MPO') and (
      image.info.get('progressive') or image.info.get('progression') or _scans(stream) > 1
    ):
      self.fixed = _coefficient_bytes(image)

  def needed(self, width: int, height: int) -> int:
    """Bytes of a decode to width x height pixels (the full size, or a JPEG draft scale)."""
    pixels = width * height
    stored = _STORED_BYTES.get(self.mode, 4)
    per_pixel = stored + _CONVERSION_BYTES[self._conversion()]
    if self.format == 'WEBP':  # libwebp's own decoded buffer, then PIL's copy (measured)
      per_pixel += 8
    elif self.format == 'TIFF':
      per_pixel += stored
    return self.fixed + pixels * per_pixel

  def refusal(self, width: int, height: int) -> str:
    return (
      f'decoding {self.full_size[0]}x{self.full_size[1]} ({self.format} {self.mode}) would allocate about '
      f'{self.needed(width, height)} bytes, more than data.max_decode_bytes={self.limit}; '
      'raise data.max_decode_bytes'
    )

  def _conversion(self) -> str:
    if self.mode in _ALPHA_MODES or (self.mode in ('P', 'L', 'RGB') and self.transparent):
      return 'alpha'
    if self.mode == 'RGB':
      return 'RGB'
    if self.mode in _SIXTEEN_BIT_MODES:
      return 'sixteen'
    if self.mode in ('I', 'F'):
      return 'wide'
    return 'other'


def _orientation(image: Image.Image) -> int:
  try:
    return image.getexif().get(_EXIF_ORIENTATION, 1)
  except Exception:  # broken EXIF: the image stays as stored
    return 1


def _scans(stream) -> int:
  """The SOS markers of a JPEG file (entropy-coded data stuffs every 0xFF byte, so none hides there)."""
  position = stream.tell()
  try:
    stream.seek(0)
    return stream.read().count(b'\xff\xda')
  finally:
    stream.seek(position)


def _coefficient_bytes(image: Image.Image) -> int:
  """libjpeg's full-image coefficient buffers: 2 bytes per DCT coefficient, each component's blocks padded to
  whole MCUs at its sampling factors."""
  width, height = image.size
  layers = getattr(image, 'layer', None) or []
  try:
    # PIL's layer: (id, horizontal, vertical sampling factor, qtable), the SOF's high and low nibbles.
    h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    mcu_columns, mcu_rows = -(-width // (8 * h_max)), -(-height // (8 * v_max))
    return sum(2 * 64 * mcu_columns * layer[1] * mcu_rows * layer[2] for layer in layers)
  except (ValueError, TypeError, IndexError):  # no sampling factors: every component at full size
    return 2 * (-(-width // 8) * 8) * (-(-height // 8) * 8) * max(1, getattr(image, 'layers', 3) or 3)


def _upright(image: Image.Image) -> Image.Image:
  transpose = _ORIENTATION_TRANSPOSE.get(_orientation(image))
  return image if transpose is None else image.transpose(transpose)


def _to_rgb(image: Image.Image, name: str) -> np.ndarray:
  """Any PIL mode -> uint8 (H, W, 3)."""
  mode = image.mode
  if mode in ('P', 'L', 'RGB') and 'transparency' in image.info:  # a transparent colour or palette entry
    image, mode = image.convert('RGBA'), 'RGBA'
  if mode == 'RGB':
    return np.ascontiguousarray(np.asarray(image, np.uint8))
  if mode in _ALPHA_MODES:
    return _over_white(np.asarray(image.convert('RGBA'), np.uint8))
  if mode in _SIXTEEN_BIT_MODES:
    values = np.asarray(image)  # (H, W), in blocks of rows: the uint32 temporaries stay small
    gray = np.empty(values.shape, np.uint8)
    for rows in _row_blocks(values.shape):
      gray[rows] = ((values[rows].astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode in ('I', 'F'):
    gray = _scale_to_8_bits(np.asarray(image), mode)  # (H, W)
    return np.repeat(gray[..., None], 3, axis=-1)
  try:
    return np.ascontiguousarray(np.asarray(image.convert('RGB'), np.uint8))
  except (ValueError, OSError) as error:
    raise BadImageError(name, f'cannot convert PIL mode {mode} to RGB ({error})') from error


def _row_blocks(shape) -> list[slice]:
  rows = max(1, _COMPOSITE_BLOCK_PIXELS // max(1, shape[1]))
  return [slice(start, start + rows) for start in range(0, shape[0], rows)]


def _over_white(rgba: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 4) -> uint8 (H, W, 3) composited on white, in blocks of rows (bounded temporaries)."""
  rgb = np.empty(rgba.shape[:2] + (3,), np.uint8)
  for rows in _row_blocks(rgba.shape):
    block = rgba[rows].astype(np.uint32)
    alpha = block[..., 3:]
    # Integer "over white": rgb * a + 255 * (255 - a), divided by 255 with rounding.
    rgb[rows] = ((block[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
  return rgb


def _scale_to_8_bits(values: np.ndarray, mode: str) -> np.ndarray:
  """A 16-bit, 32-bit integer or float single-channel image -> uint8, scaled (not clipped)."""
  if mode in _SIXTEEN_BIT_MODES or (mode == 'I' and values.min() >= 0 and values.max() <= 65535):
    return ((values.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
  values = values.astype(np.float64)
  low, high = float(values.min()), float(values.max())
  if not np.isfinite(low) or not np.isfinite(high) or high <= low:
    return np.zeros(values.shape, np.uint8)
  return np.round((values - low) * (255.0 / (high - low))).astype(np.uint8)
