"""Tests for atlas_jax.tools.torch_checkpoint: reading torch.save files safely, without torch."""

import collections
import importlib
import importlib.util
import os
import pathlib
import pickle
import pickletools
import sys
import types
import zipfile

import numpy as np
import pytest

from atlas_jax.tools import torch_checkpoint
from atlas_jax.tools.torch_checkpoint import (
  CheckpointFormatError,
  UnsafeCheckpointError,
  load_state_dict,
  load_torch_checkpoint,
)
from tests.tools.torch_writer import StridedTensor, write_torch_archive, write_torch_checkpoint

FIXTURES = pathlib.Path(__file__).parents[1] / 'fixtures'
TRAINER_CKPT = FIXTURES / 'atlas_tiny_512_trainer.ckpt'
STATE_DICT_PT = FIXTURES / 'atlas_tiny_512_state_dict.pt'
UNTRUSTED_CKPT = FIXTURES / 'atlas_tiny_512_untrusted.ckpt'
REFERENCE_NPZ = FIXTURES / 'atlas_tiny_512.npz'

EXPECTED_TRAINER_ARGS = {
  'main': {'exp_name': 'atlas_tiny', 'seed': 42, 'phases': {'train': True, 'dev': True}},
  'model': {'type': 'Atlas', 'kwargs': {'num_classes': 10, 'embed_dim': 32}},
  'optimizer': {'type': 'AdamW', 'kwargs': {'lr': 0.0005, 'betas': [0.9, 0.999]}},
  'dataloader': {'batch_size': 32, 'num_workers': 16},
  'note': None,
  'tags': ['atlas', 'hr-in100'],
}


@pytest.fixture(scope='module')
def reference_state_dict():
  with np.load(REFERENCE_NPZ) as npz:
    prefix = 'state_dict/'
    return {name[len(prefix) :]: npz[name] for name in npz.files if name.startswith(prefix)}


@pytest.fixture(scope='module')
def trainer_checkpoint():
  return load_torch_checkpoint(TRAINER_CKPT)


def assert_same_arrays(actual, expected):
  assert list(actual) == list(expected)
  for name, array in expected.items():
    assert actual[name].dtype == array.dtype, name
    assert actual[name].shape == array.shape, name
    np.testing.assert_array_equal(actual[name], array, err_msg=name)


def assert_only_plain_dicts(value):
  """No EasyDict (or any dict subclass) anywhere inside."""
  if isinstance(value, dict):
    assert type(value) is dict, type(value)
    for item in value.values():
      assert_only_plain_dicts(item)
  elif isinstance(value, (list, tuple)):
    for item in value:
      assert_only_plain_dicts(item)


# --- the reference fixtures -------------------------------------------------------------------


def test_trainer_checkpoint_top_level(trainer_checkpoint):
  assert list(trainer_checkpoint) == [
    'model',
    'optimizer',
    'lr_scheduler',
    'scaler',
    'epoch',
    'global_step',
    'args',
  ]
  assert trainer_checkpoint['epoch'] == 7
  assert trainer_checkpoint['global_step'] == 300
  assert trainer_checkpoint['lr_scheduler'] is None
  assert trainer_checkpoint['scaler'] == {}


def test_trainer_args_are_nested_plain_dicts(trainer_checkpoint):
  args = trainer_checkpoint['args']
  assert_only_plain_dicts(args)
  assert args == EXPECTED_TRAINER_ARGS


def test_trainer_optimizer_state_holds_arrays(trainer_checkpoint):
  optimizer = trainer_checkpoint['optimizer']
  assert set(optimizer) == {'state', 'param_groups'}
  first_state = next(iter(optimizer['state'].values()))
  assert isinstance(first_state['exp_avg'], np.ndarray)


@pytest.mark.parametrize('path', [TRAINER_CKPT, STATE_DICT_PT], ids=['trainer', 'bare_state_dict'])
def test_state_dict_equals_reference_npz(path, reference_state_dict):
  state_dict = load_state_dict(path)
  assert type(state_dict) is dict
  assert sorted(state_dict) == sorted(reference_state_dict)
  assert_same_arrays({name: state_dict[name] for name in reference_state_dict}, reference_state_dict)
  assert {str(array.dtype) for array in state_dict.values()} == {'float32', 'int64'}
  for name, array in state_dict.items():
    assert array.flags.c_contiguous and array.flags.writeable, name


