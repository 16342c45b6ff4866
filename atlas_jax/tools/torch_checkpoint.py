"""Read checkpoints written by ``torch.save`` into numpy arrays, safely and without torch.

``torch.save`` writes a zip archive whose single top-level folder (its name varies) holds
``data.pkl`` (a protocol-2 pickle of the saved object), ``data/<key>`` (the raw bytes of each
tensor storage) and usually ``byteorder``. Inside the pickle a tensor is a call to a rebuild
function from ``torch._utils`` whose first argument is a persistent id naming its storage.

A pickle can name and call any importable function, so the unpickler here admits only a short
allow-list of globals, and for each admitted name it hands back a stand-in of its own (never the
real torch object): tensor rebuilders that return numpy arrays, markers for storage classes and
dtypes, safe containers, and a dict in place of ``easydict.EasyDict``. Any other global is refused
inside ``find_class``, before the pickle gets the chance to call anything.

Nothing large is allocated before it is checked: each tensor must be a non-overlapping strided
window inside its storage (so it never holds more elements than the storage), encrypted zip records
are refused, and with ``max_bytes`` the bytes decompressed from the archive (declared sizes checked
before reading, actual sizes counted while reading in chunks) and the bytes of the tensors built are
each capped.

Public API: :func:`load_torch_checkpoint`, :func:`load_state_dict`,
:class:`UnsafeCheckpointError`, :class:`CheckpointFormatError`, :class:`CheckpointTooLargeError`.
"""

from __future__ import annotations

import collections
import contextvars
import io
import os
import pickle
import sys
from typing import Any
import zipfile
import zlib

import numpy as np
from numpy.lib.stride_tricks import as_strided

from atlas_jax.errors import AtlasError

try:  # optional: keeps bfloat16 tensors bfloat16 instead of widening them to float32
  import ml_dtypes

  _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:
  _BFLOAT16 = None

__all__ = [
  'CheckpointFormatError',
  'CheckpointTooLargeError',
  'UnsafeCheckpointError',
  'load_state_dict',
  'load_torch_checkpoint',
]


class UnsafeCheckpointError(AtlasError, ValueError):
  """The checkpoint's pickle names a global outside the allow-list, so it is not loaded."""


class CheckpointFormatError(AtlasError, ValueError):
  """The file is not a readable ``torch.save`` zip checkpoint."""


class CheckpointTooLargeError(CheckpointFormatError):
  """Reading the checkpoint would take more than the ``max_bytes`` allowed; refused before allocating."""


# Records are decompressed this many bytes at a time, so an archive claiming less than it holds stops early.
_READ_CHUNK_BYTES = 1 << 20


class _Budget:
  """Counts bytes against ``max_bytes`` (None: no cap) and refuses the first request that would pass it."""

  def __init__(self, max_bytes: int | None, what: str):
    self.max_bytes = max_bytes
    self.what = what
    self.used = 0

  def take(self, nbytes: int, item: str, charge: bool = True) -> None:
    """Charge ``nbytes`` for ``item``; with ``charge=False`` only check that they would fit."""
    if self.max_bytes is not None and self.used + nbytes > self.max_bytes:
      raise CheckpointTooLargeError(
        f'{item} needs {nbytes:,} bytes, which takes the {self.what} past the limit of '
        f'{self.max_bytes:,} bytes (max_bytes; {self.used:,} bytes used before it)'
      )
    if charge:
      self.used += nbytes


# The budget for the tensors being built, set while load_torch_checkpoint unpickles.
_TENSOR_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
  '_TENSOR_BUDGET', default=None
)


def _read_record(archive: zipfile.ZipFile, name: str, budget: _Budget) -> bytes:
  """One archive record, refused if encrypted or if its declared or actual size passes the budget.

  Raises KeyError if the record is missing.
  """
  info = archive.getinfo(name)
  if info.flag_bits & 0x1:
    raise CheckpointFormatError(
      f'record {_printable(name)} is encrypted; torch.save never writes encrypted records'
    )
  record = f'record {_printable(name)}'
  budget.take(info.file_size, f'{record} (declared size)', charge=False)  # charged below as read
  chunks = []
  with archive.open(info) as member:
    while chunk := member.read(_READ_CHUNK_BYTES):
      budget.take(len(chunk), f'{record} (decompressed so far)')
      chunks.append(chunk)
  return b''.join(chunks)


