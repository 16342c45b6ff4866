"""The one place a config is resolved and checked, before anything is built or compiled.

`resolve(config)` returns a copy in which every field exists and every derived field is set:
- a field or group the config lacks takes its value from `configs/common.py`, the only source of defaults
  (so a config.json written before a field existed still loads);
- `image_size` is `(H, W)` (one number means a square);
- the model's `dim`, `num_heads` and `stem_width` come from `variant` and `depths` from the number of scales,
  unless set (an explicit value wins);
- `eval.batch_size` 0 becomes the training micro-batch; `ema.decay` and `optimizer.clip_grad_norm` None
  become 0 (off);
- every field has the type of its default (a hand-edited config.json included; an int does for a float, a
  list for a tuple), every number its range and is finite (no nan or inf), every choice is one of its
  choices, the augmentation's included, and a bad one raises `ConfigError` (or the model geometry's
  `LayoutError`) naming the field, in one line.
Every other module reads the resolved config and keeps no fallback values of its own. Resolving twice gives
the same config. The devices are not known here: the mesh and the batch's divisibility by it are checked
where the mesh is made (sharding.py).
"""

from collections.abc import Sequence
import copy
import difflib
import glob
import importlib.util
import math
import numbers
import os
import pathlib
import re

import ml_collections

from atlas_jax.augment import ERASE_MODES
from atlas_jax.errors import AtlasError, one_line_errors
from atlas_jax.models import DTYPES, MODELS, VARIANTS, default_depths
from atlas_jax.models import layout as layout_lib
from atlas_jax.models.attention import IMPLEMENTATIONS
from atlas_jax.models.msa import COMMUNICATIONS

MODES = ('train', 'eval', 'compile', 'linear_eval')
RESIZE_MODES = ('squash', 'crop', 'none')  # data.resize; transforms.eval_resize implements them
ASPECT_MODES = ('squash', 'keep')  # data.augment.aspect; transforms.TrainTransform implements them
TRAINABLE = ('all', 'head')
DATA_SOURCES = ('synthetic', 'tfds', 'folder')
PATCH_SIZES = (4, 8, 16)
PARENT_WINDOWS = ('spatial', 'raster')
COMPOSITIONS = ('atlas', 'stack')


class ConfigError(AtlasError, ValueError):
  """A config field out of its range or not one of its choices."""


def get(config, dotted_name: str):
  """`config.a.b` for the name 'a.b'; None where a group or field on the way is absent."""
  value = config
  for part in dotted_name.split('.'):
    if value is None:
      return None
    value = value.get(part)
  return value


def image_size(value) -> tuple[int, int]:
  """`image_size` as (H, W) pixels: `2048`, `(2048,)` and `(2048, 2048)` are the same square."""
  size = (value,) if isinstance(value, int) else tuple(value) if isinstance(value, Sequence) else ()
  if len(size) == 1:
    size = size * 2
  if len(size) != 2 or any(isinstance(side, bool) or not isinstance(side, int) or side <= 0 for side in size):
    raise ConfigError(f'image_size must be (H, W) in pixels or one number for a square, got {value!r}')
  return size


def common_module():
  """configs/common.py as a module: `atlas_jax.configs.common` where the package ships the configs (an
  installed atlas_jax), else `configs.common` of the repository (a source checkout). Imported when needed,
  not at module scope: configs/ knows atlas_jax's fields."""
  try:
    from atlas_jax.configs import common
  except ModuleNotFoundError:
    from configs import common
  return common


def defaults() -> ml_collections.ConfigDict:
  """Every field with its default, from configs/common.py (the model fields of variant S)."""
  return common_module().base_config('S', 1024)


