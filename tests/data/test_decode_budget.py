"""Tests of data.max_decode_bytes: a file whose decode would allocate more than the budget is refused from its
header, before any pixel memory is allocated (measured in a JAX-free child process), while a baseline JPEG
over the budget is decoded reduced and images within it decode as before.

The child's peak is its own VmHWM (/proc/self/status), not os.wait4's ru_maxrss: Linux carries the pre-exec
high-water mark of the forked (or vfork-shared) parent into ru_maxrss, so a large pytest process would show
through it."""

import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from atlas_jax import config as config_lib
from atlas_jax.data import decode
from atlas_jax.data.decode import BadImageError, decode_image
from configs import common
from tests.data import image_files

MAX_PIXELS = 200_000_000  # the default: these files all pass it
BUDGET = decode.DEFAULT_MAX_DECODE_BYTES
CHILD_RSS_LIMIT = 500 * 2**20  # the unguarded decodes need 2 GB to 10 GB
SIDE = 14_000  # 196M pixels: just under the default max_pixels


def progressive_jpeg_claiming(width: int, height: int, pad_to: int) -> bytes:
  """A real 64x64 progressive JPEG whose SOF2 is rewritten to claim width x height, padded with COM segments
  to `pad_to` bytes (so the pixels-per-byte check lets it through)."""
  data = bytearray(image_files.encode(image_files.photo(64, 64), 'JPEG', quality=90, progressive=True))
  sof = data.index(b'\xff\xc2')
  data[sof + 5 : sof + 9] = struct.pack('>HH', height, width)
  padding = bytearray()
  while len(data) + len(padding) < pad_to:
    body = min(65_533, pad_to - len(data) - len(padding))
    padding += b'\xff\xfe' + struct.pack('>H', body + 2) + b'\0' * body
  return bytes(data[:2] + padding + data[2:])  # after SOI


def _chunk(kind: bytes, body: bytes) -> bytes:
  return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))