class _Refusal(Exception):
  """Raised deep inside unpickling; the loader turns it into an UnsafeCheckpointError with the path."""


# ---------------------------------------------------------------------------------------------
# Element types
# ---------------------------------------------------------------------------------------------

# torch dtype name -> numpy dtype of the decoded values. bfloat16 is absent when ml_dtypes is
# missing; such storages are decoded from their 16-bit patterns into float32 instead.
_NUMPY_DTYPE_BY_TORCH_NAME = {
  'float64': np.dtype(np.float64),
  'float32': np.dtype(np.float32),
  'float16': np.dtype(np.float16),
  'int64': np.dtype(np.int64),
  'int32': np.dtype(np.int32),
  'int16': np.dtype(np.int16),
  'int8': np.dtype(np.int8),
  'uint64': np.dtype(np.uint64),
  'uint32': np.dtype(np.uint32),
  'uint16': np.dtype(np.uint16),
  'uint8': np.dtype(np.uint8),
  'bool': np.dtype(np.bool_),
  'complex64': np.dtype(np.complex64),
  'complex128': np.dtype(np.complex128),
}
if _BFLOAT16 is not None:
  _NUMPY_DTYPE_BY_TORCH_NAME['bfloat16'] = _BFLOAT16
_TORCH_DTYPE_NAMES = sorted(set(_NUMPY_DTYPE_BY_TORCH_NAME) | {'bfloat16'})

# Legacy typed storage classes, which torch still names in the persistent ids it writes.
_TORCH_DTYPE_NAME_BY_STORAGE_CLASS = {
  'DoubleStorage': 'float64',
  'FloatStorage': 'float32',
  'HalfStorage': 'float16',
  'BFloat16Storage': 'bfloat16',
  'LongStorage': 'int64',
  'IntStorage': 'int32',
  'ShortStorage': 'int16',
  'CharStorage': 'int8',
  'ByteStorage': 'uint8',
  'BoolStorage': 'bool',
  'ComplexFloatStorage': 'complex64',
  'ComplexDoubleStorage': 'complex128',
}


def _stored_itemsize(torch_dtype: str | None) -> int:
  """Bytes per element in the file; untyped storages count bytes."""
  if torch_dtype is None:
    return 1
  return 2 if torch_dtype == 'bfloat16' else _NUMPY_DTYPE_BY_TORCH_NAME[torch_dtype].itemsize


def _decode_elements(raw: bytes, torch_dtype: str, file_byteorder: str) -> np.ndarray:
  """Turn a storage's raw bytes into a 1-D array of native-endian values (not to be modified)."""
  value_dtype = _NUMPY_DTYPE_BY_TORCH_NAME.get(torch_dtype)
  read_dtype = np.dtype(np.uint16) if value_dtype is None else value_dtype  # bfloat16 fallback
  count = len(raw) // read_dtype.itemsize
  elements = np.frombuffer(raw, dtype=read_dtype, count=count)
  # Swap each scalar component (a complex value is two floats), not each whole element.
  component_size = read_dtype.itemsize // 2 if read_dtype.kind == 'c' else read_dtype.itemsize
  if file_byteorder != sys.byteorder and component_size > 1:
    elements = elements.view(f'u{component_size}').byteswap().view(read_dtype)
  if value_dtype is None:  # bfloat16 is the top half of a float32
    elements = (elements.astype(np.uint32) << 16).view(np.float32)
  return elements


# ---------------------------------------------------------------------------------------------
# Stand-ins handed to the unpickler in place of torch's objects
# ---------------------------------------------------------------------------------------------


class _ReadOnly:
  """Base of the stand-ins: no ``__dict__`` and no setattr, so a pickle's BUILD cannot alter them."""

  __slots__ = ()

  def __setattr__(self, name: str, value: Any) -> None:
    raise TypeError(f'cannot set {name!r} on {type(self).__name__}')

  def __delattr__(self, name: str) -> None:
    raise TypeError(f'cannot delete {name!r} on {type(self).__name__}')

  def _init_slots(self, **values: Any) -> None:
    for name, value in values.items():
      object.__setattr__(self, name, value)