def resolve(config: ml_collections.ConfigDict, model: bool = True) -> ml_collections.ConfigDict:
  """A resolved and checked copy of `config` (module docstring).

  `model=False` leaves the model fields as they are, for tools that never build the model (the input
  benchmark times the data pipeline at sizes no model takes).
  """
  config = copy.deepcopy(config)  # keeps placeholders typed, so config.json can store them
  with config.unlocked():
    reference = defaults()
    _add_missing(config, reference)
    _check_types(config, reference)
    config.image_size = image_size(config.image_size)
    if model:
      _resolve_model(config)
    _resolve_training(config)
    _check_data(config.data)
  return config


def _add_missing(config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict) -> None:
  for key in reference.keys():
    field = reference._fields[key]  # the FieldReference, so a placeholder stays a typed placeholder
    if key not in config:
      config[key] = copy.deepcopy(
        reference[key] if isinstance(reference[key], ml_collections.ConfigDict) else field
      )
    elif isinstance(reference[key], ml_collections.ConfigDict) and isinstance(
      config[key], ml_collections.ConfigDict
    ):
      _add_missing(config[key], reference[key])


def _choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ConfigError(f'config.{name} must be one of {", ".join(map(str, choices))}; got {value!r}')


# Fields that may be None besides the placeholders: resolve turns the first two into 0 (off); checkpoint.keep
# None keeps every checkpoint.
NONE_ALLOWED = ('ema.decay', 'optimizer.clip_grad_norm', 'checkpoint.keep')
# Checked by their own functions: image_size takes one number or (H, W).
OWN_TYPE_CHECK = ('image_size',)


def _type_name(kind) -> str:
  return {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string', tuple: 'a tuple'}.get(
    kind, kind.__name__
  )


def _has_type(value, kind) -> bool:
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  if kind is tuple:
    return isinstance(value, (tuple, list))
  return isinstance(value, kind)


def _check_types(config, reference, prefix: str = '') -> None:
  """Every field of `reference` (the defaults) has its type in `config`: a config.json edited by hand is
  refused by field name here, not by a TypeError deep in the model or the loader."""
  for key in reference.keys():
    name = prefix + key
    expected = reference[key]
    value = config[key]
    if isinstance(expected, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f'config.{name} must be a group of fields like {expected.to_dict()}, got {value!r}')
      _check_types(value, expected, name + '.')
      continue
    if name in OWN_TYPE_CHECK:
      continue
    kind = reference.get_type(key)
    is_placeholder = isinstance(reference._fields[key], ml_collections.FieldReference)
    if value is None and (is_placeholder or name in NONE_ALLOWED):
      continue
    if kind is not type(None) and not _has_type(value, kind):
      raise ConfigError(f'config.{name} must be {_type_name(kind)}, got {value!r}')