def blank_png(width: int, height: int, bit_depth: int, color_type: int, channels: int) -> bytes:
  """A real, complete PNG of zeros (streamed through zlib: no full-size buffer here)."""
  row = b'\0' * (1 + -(-width * channels * bit_depth // 8))  # filter byte 0, then the samples
  compressor = zlib.compressobj(6)
  idat = b''.join(compressor.compress(row) for _ in range(height)) + compressor.flush()
  ihdr = struct.pack('>IIBBBBB', width, height, bit_depth, color_type, 0, 0, 0)
  return b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', ihdr) + _chunk(b'IDAT', idat) + _chunk(b'IEND', b'')


_CHILD = """
import sys
from atlas_jax.data.decode import BadImageError, decode_image
assert 'jax' not in sys.modules
try:
  image = decode_image(sys.argv[1], int(sys.argv[2]), max_decode_bytes=int(sys.argv[3]))
  result = f'decoded {image.shape}'
except BadImageError as error:
  result = f'bad {error.reason}'
with open('/proc/self/status') as status:
  print(next(line.split()[1] for line in status if line.startswith('VmHWM:')))  # kB
print(result)
"""


def decode_in_child(path, max_pixels=MAX_PIXELS, budget=BUDGET) -> tuple[str, int]:
  """(what the child decoded or why not, its peak RSS in bytes): decode_image in a JAX-free process."""
  env = {**os.environ, 'OPENBLAS_NUM_THREADS': '1', 'PYTHONPATH': os.getcwd()}
  process = subprocess.Popen(
    [sys.executable, '-c', _CHILD, str(path), str(max_pixels), str(budget)],
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    env=env,
  )
  output = process.stdout.read().decode()
  process.stdout.close()
  assert process.wait() == 0, output
  peak_kb, result = output.strip().split('\n', 1)
  return result, int(peak_kb) * 1024


pytestmark = pytest.mark.skipif(not os.path.exists('/proc/self/status'), reason='needs Linux /proc')


@pytest.fixture(scope='module')
def attacks(tmp_path_factory):
  directory = tmp_path_factory.mktemp('attacks')
  files = {
    'progressive_jpeg': ('.jpg', progressive_jpeg_claiming(60_000, 60_000, 131_000)),
    'one_bit_png': ('.png', blank_png(SIDE, SIDE, 1, 0, 1)),
    'rgba16_png': ('.png', blank_png(SIDE, SIDE, 16, 6, 4)),
  }
  paths = {}
  for kind, (suffix, data) in files.items():
    paths[kind] = directory / f'{kind}{suffix}'
    paths[kind].write_bytes(data)
  return paths


@pytest.mark.parametrize(
  'kind, described',
  [
    ('progressive_jpeg', 'decoding 60000x60000 (JPEG RGB)'),
    ('one_bit_png', f'decoding {SIDE}x{SIDE} (PNG 1)'),
    ('rgba16_png', f'decoding {SIDE}x{SIDE} (PNG RGBA)'),
  ],
)
def test_a_file_over_the_budget_is_refused_before_allocating(attacks, kind, described):
  assert attacks[kind].stat().st_size < 2_000_000  # small files ...
  output, peak_rss = decode_in_child(attacks[kind])
  assert output.startswith(f'bad {described} would allocate about '), output  # ... refused, with the reason
  assert f'more than data.max_decode_bytes={BUDGET}; raise data.max_decode_bytes' in output
  estimate = int(output.split('about ')[1].split()[0])
  assert estimate > 2 * 10**9  # the memory the unguarded decode takes: 2.1 GB, 9 GB, 10.3 GB
  assert peak_rss < CHILD_RSS_LIMIT, f'{peak_rss / 2**20:.0f} MiB'
  with pytest.raises(BadImageError, match='data.max_decode_bytes') as caught:  # the same in-process
    decode_image(attacks[kind], MAX_PIXELS)
  assert caught.value.path == str(attacks[kind]) and '\n' not in str(caught.value)


def test_a_progressive_jpeg_is_charged_its_full_size_coefficients_whatever_the_draft():
  data = image_files.encode(image_files.photo(480, 640), 'JPEG', quality=90, progressive=True)
  baseline = image_files.encode(image_files.photo(480, 640), 'JPEG', quality=90)
  assert decode_image(data, MAX_PIXELS).shape == (480, 640, 3)
  # 640x480 4:2:0: coefficients 2 x 1.5 x 307,200 = 921,600 bytes, which 1/8 scale does not reduce.
  with pytest.raises(BadImageError, match=r'would allocate about \d+ bytes, more than data.max_decode_bytes'):
    decode_image(data, MAX_PIXELS, max_decode_bytes=900_000)
  assert decode_image(baseline, MAX_PIXELS, max_decode_bytes=900_000).shape == (240, 320, 3)


def test_a_baseline_jpeg_over_the_budget_or_max_pixels_is_decoded_reduced(tmp_path):
  jpeg = image_files.encode(image_files.halves(480, 640), 'JPEG', quality=90)  # 307,200 pixels, ~3 MB
  full = decode_image(jpeg, MAX_PIXELS)
  assert full.shape == (480, 640, 3)
  assert decode_image(jpeg, MAX_PIXELS, max_decode_bytes=1_000_000).shape == (240, 320, 3)
  assert decode_image(jpeg, MAX_PIXELS, max_decode_bytes=200_000).shape == (120, 160, 3)
  assert decode_image(jpeg, 100_000).shape == (240, 320, 3)  # max_pixels: as before
  with pytest.raises(BadImageError, match='data.max_decode_bytes=1000; .*even 1/8 scale is larger'):
    decode_image(jpeg, MAX_PIXELS, max_decode_bytes=1_000)
  path = tmp_path / 'large.jpg'  # a real large JPEG above max_pixels decodes reduced in a small process
  path.write_bytes(image_files.encode(image_files.halves(3000, 4000), 'JPEG', quality=90))
  output, peak_rss = decode_in_child(path, max_pixels=1_000_000)
  assert output == 'decoded (750, 1000, 3)' and peak_rss < CHILD_RSS_LIMIT


def test_images_within_the_budget_decode_unchanged(tmp_path):
  zoo = image_files.write_zoo(tmp_path)
  for kind in image_files.GOOD_KINDS:
    np.testing.assert_array_equal(
      decode_image(zoo[kind], MAX_PIXELS), decode_image(zoo[kind], MAX_PIXELS, max_decode_bytes=2**62)
    )
  rgba = np.random.default_rng(0).integers(0, 256, (1500, 1000, 4), dtype=np.uint8)  # several row blocks
  alpha = rgba[..., 3:].astype(np.uint32)
  expected = (rgba[..., :3] * alpha + 255 * (255 - alpha) + 127) // 255
  np.testing.assert_array_equal(decode_image(image_files.encode(rgba, 'PNG'), MAX_PIXELS), expected)


def test_the_budget_estimates_what_a_decode_takes():
  png = image_files.encode(np.zeros((100, 100, 3), np.uint8), 'PNG')
  assert decode_image(png, MAX_PIXELS, max_decode_bytes=100_000).shape == (100, 100, 3)  # 10 B/px
  with pytest.raises(BadImageError, match=r'decoding 100x100 \(PNG RGB\) would allocate about 100000 bytes'):
    decode_image(png, MAX_PIXELS, max_decode_bytes=99_999)


def test_max_decode_bytes_is_a_checked_config_field():
  assert common.data_config().max_decode_bytes == 1 << 30 == BUDGET
  for bad in (0, -5):
    config = common.base_config('T', (32, 32))
    config.data.source = 'synthetic'
    config.data.max_decode_bytes = bad
    with pytest.raises(config_lib.ConfigError, match='data.max_decode_bytes'):
      config_lib.resolve(config)