class _TorchDtype(_ReadOnly):
  """What ``torch.<dtype>`` unpickles to; a numpy dtype once loading is finished."""

  __slots__ = ('name',)

  def __init__(self, name: str):
    self._init_slots(name=name)

  def as_numpy(self) -> np.dtype:
    return _NUMPY_DTYPE_BY_TORCH_NAME.get(self.name, np.dtype(np.float32))


class _StorageClass(_ReadOnly):
  """What ``torch.FloatStorage`` etc. unpickle to; ``dtype_name`` is None for untyped storage."""

  __slots__ = ('name', 'dtype_name')

  def __init__(self, name: str, dtype_name: str | None):
    self._init_slots(name=name, dtype_name=dtype_name)


class _Storage(_ReadOnly):
  """One storage's bytes, decoded on demand per dtype (a storage may back several tensors)."""

  __slots__ = ('key', 'raw', 'dtype_name', 'byteorder', '_decoded')

  def __init__(self, key: str, raw: bytes, dtype_name: str | None, byteorder: str):
    self._init_slots(key=key, raw=raw, dtype_name=dtype_name, byteorder=byteorder, _decoded={})

  def elements(self, dtype_name: str | None = None) -> np.ndarray:
    dtype_name = dtype_name or self.dtype_name or 'uint8'
    if dtype_name not in self._decoded:
      self._decoded[dtype_name] = _decode_elements(self.raw, dtype_name, self.byteorder)
    return self._decoded[dtype_name]


class _AllowedFunction(_ReadOnly):
  """A callable the pickle may name; wraps our own function under the name the pickle uses."""

  __slots__ = ('qualified_name', 'function')

  def __init__(self, qualified_name: str, function: Any):
    self._init_slots(qualified_name=qualified_name, function=function)

  def __call__(self, *args: Any) -> Any:
    return self.function(*args)

  def __repr__(self) -> str:
    return f'<allowed {self.qualified_name}>'


class _ReadOnlyType(type):
  """Metaclass that stops a pickle from setting attributes on the EasyDict stand-in class."""

  def __setattr__(cls, name: str, value: Any) -> None:
    raise TypeError(f'cannot set {name!r} on {cls.__name__}')

  def __delattr__(cls, name: str) -> None:
    raise TypeError(f'cannot delete {name!r} on {cls.__name__}')


class _EasyDictStandIn(dict, metaclass=_ReadOnlyType):
  """Takes ``easydict.EasyDict``'s place while unpickling; replaced by a plain dict afterwards."""

  __slots__ = ()  # no __dict__, so BUILD must come through __setstate__

  def __setstate__(self, state: Any) -> None:
    # EasyDict mirrors every item as an attribute, so its pickled attribute state repeats the
    # items; fold it in as items. Protocol 2 may pair it with slot state: (dict_state, slots).
    parts = state if isinstance(state, tuple) else (state,)
    for part in parts:
      if part is None:
        continue
      if not isinstance(part, dict):
        raise CheckpointFormatError(f'EasyDict state is a {type(part).__name__}, not a dict')
      self.update(part)


# ---------------------------------------------------------------------------------------------
# Functions the pickle may call
# ---------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_view(storage: Any, offset: Any, size: Any, stride: Any) -> None:
  """Refuse views that are malformed or reach outside their storage (as_strided would not check)."""
  if not isinstance(storage, _Storage):
    raise CheckpointFormatError(f'tensor storage is a {type(storage).__name__}, not a storage')
  shape_ok = isinstance(size, tuple) and all(_is_int(n) and n >= 0 for n in size)
  stride_ok = isinstance(stride, tuple) and all(_is_int(s) and s >= 0 for s in stride)
  if not (shape_ok and stride_ok and len(size) == len(stride) and _is_int(offset) and offset >= 0):
    raise CheckpointFormatError(f'malformed tensor view: offset {offset!r}, size {size!r}, stride {stride!r}')
  # A plain view: taking the dimensions of size > 1 by increasing stride, each stride must step past
  # every element the smaller ones reach, so no two indices share an element (contiguous tensors,
  # transposes and slices pass; zero strides, as from expand(), and overlapping windows do not).
  span = 1
  for stride_n, size_n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
    if stride_n < span:
      raise CheckpointFormatError(
        f'tensor of size {size} with stride {stride} is not a plain view of its storage: its elements '
        'overlap (a zero or overlapping stride); only non-overlapping strided views are read'
      )
    span += (size_n - 1) * stride_n