def _is_number(value) -> bool:
  """A finite real number, not a bool: nan and inf are refused everywhere."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _in_range(name: str, value, low=None, high=None, low_open=False, high_open=False, note='') -> None:
  """`value` a finite number within [low, high] (an open end with `low_open` / `high_open`; None: no end)."""
  ok = _is_number(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    if low is not None and high is not None:
      where = f'in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
    elif low is not None:
      where = f'{">" if low_open else ">="} {low}'
    else:
      where = f'{"<" if high_open else "<="} {high}'
    raise ConfigError(f'config.{name} must be a finite number {where}{note}, got {value!r}')


def _at_least(name: str, value, low) -> None:
  if not _is_number(value) or not value >= low:
    raise ConfigError(f'config.{name} must be a finite number >= {low}, got {value!r}')


def _integer_at_least(name: str, value, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ConfigError(f'config.{name} must be an integer >= {low}, got {value!r}')


def _probability(name: str, value) -> None:
  if not _is_number(value) or not 0.0 <= value <= 1.0:
    raise ConfigError(f'config.{name} must be a probability in [0, 1], got {value!r}')


def _resolve_model(config) -> None:
  model = config.model
  _choice('model.name', model.name, sorted(MODELS))
  _choice('model.variant', model.variant, sorted(VARIANTS))
  dim, num_heads, stem_width = VARIANTS[model.variant]
  model.dim = dim if model.dim is None else model.dim
  model.num_heads = num_heads if model.num_heads is None else model.num_heads
  model.stem_width = stem_width if model.stem_width is None else model.stem_width
  for name in ('dim', 'num_heads', 'stem_width', 'stem_in_dim', 'num_classes'):
    _integer_at_least(f'model.{name}', model[name], 1)
  if model.dim % model.num_heads:
    raise ConfigError(f'model.dim {model.dim} is not divisible by model.num_heads {model.num_heads}')
  # The MLP's hidden width is mlp_ratio x dim, an integer number of features.
  _integer_at_least('model.mlp_ratio', model.mlp_ratio, 1)
  _integer_at_least('model.window', model.window, 1)  # tokens per window side
  _integer_at_least('model.pool', model.pool, 2)  # tokens pooled per side into one coarser token
  _choice('model.dtype', model.dtype, sorted(DTYPES))
  _choice('model.patch_size', model.patch_size, PATCH_SIZES)
  _choice('model.parent_window', model.parent_window, PARENT_WINDOWS)
  _choice('model.communication', model.communication, COMMUNICATIONS)
  _choice('model.composition', model.composition, COMPOSITIONS)
  _choice('model.attention', model.attention, IMPLEMENTATIONS)
  if model.remat not in ('none', 'block') and not _is_checkpoint_policy(model.remat):
    raise ConfigError(
      f"config.model.remat must be 'none', 'block' or a jax.checkpoint_policies name, got {model.remat!r}"
    )
  _in_range(
    'model.drop_path_rate', model.drop_path_rate, 0.0, 1.0, high_open=True
  )  # 1 would drop every block
  layouts = layout_lib.check_image_size(config.image_size, model.patch_size, model.window, model.pool)
  if model.depths is None:
    model.depths = default_depths(len(layouts))
  model.depths = tuple(model.depths)
  if not model.depths or any(
    isinstance(depth, bool) or not isinstance(depth, int) or depth < 1 for depth in model.depths
  ):
    raise ConfigError(f'model.depths must be positive block counts, got {model.depths}')
  if model.name == 'atlas':
    layout_lib.stage_scales(len(layouts), model.depths, model.composition)


def _is_checkpoint_policy(name) -> bool:
  import jax  # only for the list of policy names

  return isinstance(name, str) and hasattr(jax.checkpoint_policies, name)


def _resolve_training(config) -> None:
  _choice('mode', config.mode, MODES)
  _at_least('device_memory_gib', config.device_memory_gib, 0)  # 0 = the backend's own figure
  for name in ('lr', 'min_lr', 'weight_decay'):
    _at_least(name, config[name], 0)
  _integer_at_least('total_steps', config.total_steps, 1)
  _integer_at_least('warmup_steps', config.warmup_steps, 0)
  if not 0 <= config.warmup_steps <= config.total_steps:
    raise ConfigError(
      f'config.warmup_steps must be in [0, total_steps={config.total_steps}], got {config.warmup_steps}'
    )
  if config.optimizer.clip_grad_norm is None:
    config.optimizer.clip_grad_norm = 0.0
  if not _is_number(config.optimizer.clip_grad_norm) or config.optimizer.clip_grad_norm < 0:
    raise ConfigError(
      f'config.optimizer.clip_grad_norm must be 0 (off) or > 0, got {config.optimizer.clip_grad_norm!r}'
    )
  layer_decay = config.optimizer.layer_decay
  if not _is_number(layer_decay) or not 0 < layer_decay <= 1:
    raise ConfigError(f'config.optimizer.layer_decay must be in (0, 1] (1 = off), got {layer_decay!r}')
  # AdamW's moment decays: 1 would never forget (and divide by zero in the bias correction).
  for name in ('b1', 'b2'):
    _in_range(f'optimizer.{name}', config.optimizer[name], 0.0, 1.0, high_open=True)
  _in_range('optimizer.eps', config.optimizer.eps, 0.0, low_open=True)  # added to sqrt(v): 0 can divide by 0
  _choice('optimizer.trainable', config.optimizer.trainable, TRAINABLE)
  _probability('linear_eval.holdout_fraction', config.linear_eval.holdout_fraction)
  if not 0 < config.linear_eval.holdout_fraction < 1:
    raise ConfigError(
      f'config.linear_eval.holdout_fraction must be in (0, 1), got {config.linear_eval.holdout_fraction}'
    )
  grid = config.linear_eval.l2_grid
  if (
    not isinstance(grid, (tuple, list))
    or not grid
    or any(not _is_number(value) or not value > 0 for value in grid)
  ):
    raise ConfigError(
      f'config.linear_eval.l2_grid must be a non-empty tuple of finite numbers > 0, got {grid!r}'
    )
  _integer_at_least('linear_eval.max_train_examples', config.linear_eval.max_train_examples, 0)
  if config.ema.decay is None:
    config.ema.decay = 0.0
  if not _is_number(config.ema.decay) or not 0 <= config.ema.decay < 1:
    raise ConfigError(f'config.ema.decay must be in [0, 1) (0 = off), got {config.ema.decay!r}')
  _integer_at_least('grad_accum_steps', config.grad_accum_steps, 1)
  for name in (
    'batch_size',
    'checkpoint.every_steps',
    'checkpoint.preemption_sync_steps',
    'eval.every_steps',
    'log.every_steps',
  ):
    _integer_at_least(name, get(config, name), 1)
  _integer_at_least('seed', config.seed, 0)
  if config.batch_size % config.grad_accum_steps:
    raise ConfigError(
      f'config.batch_size={config.batch_size} is not divisible by '
      f'config.grad_accum_steps={config.grad_accum_steps}'
    )
  _integer_at_least('eval.batch_size', config.eval.batch_size, 0)
  if config.eval.batch_size == 0:
    config.eval.batch_size = config.batch_size // config.grad_accum_steps
  mixup = config.mixup
  for name in ('mixup_alpha', 'cutmix_alpha'):
    _at_least(f'mixup.{name}', mixup[name], 0)
  _probability('mixup.switch_prob', mixup.switch_prob)
  _probability('mixup.label_smoothing', mixup.label_smoothing)
  _integer_at_least('mesh.fsdp_min_size', config.mesh.fsdp_min_size, 1)
  for axis in ('data', 'fsdp', 'spatial'):  # devices along the axis; -1 = those the others leave
    size = config.mesh[axis]
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or not (size == -1 or size >= 1):
      raise ConfigError(f'config.mesh.{axis} must be -1 (the devices left) or an integer >= 1, got {size!r}')
  if [config.mesh[axis] for axis in ('data', 'fsdp', 'spatial')].count(-1) > 1:
    raise ConfigError('config.mesh: at most one of data, fsdp and spatial may be -1 (the devices left)')
  if config.checkpoint.keep is not None:  # None keeps them all
    _integer_at_least('checkpoint.keep', config.checkpoint.keep, 1)
  heartbeat, stale = config.checkpoint.lock_heartbeat_s, config.checkpoint.lock_stale_s
  if not _is_number(heartbeat) or not heartbeat > 0:
    raise ConfigError(
      f'config.checkpoint.lock_heartbeat_s must be a number of seconds > 0, got {heartbeat!r}'
    )
  if not _is_number(stale) or not stale > heartbeat:
    raise ConfigError(
      f'config.checkpoint.lock_stale_s must be more than lock_heartbeat_s={heartbeat!r} (seconds), got {stale!r}'
    )
  _integer_at_least('profile.start_step', config.profile.start_step, -1)  # -1 = off
  _integer_at_least('profile.num_steps', config.profile.num_steps, 1)


def _pair(name: str, bounds) -> tuple:
  """`bounds` as (low, high), two finite numbers."""
  if not isinstance(bounds, (tuple, list)) or len(bounds) != 2 or not all(map(_is_number, bounds)):
    raise ConfigError(f'config.data.augment.{name} must be (low, high), two finite numbers, got {bounds!r}')
  return tuple(bounds)


def _range(name: str, bounds, low: float, high: float | None = None) -> None:
  bounds = _pair(name, bounds)
  if not low <= bounds[0] <= bounds[1] or (high is not None and bounds[1] > high):
    upper = '' if high is None else f' <= {high}'
    raise ConfigError(
      f'config.data.augment.{name} must be (low, high) with {low} <= low <= high{upper}, got {bounds}'
    )


def _check_data(data) -> None:
  _choice('data.source', data.source, DATA_SOURCES)
  _integer_at_least('data.workers', data.workers, 0)
  _probability('data.max_bad_fraction', data.max_bad_fraction)
  _integer_at_least('data.max_pixels', data.max_pixels, 1)
  _integer_at_least('data.max_decode_bytes', data.max_decode_bytes, 1)
  _choice('data.resize', data.resize, RESIZE_MODES)
  if not _is_number(data.crop_pct) or not 0 < data.crop_pct <= 1:
    raise ConfigError(f'config.data.crop_pct must be in (0, 1], got {data.crop_pct!r}')
  _integer_at_least('data.synthetic_train_size', data.synthetic_train_size, 1)
  _integer_at_least('data.synthetic_val_size', data.synthetic_val_size, 1)
  augment = data.augment
  _range('crop_scale', augment.crop_scale, 0.0, 1.0)
  _range('crop_ratio', augment.crop_ratio, 0.0)
  if augment.crop_ratio[0] <= 0:
    raise ConfigError(f'config.data.augment.crop_ratio must be positive, got {tuple(augment.crop_ratio)}')
  for name in ('hflip', 'randaug_prob', 'erase_prob'):
    _probability(f'data.augment.{name}', augment[name])
  _integer_at_least('data.augment.randaug_num_ops', augment.randaug_num_ops, 0)
  for name in ('randaug_magnitude_std', 'randaug_magnitude_max'):
    _at_least(f'data.augment.{name}', augment[name], 0)
  # timm's magnitude scale: 0 = no change, randaug_magnitude_max = the strongest (timm clips to it).
  _in_range(
    'data.augment.randaug_magnitude',
    augment.randaug_magnitude,
    0.0,
    augment.randaug_magnitude_max,
    note=' (data.augment.randaug_magnitude_max)',
  )
  _integer_at_least('data.augment.host_max_side', augment.host_max_side, 0)
  _choice('data.augment.erase_mode', augment.erase_mode, ERASE_MODES)
  _choice('data.augment.aspect', augment.aspect, ASPECT_MODES)
  low, high = _pair('erase_area', augment.erase_area)
  if not 0.0 < low <= high <= 1.0:
    raise ConfigError(
      f'config.data.augment.erase_area must be (low, high) with 0 < low <= high <= 1, got {(low, high)}'
    )
  low, high = _pair('erase_ratio', augment.erase_ratio)
  if not 0.0 < low <= high:
    raise ConfigError(
      f'config.data.augment.erase_ratio must be (low, high) with 0 < low <= high, got {(low, high)}'
    )
  _integer_at_least('data.augment.erase_count', augment.erase_count, 1)


def field_names(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every field and group of `config` as a dotted name, e.g. 'model', 'model.dim'."""
  names = []
  for key in config.keys():
    names.append(prefix + key)
    if isinstance(config[key], ml_collections.ConfigDict):
      names += field_names(config[key], f'{prefix}{key}.')
  return names


