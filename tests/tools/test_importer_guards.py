"""The PyTorch importer refuses, before allocating, checkpoints that would exhaust memory."""

import os
import pathlib
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest

from atlas_jax.tools.torch_checkpoint import (
  CheckpointFormatError,
  CheckpointTooLargeError,
  load_torch_checkpoint,
)
from tests.tools.torch_writer import (
  RawMember,
  StridedTensor,
  torch_pickle,
  write_raw_zip,
  write_torch_checkpoint,
)

ROOT = pathlib.Path(__file__).parents[2]
FIXTURES = ROOT / 'tests' / 'fixtures'
TRAINER_CKPT = FIXTURES / 'atlas_tiny_512_trainer.ckpt'
TINY = [
  '--config=configs/atlas_t_512.py',
  '--config.model.dim=32',
  '--config.model.num_heads=2',
  '--config.model.stem_width=8',
  '--config.model.depths=(1,1)',
  '--config.model.num_classes=10',
]
GiB = 1 << 30


def _zeros_deflated(nbytes: int) -> bytes:
  """Raw deflate data of ``nbytes`` zeros, about 1000 times smaller, without compressing them all."""
  mib = 1 << 20
  assert nbytes % mib == 0
  compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
  block = compressor.compress(bytes(mib)) + compressor.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, no history
  return block * (nbytes // mib) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # final empty block


def write_zip_bomb(path, nbytes: int = 3 * GiB, valid_crc: bool = False) -> None:
  """A checkpoint whose one float32 storage is ``nbytes`` of zeros, deflated to ~nbytes / 1000.

  The CRC is left 0 unless ``valid_crc`` (computing it takes a while for gigabytes).
  """
  numel = nbytes // 4
  tensor = StridedTensor(np.zeros(1, np.float32), 0, (numel,), (1,), numel=numel)
  data_pkl, _ = torch_pickle({'model': {'w': tensor}})
  payload = _zeros_deflated(nbytes)
  crc = 0
  if valid_crc:
    for _ in range(nbytes >> 20):
      crc = zlib.crc32(bytes(1 << 20), crc)
  write_raw_zip(
    path,
    [
      RawMember('bomb/data.pkl', data_pkl),
      RawMember('bomb/byteorder', b'little'),
      RawMember('bomb/data/0', payload, file_size=nbytes, deflated=True, crc=crc),
    ],
  )


def rewrite_with_flag(source, path, record_suffix: str, flag_bits: int) -> None:
  """``source`` rewritten record by record (stored), with ``flag_bits`` on the record ending in the suffix."""
  with zipfile.ZipFile(source) as archive:
    members = [
      RawMember(name, archive.read(name), flag_bits=flag_bits if name.endswith(record_suffix) else 0)
      for name in archive.namelist()
    ]
  write_raw_zip(path, members)


# --- the reader -------------------------------------------------------------------------------


def test_declared_size_over_the_cap_is_refused_before_reading(tmp_path):
  path = tmp_path / 'bomb.pt'
  write_zip_bomb(path, 64 << 20, valid_crc=True)
  assert path.stat().st_size < 200_000
  with pytest.raises(CheckpointTooLargeError, match=r'record bomb/data/0 \(declared size\) needs 67,108,864'):
    load_torch_checkpoint(path, max_bytes=16 << 20)
  assert load_torch_checkpoint(path)['model']['w'].shape == (16 << 20,)  # None: the caller lifts the cap


def test_the_cap_counts_every_record_together(tmp_path):
  path = tmp_path / 'two.pt'
  write_torch_checkpoint(path, {'a': np.zeros(1000, np.float32), 'b': np.zeros(1000, np.float32)})
  assert set(load_torch_checkpoint(path, max_bytes=9000)) == {'a', 'b'}
  with pytest.raises(CheckpointTooLargeError, match='data/1'):
    load_torch_checkpoint(path, max_bytes=7000)


def test_views_sharing_a_storage_count_against_the_tensor_cap(tmp_path):
  storage = np.zeros(1000, np.float32)
  path = tmp_path / 'shared.pt'
  write_torch_checkpoint(path, {f'v{i}': StridedTensor(storage, 0, (1000,), (1,)) for i in range(10)})
  assert len(load_torch_checkpoint(path, max_bytes=40_000)) == 10
  with pytest.raises(CheckpointTooLargeError, match='tensors built'):
    load_torch_checkpoint(path, max_bytes=20_000)


@pytest.mark.parametrize(
  'shape, stride',
  [
    ((60000, 60000), (0, 0)),  # 13.4 GiB from 4 bytes
    ((3, 2), (1, 0)),  # expand()
    ((4, 4), (1, 1)),  # sliding window: rows overlap
    ((2, 3), (2, 1)),  # rows overlap by one element
  ],
)
def test_views_whose_elements_overlap_are_refused(tmp_path, shape, stride):
  path = tmp_path / 'overlap.pt'
  write_torch_checkpoint(path, {'w': StridedTensor(np.arange(24, dtype=np.float32), 0, shape, stride)})
  with pytest.raises(CheckpointFormatError, match='not a plain view of its storage') as error:
    load_torch_checkpoint(path)
  assert '\n' not in str(error.value)


def test_non_overlapping_views_are_read(tmp_path):
  storage = np.arange(24, dtype=np.float32)
  views = {
    'gapped': StridedTensor(storage, 1, (2, 3), (12, 2)),
    'size_one_dims_may_have_any_stride': StridedTensor(storage, 5, (1, 3, 1), (0, 1, 0)),
    'permuted': StridedTensor(storage, 0, (2, 3, 4), (1, 8, 2)),
  }
  path = tmp_path / 'views.pt'
  write_torch_checkpoint(path, views)
  loaded = load_torch_checkpoint(path, max_bytes=10_000)
  np.testing.assert_array_equal(loaded['gapped'], [[1, 3, 5], [13, 15, 17]])
  np.testing.assert_array_equal(loaded['size_one_dims_may_have_any_stride'], [[[5], [6], [7]]])
  expected = np.lib.stride_tricks.as_strided(storage, (2, 3, 4), (4, 32, 8))
  np.testing.assert_array_equal(loaded['permuted'], expected)


def test_view_past_the_end_of_its_storage_is_refused(tmp_path):
  path = tmp_path / 'past.pt'
  write_torch_checkpoint(path, {'w': StridedTensor(np.zeros(1, np.float32), 0, (60000, 60000), (60000, 1))})
  with pytest.raises(
    CheckpointFormatError, match='reaches element 3599999999 of storage data/0, which holds 1'
  ):
    load_torch_checkpoint(path)


def test_encrypted_record_is_refused(tmp_path):
  source, path = tmp_path / 'plain.pt', tmp_path / 'encrypted.pt'
  write_torch_checkpoint(source, {'w': np.ones(3, np.float32)})
  rewrite_with_flag(source, path, '/data/0', 0x1)
  with pytest.raises(CheckpointFormatError, match='data/0 is encrypted'):
    load_torch_checkpoint(path)
  rewrite_with_flag(source, path, '/data.pkl', 0x1)
  with pytest.raises(CheckpointFormatError, match='data.pkl is encrypted'):
    load_torch_checkpoint(path)


def test_directory_is_a_format_error(tmp_path):
  with pytest.raises(CheckpointFormatError, match='is a directory'):
    load_torch_checkpoint(tmp_path)


# --- the command line -------------------------------------------------------------------------


# The child's own peak RSS: /proc's VmHWM belongs to the memory map the exec created. ru_maxrss from wait4
# would also count the pages the child shared with this (possibly large) pytest worker before its exec.
_MEASURED = (
  'import atexit, runpy, sys\n'
  'rss_path = sys.argv[1]\n'
  'def _record():\n'
  '  with open("/proc/self/status") as status, open(rss_path, "w") as out:\n'
  '    out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))\n'
  'atexit.register(_record)\n'
  'sys.argv = [sys.argv[2]] + sys.argv[3:]\n'
  'runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)\n'
)


def _run_all(runs):
  """Start every (checkpoint, output, *flags) at once; (exit code, output text, peak RSS bytes) each."""
  started = []
  for checkpoint, output, *extra in runs:
    log = pathlib.Path(f'{output}.log')
    rss = pathlib.Path(f'{output}.rss')
    with open(log, 'w') as stream:
      process = subprocess.Popen(
        [
          sys.executable,
          '-c',
          _MEASURED,
          str(rss),
          'atlas_jax.tools.convert_torch',
          f'--checkpoint={checkpoint}',
          f'--output={output}',
          *TINY,
          *extra,
        ],
        cwd=ROOT,
        stdout=stream,
        stderr=subprocess.STDOUT,
        env={**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'},
      )
    started.append((process, log, rss))
  results = []
  for process, log, rss in started:
    process.wait()
    results.append((process.returncode, log.read_text(), int(rss.read_text()) * 1024))  # VmHWM is in kB
  return results


def test_hostile_checkpoints_are_refused_on_one_line_in_bounded_memory(tmp_path):
  write_zip_bomb(tmp_path / 'bomb.pt')
  write_torch_checkpoint(
    tmp_path / 'zero_stride.pt', {'w': StridedTensor(np.zeros(1, np.float32), 0, (60000, 60000), (0, 0))}
  )
  write_torch_checkpoint(
    tmp_path / 'past_end.pt', {'w': StridedTensor(np.zeros(1, np.float32), 0, (60000, 60000), (60000, 1))}
  )
  rewrite_with_flag(TRAINER_CKPT, tmp_path / 'encrypted.pt', '/data/0', 0x1)
  (tmp_path / 'a_directory').mkdir()
  cases = {
    'bomb.pt': 'declared size',
    'zero_stride.pt': 'not a plain view of its storage',
    'past_end.pt': 'reaches element 3599999999',
    'encrypted.pt': 'is encrypted',
    'a_directory': 'is not a file',
  }
  assert (tmp_path / 'bomb.pt').stat().st_size < 4 << 20
  results = _run_all([(tmp_path / name, tmp_path / f'out_{name}') for name in cases])
  for (name, message), (code, text, peak_rss) in zip(cases.items(), results):
    errors = [line for line in text.splitlines() if line.startswith('error:')]
    assert code == 1 and len(errors) == 1 and message in errors[0], (name, text)
    assert 'Traceback' not in text, (name, text)
    assert not (tmp_path / f'out_{name}').exists(), name
    assert peak_rss < 2 * GiB, (name, peak_rss)


def test_max_bytes_raises_the_default_cap(tmp_path):
  # The tiny model's default cap is 4 x its ~0.6 MB of float32 variables + 16 MiB; 24 MiB of ballast
  # outside the state dict takes a legitimate checkpoint past it.
  trainer = load_torch_checkpoint(TRAINER_CKPT)
  trainer['ballast'] = np.zeros(6 << 20, np.float32)
  write_torch_checkpoint(tmp_path / 'big.ckpt', trainer)
  refused, accepted = _run_all(
    [
      (tmp_path / 'big.ckpt', tmp_path / 'refused'),
      (tmp_path / 'big.ckpt', tmp_path / 'accepted', f'--max_bytes={64 << 20}'),
    ]
  )
  errors = [line for line in refused[1].splitlines() if line.startswith('error:')]
  assert refused[0] == 1 and len(errors) == 1 and 'the default cap for this model' in errors[0], refused[1]
  assert '--max_bytes' in errors[0] and not (tmp_path / 'refused').exists()
  assert accepted[0] == 0, accepted[1]
  assert (tmp_path / 'accepted' / 'checkpoints' / '0').exists()
