"""Write files in ``torch.save``'s zip format without torch, for tests.

    write_torch_checkpoint(path, {"model": {"fc.weight": np.ones((2, 3), np.float32)}, "epoch": 7})

numpy arrays become tensors exactly as torch lays them out: in ``<archive>/data.pkl`` (a protocol-2
pickle) each one is a ``torch._utils._rebuild_tensor_v2`` call whose storage is a persistent id
``('storage', torch.<Type>Storage, key, 'cpu', numel)``, and its bytes go to ``<archive>/data/<key>``
(dtypes without a legacy storage class, such as uint32, use ``_rebuild_tensor_v3`` with an untyped
storage, as torch does). Dicts, OrderedDicts, lists, tuples, str, int, float, bool and None are
written natively; anything else is pickled by the standard pickler (protocol 2), which lets a test
plant an object of any class, e.g. an EasyDict or something the reader must refuse.
``StridedTensor`` writes a view with an explicit storage offset and strides. The archive lacks
torch's 64-byte alignment padding, which readers do not need.
"""

from __future__ import annotations

import collections
import io
import os
from pathlib import Path
import pickle
import struct
from typing import Any, NamedTuple
import zipfile

import numpy as np

try:
  import ml_dtypes

  _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
  _BFLOAT16 = None

# numpy dtype -> torch's legacy storage class for it.
_STORAGE_CLASS_BY_DTYPE = {
  np.dtype(np.float64): 'DoubleStorage',
  np.dtype(np.float32): 'FloatStorage',
  np.dtype(np.float16): 'HalfStorage',
  np.dtype(np.int64): 'LongStorage',
  np.dtype(np.int32): 'IntStorage',
  np.dtype(np.int16): 'ShortStorage',
  np.dtype(np.int8): 'CharStorage',
  np.dtype(np.uint8): 'ByteStorage',
  np.dtype(np.bool_): 'BoolStorage',
  np.dtype(np.complex64): 'ComplexFloatStorage',
  np.dtype(np.complex128): 'ComplexDoubleStorage',
}
if _BFLOAT16 is not None:
  _STORAGE_CLASS_BY_DTYPE[_BFLOAT16] = 'BFloat16Storage'
# dtypes torch stores untyped, naming the dtype in the rebuild call instead.
_UNTYPED_DTYPE_NAMES = {
  np.dtype(np.uint16): 'uint16',
  np.dtype(np.uint32): 'uint32',
  np.dtype(np.uint64): 'uint64',
}


class StridedTensor(NamedTuple):
  """A tensor viewing ``storage`` (a 1-D array) from ``offset`` with ``shape`` and ``stride`` in elements.

  Written as is, without bounds checks, so tests can also write views that overrun their storage.
  ``numel``, when given, is the element count the storage reference declares instead of the real one.
  """

  storage: np.ndarray
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]
  numel: int | None = None


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
  strides, step = [], 1
  for size in reversed(shape):
    strides.append(step)
    step *= max(size, 1)
  return tuple(reversed(strides))


def _storage_bytes(array: np.ndarray, byteorder: str) -> bytes:
  """Element bytes in the file's byte order (each component of a complex value swapped alone)."""
  flat = np.ascontiguousarray(array).reshape(-1)
  component = flat.dtype.itemsize // 2 if flat.dtype.kind == 'c' else flat.dtype.itemsize
  if byteorder != 'little' and component > 1:
    flat = flat.view(f'<u{component}').byteswap()
  return flat.tobytes()