def _tensor_from_storage(
  storage: Any, offset: Any, size: Any, stride: Any, dtype_name: str | None, budget: _Budget | None = None
) -> np.ndarray:
  """A contiguous, writable copy of the strided view ``storage[offset :: stride]`` of ``size``."""
  size, stride = tuple(size), tuple(stride)  # torch.Size arrives as a tuple already
  _check_view(storage, offset, size, stride)
  elements = storage.elements(dtype_name)
  if 0 in size:
    return np.zeros(size, dtype=elements.dtype)
  last_index = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last_index >= len(elements):
    raise CheckpointFormatError(
      f'tensor of size {size} (offset {offset}, stride {stride}) reaches element '
      f'{last_index} of storage data/{storage.key}, which holds {len(elements)}'
    )
  itemsize = elements.dtype.itemsize
  budget = _TENSOR_BUDGET.get() if budget is None else budget
  if budget is not None:
    budget.take(int(np.prod(size, dtype=object)) * itemsize, f'tensor of size {size} on data/{storage.key}')
  view = as_strided(elements[offset:], shape=size, strides=[s * itemsize for s in stride], writeable=False)
  return np.array(view, order='C', copy=True)


def _rebuild_tensor(storage, storage_offset, size, stride, *_requires_grad_hooks_metadata):
  """``_rebuild_tensor`` and ``_rebuild_tensor_v2``: the storage knows the dtype."""
  return _tensor_from_storage(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, _requires_grad, _hooks, dtype, *_metadata):
  """``_rebuild_tensor_v3``: an untyped storage plus an explicit dtype (newer dtypes, e.g. uint32)."""
  if not isinstance(dtype, _TorchDtype):
    raise CheckpointFormatError(f'tensor dtype is a {type(dtype).__name__}, not a torch dtype')
  return _tensor_from_storage(storage, storage_offset, size, stride, dtype.name)


def _rebuild_parameter(data, *_requires_grad_hooks_state):
  """``_rebuild_parameter(_with_state)``: a parameter is just its tensor here."""
  if not isinstance(data, np.ndarray):
    raise CheckpointFormatError(f'parameter data is a {type(data).__name__}, not a tensor')
  return data


def _bytes_from_latin1(text, encoding):
  """``_codecs.encode``, which protocol 2 uses to pickle bytes; only the latin-1 form is accepted."""
  if not (isinstance(text, str) and encoding in ('latin1', 'latin-1')):
    raise _Refusal(f'_codecs.encode applied to {type(text).__name__} with encoding {encoding!r}')
  return text.encode('latin1')


def _empty_bytes(*args):
  """``builtins.bytes``, which protocol 2 calls with no argument to pickle ``b''``."""
  if args:
    raise _Refusal('builtins.bytes called with arguments')
  return b''


# Classes that copyreg may rebuild: only ones whose construction runs no code from the file.
_REBUILDABLE_CLASSES = (collections.OrderedDict, _EasyDictStandIn, dict)
_NEWOBJ_CLASSES = _REBUILDABLE_CLASSES + (list, set, frozenset, tuple, complex)


def _class_name(cls: Any) -> str:
  return 'easydict.EasyDict' if cls is _EasyDictStandIn else getattr(cls, '__name__', type(cls).__name__)


def _copyreg_reconstructor(cls, base, state):
  """``copyreg._reconstructor`` (protocols 0 and 1), limited to dict-like allowed classes."""
  if cls not in _REBUILDABLE_CLASSES or base is not dict:
    raise _Refusal(f'copyreg._reconstructor applied to {_class_name(cls)} (base {_class_name(base)})')
  instance = cls()
  if state is not None:
    instance.update(state)
  return instance


