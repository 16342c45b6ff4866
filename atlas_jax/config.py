"""The one place a config is resolved and checked, before anything is built or compiled.

`resolve(config)` returns a copy in which every field exists and every derived field is set:
- a field or group the config lacks takes its value from `configs/common.py`, the only source of defaults
  (so a config.json written before a field existed still loads);
- `image_size` is `(H, W)` (one number means a square);
- the model's `dim`, `num_heads` and `stem_width` come from `variant` and `depths` from the number of scales,
  unless set (an explicit value wins);
- `eval.batch_size` 0 becomes the training micro-batch; `ema.decay` and `optimizer.clip_grad_norm` None
  become 0 (off);
- every range and choice is checked, the augmentation's included, and a bad one raises `ConfigError` (or the
  model geometry's `LayoutError`) naming the field, in one line.
Every other module reads the resolved config and keeps no fallback values of its own. Resolving twice gives
the same config. The devices are not known here: the mesh and the batch's divisibility by it are checked
where the mesh is made (sharding.py).
"""

from collections.abc import Sequence
import copy
import math

import ml_collections

from atlas_jax.augment import ERASE_MODES
from atlas_jax.data.transforms import RESIZE_MODES
from atlas_jax.errors import AtlasError
from atlas_jax.models import DTYPES, MODELS, VARIANTS, default_depths
from atlas_jax.models import layout as layout_lib
from atlas_jax.models.attention import IMPLEMENTATIONS
from atlas_jax.models.msa import COMMUNICATIONS

MODES = ('train', 'eval', 'compile', 'linear_eval')
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


def defaults() -> ml_collections.ConfigDict:
  """Every field with its default, from configs/common.py (the model fields of variant S)."""
  from configs import common  # configs/ knows atlas_jax's fields; imported here, not at module scope

  return common.base_config('S', 1024)


def resolve(config: ml_collections.ConfigDict, model: bool = True) -> ml_collections.ConfigDict:
  """A resolved and checked copy of `config` (module docstring).

  `model=False` leaves the model fields as they are, for tools that never build the model (the input
  benchmark times the data pipeline at sizes no model takes).
  """
  config = copy.deepcopy(config)  # keeps placeholders typed, so config.json can store them
  with config.unlocked():
    _add_missing(config, defaults())
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


def _at_least(name: str, value, low) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
    raise ConfigError(f'config.{name} must be a number >= {low}, got {value!r}')


def _integer_at_least(name: str, value, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ConfigError(f'config.{name} must be an integer >= {low}, got {value!r}')


def _probability(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
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
  _at_least('model.mlp_ratio', model.mlp_ratio, 0)
  if model.mlp_ratio <= 0 or model.dim * model.mlp_ratio < 1:
    raise ConfigError(
      f'config.model.mlp_ratio must be > 0 (hidden width dim x ratio >= 1), got {model.mlp_ratio}'
    )
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
  if not 0.0 <= model.drop_path_rate < 1.0:
    raise ConfigError(f'config.model.drop_path_rate must be in [0, 1), got {model.drop_path_rate}')
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
  if not 0 <= config.warmup_steps <= config.total_steps:
    raise ConfigError(
      f'config.warmup_steps must be in [0, total_steps={config.total_steps}], got {config.warmup_steps}'
    )
  if config.optimizer.clip_grad_norm is None:
    config.optimizer.clip_grad_norm = 0.0
  if config.optimizer.clip_grad_norm < 0:
    raise ConfigError(
      f'config.optimizer.clip_grad_norm must be 0 (off) or > 0, got {config.optimizer.clip_grad_norm}'
    )
  layer_decay = config.optimizer.layer_decay
  if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
    raise ConfigError(f'config.optimizer.layer_decay must be in (0, 1] (1 = off), got {layer_decay!r}')
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
    or any(isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 for value in grid)
  ):
    raise ConfigError(f'config.linear_eval.l2_grid must be a non-empty tuple of numbers > 0, got {grid!r}')
  _integer_at_least('linear_eval.max_train_examples', config.linear_eval.max_train_examples, 0)
  if config.ema.decay is None:
    config.ema.decay = 0.0
  if not 0 <= config.ema.decay < 1:
    raise ConfigError(f'config.ema.decay must be in [0, 1) (0 = off), got {config.ema.decay}')
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


def _range(name: str, bounds, low: float, high: float | None = None) -> None:
  bounds = tuple(bounds)
  if len(bounds) != 2 or not low <= bounds[0] <= bounds[1] or (high is not None and bounds[1] > high):
    upper = '' if high is None else f' <= {high}'
    raise ConfigError(
      f'config.data.augment.{name} must be (low, high) with {low} <= low <= high{upper}, got {bounds}'
    )


def _check_data(data) -> None:
  _choice('data.source', data.source, DATA_SOURCES)
  _integer_at_least('data.workers', data.workers, 0)
  _probability('data.max_bad_fraction', data.max_bad_fraction)
  _integer_at_least('data.max_pixels', data.max_pixels, 1)
  _choice('data.resize', data.resize, RESIZE_MODES)
  if (
    isinstance(data.crop_pct, bool)
    or not isinstance(data.crop_pct, (int, float))
    or not 0 < data.crop_pct <= 1
  ):
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
  _integer_at_least('data.augment.host_max_side', augment.host_max_side, 0)
  _choice('data.augment.erase_mode', augment.erase_mode, ERASE_MODES)
  low, high = tuple(augment.erase_area)
  if not 0.0 < low <= high <= 1.0:
    raise ConfigError(
      f'config.data.augment.erase_area must be (low, high) with 0 < low <= high <= 1, got {(low, high)}'
    )
  low, high = tuple(augment.erase_ratio)
  if not 0.0 < low <= high or not math.isfinite(high):
    raise ConfigError(
      f'config.data.augment.erase_ratio must be (low, high) with 0 < low <= high, got {(low, high)}'
    )
  _integer_at_least('data.augment.erase_count', augment.erase_count, 1)