def nearest_field(name: str, names: list[str]) -> str | None:
  """The known field nearest to a misspelt `name`: one with the same last part, else the closest spelling."""
  same_leaf = [known for known in names if known.rsplit('.', 1)[-1] == name.rsplit('.', 1)[-1]]
  if len(same_leaf) == 1:
    return same_leaf[0]
  close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
  return close[0] if close else None


# ---------------------------------------------------------------------------------------------------
# Config files by name or path, from any directory.

NOT_CONFIGS = ('__init__', 'common')  # modules of configs/ that are no config of their own


def config_dir() -> pathlib.Path | None:
  """The folder of the shipped config files: the installed package's `atlas_jax/configs/` (the wheel maps the
  repository's configs/ there, pyproject.toml), else the repository's `configs/` next to the atlas_jax
  source folder; None when neither is there."""
  spec = importlib.util.find_spec('atlas_jax.configs')
  if spec is not None and spec.submodule_search_locations:
    return pathlib.Path(list(spec.submodule_search_locations)[0])
  repository = pathlib.Path(__file__).resolve().parents[1] / 'configs'
  return repository if (repository / 'common.py').is_file() else None


def shipped_configs() -> dict[str, pathlib.Path]:
  """Config name ('quickstart', 'atlas_b_1024', ...) -> its file."""
  folder = config_dir()
  if folder is None:
    return {}
  return {path.stem: path for path in sorted(folder.glob('*.py')) if path.stem not in NOT_CONFIGS}