def _copyreg_newobj(cls, *args):
  """``copyreg.__newobj__``, limited to the allowed containers."""
  if cls not in _NEWOBJ_CLASSES:
    raise _Refusal(f'copyreg.__newobj__ applied to {_class_name(cls)}')
  return cls.__new__(cls, *args)


def _build_allowed_globals() -> dict[tuple[str, str], Any]:
  """(module, name) -> what the unpickler gets for it. Anything missing here is refused."""
  allowed: dict[tuple[str, str], Any] = {}
  for name, function in [
    ('_rebuild_tensor', _rebuild_tensor),
    ('_rebuild_tensor_v2', _rebuild_tensor),
    ('_rebuild_tensor_v3', _rebuild_tensor_v3),
    ('_rebuild_parameter', _rebuild_parameter),
    ('_rebuild_parameter_with_state', _rebuild_parameter),
  ]:
    allowed['torch._utils', name] = _AllowedFunction(f'torch._utils.{name}', function)
  for class_name, dtype_name in _TORCH_DTYPE_NAME_BY_STORAGE_CLASS.items():
    allowed['torch', class_name] = _StorageClass(class_name, dtype_name)
  for module in ('torch', 'torch.storage'):
    allowed[module, 'UntypedStorage'] = _StorageClass('UntypedStorage', None)
  for dtype_name in _TORCH_DTYPE_NAMES:
    allowed['torch', dtype_name] = _TorchDtype(dtype_name)
  allowed['torch', 'Size'] = tuple
  allowed['collections', 'OrderedDict'] = collections.OrderedDict
  allowed['easydict', 'EasyDict'] = _EasyDictStandIn
  for container in (dict, list, tuple, set, frozenset, complex):
    allowed['builtins', container.__name__] = container
  allowed['builtins', 'bytes'] = _AllowedFunction('builtins.bytes', _empty_bytes)
  allowed['_codecs', 'encode'] = _AllowedFunction('_codecs.encode', _bytes_from_latin1)
  allowed['copyreg', '_reconstructor'] = _AllowedFunction('copyreg._reconstructor', _copyreg_reconstructor)
  allowed['copyreg', '__newobj__'] = _AllowedFunction('copyreg.__newobj__', _copyreg_newobj)
  return allowed


_ALLOWED_GLOBALS = _build_allowed_globals()
# Python 3 writes protocol-2 pickles with Python 2 module names for these.
_PYTHON2_MODULE_NAMES = {'__builtin__': 'builtins', 'copy_reg': 'copyreg'}


# ---------------------------------------------------------------------------------------------
# Unpickling
# ---------------------------------------------------------------------------------------------


def _printable(text: str, limit: int = 200) -> str:
  """Keep names from the file on one short line in error messages."""
  text = text if text.isprintable() else ascii(text)[1:-1]
  return text if len(text) <= limit else text[:limit] + '...'


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves globals only through the allow-list and storages only from the archive."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, budget: _Budget):
    super().__init__(file)
    self._archive = archive
    self._budget = budget
    self._prefix = prefix
    self._byteorder = byteorder
    self._storages: dict[str, _Storage] = {}

  def find_class(self, module: str, name: str) -> Any:
    key = (_PYTHON2_MODULE_NAMES.get(module, module), name)
    if key not in _ALLOWED_GLOBALS:
      raise _Refusal(f'{_printable(module)}.{_printable(name)}')
    return _ALLOWED_GLOBALS[key]

  def persistent_load(self, pid: Any) -> _Storage:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise CheckpointFormatError(f'unknown persistent id {_printable(repr(pid), 80)}')
    _, storage_class, key, _location, numel = pid
    if not (isinstance(storage_class, _StorageClass) and isinstance(key, str) and _is_int(numel)):
      raise CheckpointFormatError(f'malformed storage reference {_printable(repr(pid), 80)}')
    if key not in self._storages:  # views share storages: read each one once
      self._storages[key] = self._read_storage(key, storage_class, numel)
    return self._storages[key]

  def _read_storage(self, key: str, storage_class: _StorageClass, numel: int) -> _Storage:
    record = f'{self._prefix}data/{key}'
    try:
      raw = _read_record(self._archive, record, self._budget)
    except KeyError:
      raise CheckpointFormatError(f'storage record {_printable(record)} is missing') from None
    dtype_name = storage_class.dtype_name
    itemsize = _stored_itemsize(dtype_name)
    if numel < 0 or len(raw) < numel * itemsize:
      raise CheckpointFormatError(
        f'storage record {_printable(record)} holds {len(raw)} bytes, '
        f'fewer than {numel} elements of {storage_class.name}'
      )
    return _Storage(key, memoryview(raw)[: numel * itemsize], dtype_name, self._byteorder)  # no copy