def test_num_batches_tracked_is_int64_scalar():
  state_dict = load_state_dict(STATE_DICT_PT)
  counters = [array for name, array in state_dict.items() if name.endswith('num_batches_tracked')]
  assert counters
  assert all(array.shape == () and array.dtype == np.int64 for array in counters)


def test_untrusted_checkpoint_is_refused_before_anything_is_called(monkeypatch):
  calls = []

  def recording_getcwd():
    calls.append('getcwd')
    return '/nowhere'

  # the pickle names posix.getcwd (nt.getcwd on Windows); patch it there as well as in os
  monkeypatch.setattr(os, 'getcwd', recording_getcwd)
  monkeypatch.setattr(importlib.import_module(os.name), 'getcwd', recording_getcwd)
  with pytest.raises(UnsafeCheckpointError, match=r'posix\.getcwd') as refusal:
    load_torch_checkpoint(UNTRUSTED_CKPT)
  assert calls == []
  message = str(refusal.value)
  assert '\n' not in message
  assert str(UNTRUSTED_CKPT) in message
  assert isinstance(refusal.value, ValueError)
  with pytest.raises(UnsafeCheckpointError):
    load_state_dict(UNTRUSTED_CKPT)
  assert calls == []


# --- refusing other globals -------------------------------------------------------------------


def _global_call_pickle(module: str, name: str, *args_opcodes: bytes) -> bytes:
  """Protocol-2 pickle of ``module.name(*args)``."""
  return b'\x80\x02c' + f'{module}\n{name}\n'.encode() + b'(' + b''.join(args_opcodes) + b'tR.'


@pytest.mark.parametrize(
  ('module', 'name'),
  [
    ('builtins', 'eval'),
    ('__builtin__', 'eval'),
    ('builtins', 'getattr'),
    ('os', 'system'),
    ('subprocess', 'Popen'),
    ('numpy.core.multiarray', '_reconstruct'),
    ('torch', 'load'),
    ('torch._utils', '_rebuild_from_type_v2'),
    ('torch', 'device'),
    ('easydict', 'EasyDictButNotReally'),
  ],
)
def test_globals_outside_the_allow_list_are_refused(tmp_path, module, name):
  path = tmp_path / 'evil.pt'
  write_torch_archive(path, _global_call_pickle(module, name, b'X\x01\x00\x00\x001'))
  with pytest.raises(UnsafeCheckpointError, match=f'references {module}.{name},'):
    load_torch_checkpoint(path)


def test_protocol_4_stack_global_is_refused(tmp_path):
  path = tmp_path / 'evil.pt'
  write_torch_archive(path, pickle.dumps({'cwd': os.getcwd}, protocol=4))
  with pytest.raises(UnsafeCheckpointError, match='getcwd'):
    load_torch_checkpoint(path)


def test_copyreg_reconstructor_is_refused_for_other_classes(tmp_path):
  path = tmp_path / 'evil.pt'
  data_pkl = _global_call_pickle(
    'copy_reg', '_reconstructor', b'c__builtin__\nset\n', b'c__builtin__\ndict\n', b'N'
  )
  write_torch_archive(path, data_pkl)
  with pytest.raises(UnsafeCheckpointError, match=r'copyreg\._reconstructor applied to set'):
    load_torch_checkpoint(path)


@pytest.mark.parametrize(
  'data_pkl',
  [
    # BUILD {'a': 1} on the tensor rebuild function
    b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x01\x00\x00\x00aK\x01sb.',
    # BUILD (None, {'__setstate__': tuple}) on the EasyDict stand-in class
    b'\x80\x02ceasydict\nEasyDict\nN}X\x0c\x00\x00\x00__setstate__ctorch\nSize\ns\x86b.',
  ],
  ids=['rebuild_function', 'easydict_class'],
)
def test_allowed_objects_cannot_be_altered_by_the_pickle(tmp_path, data_pkl):
  path = tmp_path / 'build.pt'
  write_torch_archive(path, data_pkl)
  with pytest.raises(CheckpointFormatError):
    load_torch_checkpoint(path)
  write_torch_checkpoint(path, {'args': {'a': 1}, 'w': np.ones(2, np.float32)})
  assert load_torch_checkpoint(path)['args'] == {'a': 1}  # later loads are unaffected