class _PickleWriter:
  """Emits protocol-2 opcodes by hand, so torch's globals can be named without importing torch.

  No memo is used; each fallback pickle fragment keeps its own memo references self-consistent.
  """

  def __init__(self, byteorder: str):
    self.byteorder = byteorder
    self.out = io.BytesIO()
    self.storages: dict[str, bytes] = {}
    # id(storage array) -> (key, array): a storage shared by views is written once; holding the
    # array keeps its id from being reused by another one
    self._storage_keys: dict[int, tuple[str, np.ndarray]] = {}

  def dump(self, obj: Any) -> bytes:
    self.out.write(b'\x80\x02')  # PROTO 2
    self.write(obj)
    self.out.write(b'.')  # STOP
    return self.out.getvalue()

  def write(self, obj: Any) -> None:
    if obj is None:
      self.out.write(b'N')
    elif isinstance(obj, bool):
      self.out.write(b'\x88' if obj else b'\x89')
    elif isinstance(obj, int):
      self._write_int(obj)
    elif isinstance(obj, float):
      self.out.write(b'G' + struct.pack('>d', obj))
    elif isinstance(obj, str):
      encoded = obj.encode('utf-8', 'surrogatepass')
      self.out.write(b'X' + struct.pack('<I', len(encoded)) + encoded)
    elif isinstance(obj, np.generic) and not isinstance(obj, np.void):
      self.write(obj.item())
    elif isinstance(obj, np.ndarray):
      self._write_tensor(StridedTensor(obj.reshape(-1), 0, obj.shape, _contiguous_strides(obj.shape)))
    elif isinstance(obj, StridedTensor):
      self._write_tensor(obj)
    elif type(obj) is collections.OrderedDict:
      self._write_global('collections', 'OrderedDict')
      self.out.write(b')R')  # OrderedDict()
      self._write_items(obj)
    elif type(obj) is dict:
      self.out.write(b'}')
      self._write_items(obj)
    elif type(obj) is list:
      self.out.write(b']')
      if obj:
        self.out.write(b'(')
        for item in obj:
          self.write(item)
        self.out.write(b'e')  # APPENDS
    elif type(obj) is tuple:
      self._write_tuple(obj)
    else:
      self._write_pickled(obj)

  def _write_int(self, value: int) -> None:
    if 0 <= value < 256:
      self.out.write(b'K' + bytes([value]))
    elif 0 <= value < 65536:
      self.out.write(b'M' + struct.pack('<H', value))
    elif -(2**31) <= value < 2**31:
      self.out.write(b'J' + struct.pack('<i', value))
    else:
      encoded = value.to_bytes((value.bit_length() + 8) // 8, 'little', signed=True)
      self.out.write(b'\x8a' + bytes([len(encoded)]) + encoded)  # LONG1

  def _write_tuple(self, items: tuple) -> None:
    if len(items) <= 3:
      for item in items:
        self.write(item)
      self.out.write([b')', b'\x85', b'\x86', b'\x87'][len(items)])
    else:
      self.out.write(b'(')
      for item in items:
        self.write(item)
      self.out.write(b't')

  def _write_items(self, mapping: dict) -> None:
    if mapping:
      self.out.write(b'(')
      for key, value in mapping.items():
        self.write(key)
        self.write(value)
      self.out.write(b'u')  # SETITEMS

  def _write_global(self, module: str, name: str) -> None:
    self.out.write(b'c' + f'{module}\n{name}\n'.encode('ascii'))

  def _write_pickled(self, obj: Any) -> None:
    fragment = pickle.dumps(obj, protocol=2)
    assert fragment[:2] == b'\x80\x02' and fragment[-1:] == b'.'
    self.out.write(fragment[2:-1])

  def _write_tensor(self, tensor: StridedTensor) -> None:
    storage = np.ascontiguousarray(tensor.storage).reshape(-1)
    untyped_dtype = _UNTYPED_DTYPE_NAMES.get(storage.dtype)
    if untyped_dtype is None and storage.dtype not in _STORAGE_CLASS_BY_DTYPE:
      raise TypeError(f'torch has no tensor dtype for numpy {storage.dtype}')
    key = self._storage_key(tensor.storage, storage)
    self._write_global(
      'torch._utils', '_rebuild_tensor_v2' if untyped_dtype is None else '_rebuild_tensor_v3'
    )
    self.out.write(b'(')
    # the storage: ('storage', <storage class>, key, location, numel) as a persistent id
    self.out.write(b'(')
    self.write('storage')
    if untyped_dtype is None:
      self._write_global('torch', _STORAGE_CLASS_BY_DTYPE[storage.dtype])
      numel = storage.size if tensor.numel is None else tensor.numel
    else:
      self._write_global('torch.storage', 'UntypedStorage')
      numel = storage.nbytes
    for item in (key, 'cpu', numel):
      self.write(item)
    self.out.write(b'tQ')  # TUPLE, BINPERSID
    self.write(int(tensor.offset))
    self.write(tuple(int(n) for n in tensor.shape))
    self.write(tuple(int(s) for s in tensor.stride))
    self.write(False)  # requires_grad
    self.write(collections.OrderedDict())  # backward hooks
    if untyped_dtype is not None:
      self._write_global('torch', untyped_dtype)
    self.out.write(b'tR')  # TUPLE, REDUCE

  def _storage_key(self, original: np.ndarray, storage: np.ndarray) -> str:
    if id(original) not in self._storage_keys:
      key = str(len(self.storages))
      self.storages[key] = _storage_bytes(storage, self.byteorder)
      self._storage_keys[id(original)] = (key, original)
    return self._storage_keys[id(original)][0]


def write_torch_archive(
  path: str | os.PathLike,
  data_pkl: bytes,
  storages: dict[str, bytes] | None = None,
  *,
  byteorder: str | None = 'little',
  archive_name: str | None = None,
) -> None:
  """Write the zip container around a ready-made ``data.pkl`` and storage records.

  ``byteorder=None`` leaves out the ``byteorder`` record, as very old torch versions did.
  """
  archive_name = archive_name or Path(path).stem
  with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as archive:
    archive.writestr(f'{archive_name}/data.pkl', data_pkl)
    archive.writestr(f'{archive_name}/.format_version', '1')
    if byteorder is not None:
      archive.writestr(f'{archive_name}/byteorder', byteorder)
    for key, raw in (storages or {}).items():
      archive.writestr(f'{archive_name}/data/{key}', raw)
    archive.writestr(f'{archive_name}/version', '3\n')


class RawMember(NamedTuple):
  """A zip record written byte for byte: ``payload`` as stored (raw deflate data when ``deflated``)."""

  name: str
  payload: bytes
  file_size: int | None = None  # the declared uncompressed size; len(payload) if None
  deflated: bool = False
  flag_bits: int = 0
  crc: int | None = None  # zlib.crc32 of the payload if None


def write_raw_zip(path: str | os.PathLike, members: list[RawMember]) -> None:
  """Write a zip archive by hand, so its headers can declare what a test wants (sizes, flags)."""
  import zlib

  local, central = io.BytesIO(), io.BytesIO()
  for member in members:
    name = member.name.encode('utf-8')
    file_size = len(member.payload) if member.file_size is None else member.file_size
    crc = zlib.crc32(member.payload) if member.crc is None else member.crc
    method = 8 if member.deflated else 0
    fields = (20, member.flag_bits, method, 0, 0x21, crc, len(member.payload), file_size, len(name))
    offset = local.tell()
    local.write(struct.pack('<IHHHHHIIIHH', 0x04034B50, *fields, 0) + name + member.payload)
    central.write(
      struct.pack('<IH', 0x02014B50, 20) + struct.pack('<HHHHHIIIHHHHHII', *fields, 0, 0, 0, 0, 0, offset)
    )
    central.write(name)
  end = struct.pack(
    '<IHHHHIIH', 0x06054B50, 0, 0, len(members), len(members), central.tell(), local.tell(), 0
  )
  Path(path).write_bytes(local.getvalue() + central.getvalue() + end)


def torch_pickle(obj: Any) -> tuple[bytes, dict[str, bytes]]:
  """``data.pkl`` and the storage records for ``obj``, as ``write_torch_checkpoint`` writes them."""
  writer = _PickleWriter('little')
  return writer.dump(obj), writer.storages


def write_torch_checkpoint(
  path: str | os.PathLike,
  obj: Any,
  *,
  byteorder: str = 'little',
  archive_name: str | None = None,
) -> None:
  """Write ``obj`` (possibly nested; numpy arrays become tensors) as ``torch.save`` would."""
  if byteorder not in ('little', 'big'):
    raise ValueError(f"byteorder must be 'little' or 'big', not {byteorder!r}")
  writer = _PickleWriter(byteorder)
  data_pkl = writer.dump(obj)
  write_torch_archive(path, data_pkl, writer.storages, byteorder=byteorder, archive_name=archive_name)