def _plain_values(value: Any, done: dict[int, Any]) -> Any:
  """Replace the stand-ins in the loaded tree: EasyDicts by dicts, dtypes and bare storages by numpy."""
  if id(value) in done:  # shared (or cyclic) references stay shared
    return done[id(value)]
  if isinstance(value, _EasyDictStandIn):
    plain: dict = {}
    done[id(value)] = plain
    for key, item in value.items():
      plain[key] = _plain_values(item, done)
    return plain
  if isinstance(value, (dict, list)):
    done[id(value)] = value
    for key in list(value.keys()) if isinstance(value, dict) else range(len(value)):
      value[key] = _plain_values(value[key], done)
    return value
  if isinstance(value, tuple):
    items = tuple(_plain_values(item, done) for item in value)
    same = all(new is old for new, old in zip(items, value))
    done[id(value)] = value if same else items
    return done[id(value)]
  if isinstance(value, _TorchDtype):
    return value.as_numpy()
  if isinstance(value, _Storage):  # a storage saved on its own: its elements
    elements = value.elements()
    budget = _TENSOR_BUDGET.get()
    if budget is not None:
      budget.take(elements.nbytes, f'storage data/{value.key}')
    done[id(value)] = elements.copy()
    return done[id(value)]
  return value


# ---------------------------------------------------------------------------------------------
# The archive
# ---------------------------------------------------------------------------------------------


def _find_archive_prefix(archive: zipfile.ZipFile) -> str:
  """The ``<folder>/`` that holds ``data.pkl``; torch puts every record under one such folder."""
  names = archive.namelist()
  pickles = [name for name in names if name.endswith('/data.pkl') and name.count('/') == 1]
  if len(pickles) != 1:
    found = 'no' if not pickles else f'{len(pickles)}'
    raise CheckpointFormatError(f'not a PyTorch checkpoint: the zip has {found} <folder>/data.pkl records')
  prefix = pickles[0][: -len('data.pkl')]
  if prefix + 'constants.pkl' in names or any(name.startswith(prefix + 'code/') for name in names):
    raise CheckpointFormatError('not a torch.save checkpoint but a TorchScript archive (torch.jit.save)')
  return prefix


def _read_byteorder(archive: zipfile.ZipFile, prefix: str, budget: _Budget) -> str:
  """Storage byte order; files without the record were written on little-endian machines."""
  try:
    byteorder = _read_record(archive, prefix + 'byteorder', budget).decode('ascii', 'replace').strip()
  except KeyError:
    return 'little'
  if byteorder not in ('little', 'big'):
    raise CheckpointFormatError(f'unknown byteorder {_printable(byteorder, 40)!r}')
  return byteorder


def _looks_like_legacy_torch_file(path: str) -> bool:
  with open(path, 'rb') as file:
    return file.read(2) == b'\x80\x02'  # a bare pickle: torch.save before PyTorch 1.6


# Errors a corrupt archive or pickle can raise while loading; all mean "cannot read this file".
_CORRUPTION_ERRORS = (
  zipfile.BadZipFile,
  zlib.error,
  EOFError,
  pickle.UnpicklingError,
  AttributeError,
  IndexError,
  KeyError,
  TypeError,
  ValueError,
  OverflowError,
  RecursionError,
  UnicodeDecodeError,
  NotImplementedError,
)


