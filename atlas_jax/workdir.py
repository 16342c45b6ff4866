"""The workdir layout (docs/design.md): config.json, labels.txt, checkpoints/<step>/, tb/, metrics.jsonl.

config.json holds the full, resolved config. JSON has no tuples, so every list read back becomes a tuple
(no config field is a list), and a field that was a placeholder comes back as a placeholder of its type,
so `--config.FIELD=VALUE` overrides still apply to a config loaded from a workdir. labels.txt holds the
class names, one a line in index order, where the run knew them (`write_labels`, `read_labels`).
A workdir may be local or on Cloud Storage (`gs://bucket/run`): every file goes through atlas_jax/storage.py.
"""

import json
import pathlib

import ml_collections
from ml_collections import config_dict

from atlas_jax import storage
from atlas_jax.errors import AtlasError

CONFIG_FILE = 'config.json'
LABELS_FILE = 'labels.txt'


class WorkdirNotFound(AtlasError, FileNotFoundError):
  """A directory that is not a workdir: it has no config.json."""


class ConfigFileError(AtlasError, ValueError):
  """A config.json that cannot be read back."""


CHECKPOINTS = 'checkpoints'


def config_path(workdir) -> pathlib.Path:
  return storage.join(workdir, CONFIG_FILE)


def labels_path(workdir) -> pathlib.Path:
  return storage.join(workdir, LABELS_FILE)


def checkpoints_dir(workdir) -> pathlib.Path:
  return storage.join(workdir, CHECKPOINTS)


def _encode(config: ml_collections.ConfigDict) -> dict:
  """Values, plus the type of every unset placeholder under '__placeholders__' so it can be rebuilt."""
  placeholders = {}

  def walk(node, prefix):
    values = {}
    for key in sorted(node.keys()):
      field = node._fields[key]  # the FieldReference, to see a placeholder's type
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict):
        values[key] = walk(value, f'{prefix}{key}.')
        continue
      if value is None and isinstance(field, config_dict.FieldReference) and field.get_type() is not None:
        placeholders[prefix + key] = field.get_type().__name__
      values[key] = list(value) if isinstance(value, tuple) else value
    return values

  values = walk(config, '')
  values['__placeholders__'] = placeholders
  return values


_PLACEHOLDER_TYPES = {'int': int, 'float': float, 'str': str, 'bool': bool, 'tuple': tuple}


def _decode(values: dict) -> ml_collections.ConfigDict:
  placeholders = values.pop('__placeholders__', {})

  def build(node):
    config = ml_collections.ConfigDict()
    for key, value in node.items():
      if isinstance(value, dict):
        config[key] = build(value)
      elif isinstance(value, list):
        config[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
      else:
        config[key] = value
    return config

  config = build(values)
  for dotted, type_name in placeholders.items():
    *parents, leaf = dotted.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = config_dict.placeholder(_PLACEHOLDER_TYPES[type_name])
  return config


def write_config(workdir, config: ml_collections.ConfigDict) -> pathlib.Path:
  """Writes WORKDIR/config.json atomically (a temporary file renamed), returns its path."""
  path = config_path(workdir)
  storage.write_text(path, json.dumps(_encode(config), indent=2, sort_keys=True) + '\n')
  return path


def read_config(workdir) -> ml_collections.ConfigDict:
  path = config_path(workdir)
  if not storage.isfile(path):
    raise WorkdirNotFound(
      f'{path} not found: is {workdir} a workdir written by atlas_jax (main or tools.convert_torch)?'
    )
  try:
    values = json.loads(storage.read_text(path))
  except json.JSONDecodeError as error:
    raise ConfigFileError(
      f'{path} is not valid JSON ({error}); restore it or rewrite it from the config file'
    ) from None
  return _decode(values)


def write_labels(workdir, names) -> pathlib.Path:
  """Writes WORKDIR/labels.txt atomically: the class names, one a line in index order; returns its path."""
  names = [str(name) for name in names]
  unwritable = [name for name in names if not name.strip() or '\n' in name or '\r' in name]
  if not names or unwritable:
    raise ValueError(f'class names must be non-empty single lines, got {unwritable or names!r}')
  path = labels_path(workdir)
  storage.write_text(path, ''.join(f'{name}\n' for name in names))
  return path


def read_labels(workdir) -> list[str] | None:
  """The class names of WORKDIR/labels.txt in index order; None when the workdir has no labels.txt."""
  path = labels_path(workdir)
  if not storage.isfile(path):
    return None
  lines = storage.read_text(path).split('\n')
  if lines[-1] == '':
    lines.pop()  # the newline that ends the last name
  return [line.removesuffix('\r') for line in lines]  # also a file saved with Windows line endings