def resolve_config_path(spec: str, name: str = 'config') -> str:
  """`--NAME=SPEC` ('FILE.py[:ARG]' or a bare 'NAME[:ARG]') -> the config file to load, with its ':ARG'.

  A file that exists (relative to the working directory, or absolute) is itself. A bare name ('quickstart',
  'atlas_b_1024', with or without '.py') and a 'configs/NAME.py' that is not there from this directory are
  the shipped config of that name, so every command line finds them from any directory. A bare name that is
  no shipped config is one ConfigError line listing those there are; any other path is left to
  `load_config_file`, which says it does not exist.
  """
  path, colon, arg = spec.partition(':')
  if not path or os.path.isfile(path):
    return spec
  given = pathlib.PurePath(path)
  bare = len(given.parts) == 1
  if not bare and not (len(given.parts) == 2 and given.parts[0] == 'configs' and given.suffix == '.py'):
    return spec
  key = given.name[: -len('.py')] if given.name.endswith('.py') else given.name
  shipped = shipped_configs()
  if key in shipped:
    return f'{shipped[key]}{colon}{arg}'
  if not bare:
    return spec
  close = difflib.get_close_matches(key, list(shipped), n=1)
  hint = f'did you mean --{name}={close[0]}{colon}{arg}? ' if close else ''
  raise ConfigError(
    f'--{name}={spec}: no config file {path} here and no shipped config named {key}; {hint}'
    f'the shipped configs: {", ".join(shipped) or "none found"} (or pass the path of a config file)'
  )