def load_torch_checkpoint(path: str | os.PathLike, max_bytes: int | None = None) -> Any:
  """Load the object saved by ``torch.save`` at ``path``; tensors come back as numpy arrays.

  Tensors become contiguous, writable numpy arrays of the same dtype and shape (bfloat16 via
  ``ml_dtypes`` when it is installed, else float32), ``easydict.EasyDict`` becomes ``dict``,
  torch dtypes become numpy dtypes; everything else is plain Python data.

  Raises UnsafeCheckpointError if the pickle names any global outside the allow-list (nothing
  from the file is called before that), CheckpointFormatError if the file is not a readable
  zip-format torch checkpoint, and OSError if it cannot be opened.

  ``max_bytes`` (None: no cap, the caller decides) caps, separately, the bytes decompressed from the
  archive and the bytes of the tensors built from them; passing it raises CheckpointTooLargeError
  before the allocation that would go past it. Views must be non-overlapping windows inside their
  storage whatever ``max_bytes`` is, so no tensor holds more elements than its storage.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise CheckpointFormatError(f'cannot read {path}: it is a directory, not a PyTorch checkpoint file')
  archive_budget = _Budget(max_bytes, 'data read from the archive')
  token = _TENSOR_BUDGET.set(_Budget(max_bytes, 'tensors built'))
  try:
    with zipfile.ZipFile(path) as archive:
      prefix = _find_archive_prefix(archive)
      byteorder = _read_byteorder(archive, prefix, archive_budget)
      pickle_file = io.BytesIO(_read_record(archive, prefix + 'data.pkl', archive_budget))
      loaded = _RestrictedUnpickler(pickle_file, archive, prefix, byteorder, archive_budget).load()
    return _plain_values(loaded, {})
  except _Refusal as refusal:
    raise UnsafeCheckpointError(
      f'refusing to load {path}: it references {refusal}, which is not a tensor, container, '
      'number or string; only load checkpoints you trust with torch itself'
    ) from None
  except CheckpointFormatError as error:
    raise type(error)(f'cannot read {path}: {error}') from None
  except zipfile.BadZipFile as error:
    if zipfile.is_zipfile(path):
      reason = f'the zip archive is corrupt ({_printable(str(error), 120)})'
    elif _looks_like_legacy_torch_file(path):
      reason = 'it uses the legacy format of torch.save before PyTorch 1.6; re-save it with a recent torch'
    else:
      reason = 'it is not a zip archive (or is a truncated one)'
    raise CheckpointFormatError(f'cannot read {path}: not a PyTorch checkpoint: {reason}') from error
  except _CORRUPTION_ERRORS as error:
    detail = _printable(f'{type(error).__name__}: {error}', 160)
    raise CheckpointFormatError(f'cannot read {path}: corrupt PyTorch checkpoint ({detail})') from error
  finally:
    _TENSOR_BUDGET.reset(token)


def _is_array_dict(value: Any) -> bool:
  return (
    isinstance(value, dict)
    and len(value) > 0
    and all(isinstance(key, str) and isinstance(item, np.ndarray) for key, item in value.items())
  )


def load_state_dict(path: str | os.PathLike, max_bytes: int | None = None) -> dict[str, np.ndarray]:
  """The model weights in a torch checkpoint, as ``{name: numpy array}``.

  Accepts the reference trainer's files (weights under ``model``), files with a ``state_dict``
  entry, and bare state dicts. Raises CheckpointFormatError naming the top-level keys otherwise.
  ``max_bytes`` is passed to :func:`load_torch_checkpoint`.
  """
  loaded = load_torch_checkpoint(path, max_bytes)
  if isinstance(loaded, dict):
    for entry in ('model', 'state_dict'):
      if _is_array_dict(loaded.get(entry)):
        return dict(loaded[entry])
    if _is_array_dict(loaded):
      return dict(loaded)
    keys = ', '.join(_printable(repr(key), 40) for key in list(loaded)[:20])
    more = f' and {len(loaded) - 20} more' if len(loaded) > 20 else ''
    found = f'top-level keys {keys}{more}' if loaded else 'an empty dict'
  else:
    found = f'a {type(loaded).__name__}'
  raise CheckpointFormatError(
    f"{os.fspath(path)} holds no state dict: expected a 'model' or 'state_dict' entry mapping "
    f'names to tensors, or such a mapping itself, but found {found}'
  )