def test_unsafe_name_is_kept_on_one_line(tmp_path):
  path = tmp_path / 'evil.pt'
  # STACK_GLOBAL takes its names from strings, which may hold newlines
  data_pkl = b'\x80\x04' + b'X\x04\x00\x00\x00os\nx' + b'X\x06\x00\x00\x00system' + b'\x93.'
  write_torch_archive(path, data_pkl)
  with pytest.raises(UnsafeCheckpointError) as refusal:
    load_torch_checkpoint(path)
  assert '\n' not in str(refusal.value)


# --- malformed files --------------------------------------------------------------------------


def test_non_zip_file_is_a_format_error(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_text('these are not weights\n')
  with pytest.raises(CheckpointFormatError, match='not a zip archive'):
    load_torch_checkpoint(path)


def test_legacy_torch_file_is_named(tmp_path):
  path = tmp_path / 'old.pt'
  path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))  # a bare pickle, as before torch 1.6
  with pytest.raises(CheckpointFormatError, match='legacy'):
    load_torch_checkpoint(path)


def test_truncated_zip_is_a_format_error(tmp_path):
  path = tmp_path / 'truncated.ckpt'
  path.write_bytes(STATE_DICT_PT.read_bytes()[: STATE_DICT_PT.stat().st_size // 2])
  with pytest.raises(CheckpointFormatError) as error:
    load_torch_checkpoint(path)
  assert '\n' not in str(error.value)


def test_corrupt_pickle_bytes_are_a_format_error(tmp_path):
  path = tmp_path / 'corrupt.pt'
  write_torch_archive(path, b'\x80\x02}q\x00(X\x05\x00\x00\x00model')  # stops mid-dict
  with pytest.raises(CheckpointFormatError, match='corrupt'):
    load_torch_checkpoint(path)


def test_zip_without_data_pkl_is_a_format_error(tmp_path):
  path = tmp_path / 'other.zip'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('readme.txt', 'hello')
  with pytest.raises(CheckpointFormatError, match='data.pkl'):
    load_torch_checkpoint(path)


def test_missing_storage_record_is_a_format_error(tmp_path):
  path = tmp_path / 'model.pt'
  write_torch_checkpoint(path, {'w': np.ones(3, np.float32)})
  with zipfile.ZipFile(path) as archive:
    data_pkl = archive.read('model/data.pkl')
  write_torch_archive(path, data_pkl, storages={})
  with pytest.raises(CheckpointFormatError, match='data/0 is missing'):
    load_torch_checkpoint(path)


def test_view_outside_its_storage_is_a_format_error(tmp_path):
  path = tmp_path / 'overrun.pt'
  write_torch_checkpoint(path, {'w': StridedTensor(np.arange(6, dtype=np.float32), 2, (2, 3), (3, 1))})
  with pytest.raises(CheckpointFormatError, match='reaches element 7'):
    load_torch_checkpoint(path)


def test_missing_file_is_an_os_error(tmp_path):
  with pytest.raises(FileNotFoundError):
    load_torch_checkpoint(tmp_path / 'absent.pt')


# --- round trips through the test writer ------------------------------------------------------


def _arrays_of_every_dtype():
  rng = np.random.default_rng(0)
  arrays = {
    'float32': rng.standard_normal((2, 3, 4)).astype(np.float32),
    'float64': rng.standard_normal(5),
    'float16': rng.standard_normal((3, 1)).astype(np.float16),
    'int64': np.array([-(2**40), 0, 2**40]),
    'int32': np.array([[-7, 8]], np.int32),
    'int16': np.array([-300, 300], np.int16),
    'int8': np.array([-128, 127], np.int8),
    'uint8': np.array([0, 255], np.uint8),
    'uint16': np.array([1, 65535], np.uint16),
    'uint32': np.array([1, 2**32 - 1], np.uint32),
    'uint64': np.array([1, 2**64 - 1], np.uint64),
    'bool': np.array([True, False, True]),
    'complex64': np.array([1 + 2j, -3.5j], np.complex64),
    'complex128': np.array([[0.25 - 1j]]),
    'scalar': np.array(42, np.int64),
    'empty': np.zeros((0, 4), np.float32),
  }
  ml_dtypes = pytest.importorskip('ml_dtypes')
  arrays['bfloat16'] = np.array([1.5, -2.0, 3.0e38], dtype=ml_dtypes.bfloat16)
  return arrays


@pytest.mark.parametrize('byteorder', ['little', 'big'])
def test_round_trip_of_arrays_and_plain_values(tmp_path, byteorder):
  arrays = _arrays_of_every_dtype()
  plain = {
    'epoch': 7,
    'big': 2**70,
    'negative': -(2**33),
    'lr': 1e-3,
    'name': 'atlas ✓',
    'flags': [True, False, None],
    'shape': (1, 2, 3, 4),
    'nested': {'a': {'b': [1.5, 'c']}},
    'set': {1, 2},
    'frozen': frozenset({'x'}),
    'complex': 1 + 2j,
    'bytes': b'\x00\xff',
    'no_bytes': b'',
  }
  path = tmp_path / 'round_trip.pt'
  write_torch_checkpoint(path, {'model': collections.OrderedDict(arrays), **plain}, byteorder=byteorder)
  loaded = load_torch_checkpoint(path)
  assert_same_arrays(loaded['model'], arrays)
  assert {key: loaded[key] for key in plain} == plain
  assert type(loaded['model']) is collections.OrderedDict


def test_missing_byteorder_record_means_little_endian(tmp_path):
  path = tmp_path / 'model.pt'
  write_torch_checkpoint(path, {'w': np.arange(4, dtype=np.int32)})
  with zipfile.ZipFile(path) as archive:
    data_pkl, storage = archive.read('model/data.pkl'), archive.read('model/data/0')
  write_torch_archive(path, data_pkl, {'0': storage}, byteorder=None, archive_name='any_folder')
  np.testing.assert_array_equal(load_torch_checkpoint(path)['w'], np.arange(4, dtype=np.int32))


def test_strides_and_storage_offset_are_honoured(tmp_path):
  storage = np.arange(24, dtype=np.float32)
  views = {
    'transposed': StridedTensor(storage, 2, (3, 4), (1, 3)),
    'every_fifth': StridedTensor(storage, 0, (5,), (5,)),
    'size_one_dim': StridedTensor(storage, 23, (1, 1), (0, 0)),
    'scalar': StridedTensor(storage, 9, (), ()),
  }
  path = tmp_path / 'views.pt'
  write_torch_checkpoint(path, views)
  with zipfile.ZipFile(path) as archive:
    assert len([name for name in archive.namelist() if '/data/' in name]) == 1  # one shared storage
  loaded = load_torch_checkpoint(path)
  expected = {
    'transposed': np.array([[2 + row + 3 * col for col in range(4)] for row in range(3)], np.float32),
    'every_fifth': np.array([0, 5, 10, 15, 20], np.float32),
    'size_one_dim': np.full((1, 1), 23, np.float32),
    'scalar': np.array(9, np.float32),
  }
  assert_same_arrays(loaded, expected)
  for array in loaded.values():
    assert array.flags.c_contiguous and array.flags.writeable
  loaded['transposed'][0, 0] = -1  # a copy: the other views are untouched
  assert loaded['every_fifth'][0] == 0


def test_tampered_state_dict_reads_back_as_written(tmp_path, reference_state_dict):
  tampered = collections.OrderedDict(reference_state_dict)
  renamed_from, reshaped = list(tampered)[0], list(tampered)[1]
  tampered['renamed.weight'] = tampered.pop(renamed_from)
  tampered[reshaped] = tampered[reshaped].reshape(-1)[:-1].copy()
  path = tmp_path / 'tampered.ckpt'
  write_torch_checkpoint(path, {'model': tampered, 'epoch': 7, 'global_step': 300})
  state_dict = load_state_dict(path)
  assert renamed_from not in state_dict
  assert state_dict[reshaped].shape == (reference_state_dict[reshaped].size - 1,)
  assert_same_arrays(state_dict, tampered)


# --- EasyDict ---------------------------------------------------------------------------------


class EasyDict(dict):
  """Behaves like easydict.EasyDict: every item is also an attribute, so pickles carry both."""

  __module__ = 'easydict'

  def __init__(self, mapping=None, **items):
    super().__init__()
    for key, value in dict(mapping or {}, **items).items():
      setattr(self, key, value)

  def __setattr__(self, name, value):
    if isinstance(value, dict) and not isinstance(value, EasyDict):
      value = EasyDict(value)
    super().__setattr__(name, value)
    super().__setitem__(name, value)

  __setitem__ = __setattr__


@pytest.fixture
def easydict_module(monkeypatch):
  module = types.ModuleType('easydict')
  module.EasyDict = EasyDict
  monkeypatch.setitem(sys.modules, 'easydict', module)


CONFIG = {'optimizer': {'type': 'AdamW', 'kwargs': {'betas': [0.9, 0.999]}}, 'seed': 1, 'note': None}


def test_easydict_with_attribute_state_becomes_plain_dicts(tmp_path, easydict_module):
  path = tmp_path / 'args.ckpt'
  write_torch_checkpoint(path, {'args': EasyDict(CONFIG)})
  with zipfile.ZipFile(path) as archive:
    opcodes = {opcode.name for opcode, _, _ in pickletools.genops(archive.read('args/data.pkl'))}
  assert 'BUILD' in opcodes  # the attribute state really is in the file
  args = load_torch_checkpoint(path)['args']
  assert_only_plain_dicts(args)
  assert args == CONFIG


@pytest.mark.parametrize('protocol', [0, 1])
def test_easydict_from_old_protocols_uses_copyreg_safely(tmp_path, easydict_module, protocol):
  path = tmp_path / 'args.ckpt'
  data_pkl = pickle.dumps({'args': EasyDict(CONFIG)}, protocol=protocol)
  assert b'_reconstructor' in data_pkl
  write_torch_archive(path, data_pkl)
  args = load_torch_checkpoint(path)['args']
  assert_only_plain_dicts(args)
  assert args == CONFIG


# --- load_state_dict's choice of entry --------------------------------------------------------


def test_state_dict_entry_is_used(tmp_path):
  weights = {'fc.weight': np.ones((2, 2), np.float32)}
  path = tmp_path / 'model.pt'
  write_torch_checkpoint(path, {'state_dict': weights, 'model': 'resnet'})
  assert_same_arrays(load_state_dict(path), weights)


def test_no_state_dict_names_the_top_level_keys(tmp_path):
  path = tmp_path / 'metrics.pt'
  write_torch_checkpoint(path, {'epoch': 3, 'metrics': {'acc': 0.5}})
  with pytest.raises(CheckpointFormatError, match="'epoch', 'metrics'"):
    load_state_dict(path)


# --- bfloat16 without ml_dtypes ---------------------------------------------------------------


def test_bfloat16_becomes_float32_without_ml_dtypes(tmp_path, monkeypatch):
  ml_dtypes = pytest.importorskip('ml_dtypes')
  values = np.array([1.5, -2.0, 0.0078125, 3.0e38], dtype=ml_dtypes.bfloat16)
  path = tmp_path / 'bf16.pt'
  write_torch_checkpoint(path, {'w': values})
  monkeypatch.setitem(sys.modules, 'ml_dtypes', None)  # makes `import ml_dtypes` fail
  spec = importlib.util.spec_from_file_location(
    'torch_checkpoint_without_ml_dtypes', torch_checkpoint.__file__
  )
  reader = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(reader)
  loaded = reader.load_torch_checkpoint(path)['w']
  assert loaded.dtype == np.float32
  np.testing.assert_array_equal(loaded, values.astype(np.float32))