def load_config_file(spec: str, name: str) -> ml_collections.ConfigDict:
  """`get_config(ARG)` of the config file `spec` = 'FILE.py[:ARG]' or a shipped config's name
  (`resolve_config_path`), or a ConfigError line."""
  given = spec
  spec = resolve_config_path(spec, name)
  path, colon, arg = spec.partition(':')
  if not os.path.isfile(path):
    others = glob.glob(os.path.join(os.path.dirname(path) or '.', '*.py'))
    close = difflib.get_close_matches(
      path, [other for other in others if not other.endswith('__init__.py')], n=1
    )
    names = ', '.join(shipped_configs())
    hint = (
      f'; did you mean --{name}={close[0]}{colon}{arg}?'
      if close
      else f'; pass a config file or a shipped config by name ({names})'
    )
    raise ConfigError(f'config file {path} (--{name}={given}) does not exist{hint}')
  module_spec = importlib.util.spec_from_file_location(f'_{name}_checked', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(
      f'config file {path} has no get_config(): is it a config file like those under configs/?'
    )
  try:
    return module.get_config(arg) if colon else module.get_config()
  except ValueError as error:  # common.parse_arg: an unknown key or a value of the wrong type
    raise ConfigError(f'bad config argument in --{name}={given}: {error}') from None


def check_command_line(args: list[str], name: str = 'config') -> None:
  """Refuses, as one ConfigError line, what ml_collections' config_flags would meet with a traceback or take
  silently.

  `args`: the command line's arguments (no program name, flagfiles expanded), before absl parses them: a
  `--NAME=FILE.py[:ARG]` whose file does not exist or whose ARG `get_config` refuses, a `--NAME.FIELD`
  override the config has no field for (the nearest known field named) or one given twice (config_flags
  would join a tuple field's values), an override before `--NAME`. No `--NAME` is left to absl.
  """
  spec, spec_index, overrides = None, None, []
  for index, arg in enumerate(args):
    found = _config_value(args, index, name)
    if found is not None:
      spec_index, spec = index, found[1]
      continue
    match = re.match(rf'--?(?:no)?{name}\.([^=]+)', arg)
    if match:
      overrides.append((index, match.group(1)))
  if spec is None:
    return
  config = load_config_file(spec, name)
  if not isinstance(config, ml_collections.ConfigDict):
    return
  names = field_names(config)
  seen = set()
  for index, field in overrides:
    if field not in names:
      nearest = nearest_field(field, names)
      hint = f'did you mean --{name}.{nearest}?' if nearest else 'configs/common.py lists every field'
      raise ConfigError(f'--{name}.{field}: {spec} has no field {field}; {hint}')
    if field in seen:
      raise ConfigError(
        f'--{name}.{field} is given twice; give each field once (a tuple as one value: '
        f"--{name}.{field}='(a,b)')"
      )
    seen.add(field)
    if index < spec_index:
      raise ConfigError(
        f'--{name}.{field} comes before --{name}=...; put the overrides after the config file'
      )


def _config_value(args: list[str], index: int, name: str) -> tuple[int, str] | None:
  """(where the value is, the value) when `args[index]` is `--NAME=VALUE` or `--NAME VALUE`, else None."""
  match = re.fullmatch(rf'--?{name}(?:=(.*))?', args[index], re.DOTALL)
  if not match:
    return None
  if match.group(1) is not None:
    return index, match.group(1)
  return (index + 1, args[index + 1]) if index + 1 < len(args) else None


def resolve_command_line(args: list[str], name: str = 'config') -> list[str]:
  """`args` with the value of `--NAME` replaced by the config file it names (`resolve_config_path`): a bare
  name or a 'configs/NAME.py' not found here becomes the shipped file's path, for absl's config_flags."""
  args = list(args)
  for index in range(len(args)):
    found = _config_value(args, index, name)
    if found is None:
      continue
    where, value = found
    path = resolve_config_path(value, name)
    if path != value:
      args[where] = f'--{name}={path}' if where == index else path
  return args


@one_line_errors
def parse_flags(argv: list[str]) -> list[str]:
  """`app.run`'s flags_parser for a command line with a `--config` file: every mistake on it is one `error:`
  line and exit code 1 instead of a traceback or absl's two lines.

  First `check_command_line` (a missing config file or unknown config name, a bad :ARG, a misspelt or
  repeated `--config.FIELD`), then `--config=NAME` becomes the shipped config's file
  (`resolve_config_path`: every command line finds the configs by name from any directory), then absl's
  own parsing, whose errors (a `--config.FIELD` value of the wrong type, an unknown or
  malformed flag, a required flag not given) are one line too.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel

  args, rest = list(argv[1:]), []
  if '--' in args:
    args, rest = args[: args.index('--')], args[args.index('--') :]
  try:
    args = flags.FLAGS.read_flags_from_files(args, force_gnu=False)
  except flags.Error:
    args = None  # a flagfile absl cannot read: absl says so below
  if args is not None:
    check_command_line(args)
    # absl gets the flagfiles expanded and `--config` as the file it names (a shipped config by name).
    argv = [argv[0], *resolve_command_line(args), *rest]
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    message = ' '.join(str(error).split())
    message = message[len('flag ') :] if message.startswith('flag --') else message
    if message.startswith('--config.'):
      raise ConfigError(f'{message}; give the field a value of its type (configs/common.py)') from None
    raise AtlasError(f'{message} (--helpfull lists the flags)') from None
