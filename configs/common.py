"""Shared pieces of every config: the model fields, the recipe, the data fields, and `parse_arg`.

Each config file is a few lines over `base_config`; its docstring is the command that runs it. Fields
that are derived unless set (`model.dim`, `model.depths`, ...) are `placeholder`s, never a plain None:
ml_collections cannot override a None field from the command line.
"""

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`key=value,flag` (the text after `file.py:`) into a ConfigDict typed by `defaults`; unknown keys refused."""
  parsed = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; known: {", ".join(defaults)}')
    default = defaults[key]
    if isinstance(default, bool):
      if value not in ('', 'True', 'true', '1', 'False', 'false', '0'):
        raise ValueError(f'config argument {key} takes true or false, got {value!r}')
      parsed[key] = value in ('', 'True', 'true', '1')
    else:
      parsed[key] = type(default)(value)
  return parsed


def model_config(variant: str = 'S') -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  model.name = 'atlas'  # atlas | vit | window_vit
  model.variant = variant  # T | S | B: defaults of dim, num_heads, stem_width
  model.dim = config_dict.placeholder(int)
  model.num_heads = config_dict.placeholder(int)
  model.stem_width = config_dict.placeholder(int)
  model.depths = config_dict.placeholder(tuple)  # from the number of scales unless set
  model.patch_size = 16  # 16 = conv stem; 4 or 8 = patchify stem
  model.stem_in_dim = 64
  model.window = 16
  model.pool = 4
  model.mlp_ratio = 4
  model.parent_window = 'spatial'  # spatial | raster (the reference code)
  model.communication = 'full'  # full | top_down | bottom_up | none
  model.composition = 'atlas'  # atlas | stack
  model.num_classes = 100
  model.drop_path_rate = 0.3
  model.dtype = 'bfloat16'  # compute dtype; parameters stay float32
  model.attention = 'auto'  # auto | cudnn | xla
  model.remat = 'none'  # none | block | a jax.checkpoint_policies name
  return model


def data_config() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.source = 'tfds'  # synthetic | tfds | folder
  data.name = config_dict.placeholder(str)  # tfds: the dataset, e.g. imagenet2012 (or name:1.2.3)
  data.data_dir = config_dict.placeholder(str)  # tfds: its data_dir; folder: holds train/ and val/
  # A class-list file: only these classes, numbered in sorted order (HR-IN100 from imagenet2012:
  # atlas_jax/resources/imagenet100_classes.txt; a folder from tools/prepare_hr_in100 needs none).
  data.classes = config_dict.placeholder(str)
  data.workers = 8
  data.max_bad_fraction = 0.01  # stop when more of the examples fail to decode
  data.max_pixels = 200_000_000  # larger: JPEGs decoded reduced, others skipped as bad
  # Memory one decode may allocate, estimated from the header (data/decode.py): larger files are skipped as
  # bad (a baseline JPEG is decoded reduced). 1 GiB each keeps the 8 default workers within 8 GiB in all.
  data.max_decode_bytes = 1 << 30
  # The eval transform (and predict's default): squash (bicubic resize to image_size, the reference's),
  # crop (timm: the shorter side to image_size / crop_pct, bicubic, then the centre image_size) or none (each
  # image at its own size, padded to a batch canvas the model masks; one process only).
  data.resize = 'squash'
  data.crop_pct = 0.875
  # The built-in synthetic task (data.source=synthetic, docs/synthetic_task.md): colour_pairs (label = the XOR
  # of two far-apart squares' 2-bit colour codes, 4 classes) or markers_v1 (the first version: colours
  # differ + 2 * halves differ).
  data.synthetic_task = 'colour_pairs'
  data.synthetic_train_size = 50_000  # examples of the built-in synthetic task
  data.synthetic_val_size = 2_000
  data.augment = augment_config()
  return data


def augment_config() -> ml_collections.ConfigDict:
  """The reference's train augmentation (docs/model.md: timm's transform with `rand-m9-mstd0.5-inc1` and
  random erasing 0.25 in pixel mode) and where the upsampling runs (docs/data.md). Unused by the synthetic
  task."""
  augment = ml_collections.ConfigDict()
  augment.crop_scale = (0.08, 1.0)  # random resized crop: fraction of the area
  augment.crop_ratio = (3 / 4, 4 / 3)  # and width / height, log-uniform
  # The crop's resize: squash (to the canvas, aspect ratio lost; the reference's) or keep (scaled by one
  # factor to fit inside the canvas, at its top-left, the rest padding the model masks).
  augment.aspect = 'squash'
  augment.hflip = 0.5
  augment.randaug_num_ops = 2  # RandAugment over timm's increasing set; 0 = off
  augment.randaug_magnitude = 9.0
  augment.randaug_magnitude_std = 0.5
  augment.randaug_magnitude_max = 10.0
  augment.randaug_prob = 0.5  # each drawn operation applies with this probability
  augment.erase_prob = 0.25  # random erasing of the normalised image; 0 = off
  augment.erase_mode = 'pixel'  # pixel (N(0, 1) each) | rand (per box) | const (0)
  augment.erase_area = (0.02, 1 / 3)
  augment.erase_ratio = (0.3, 1 / 0.3)  # height / width, log-uniform
  augment.erase_count = 1
  # The host crops and augments at most this many pixels per side and the accelerator resizes to
  # image_size; 0 = everything on the host at image_size (the reference's exact order).
  augment.host_max_side = 512
  return augment


def base_config(variant: str, image_size: int | tuple[int, int]) -> ml_collections.ConfigDict:
  """The reference recipe (docs/model.md) for `variant` at `image_size` pixels."""
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  config = ml_collections.ConfigDict()
  config.image_size = tuple(image_size)
  config.model = model_config(variant)
  config.data = data_config()
  config.batch_size = 2048
  config.grad_accum_steps = 8
  config.total_steps = 20_000
  config.warmup_steps = 1_875
  config.lr = 5e-4
  config.min_lr = 1e-6
  config.weight_decay = 0.24
  config.seed = 42
  # clip_grad_norm 0 = no clipping (reference). layer_decay: each layer's learning rate times
  # layer_decay^(layers above it), BEiT/timm's fine-tuning decay (1.0 = off; README: which layer is which).
  # trainable: all, or head (the readout alone: a linear probe through the trainer, backbone frozen).
  config.optimizer = ml_collections.ConfigDict(
    {'b1': 0.9, 'b2': 0.999, 'eps': 1e-8, 'clip_grad_norm': 0.0, 'layer_decay': 1.0, 'trainable': 'all'}
  )
  config.ema = ml_collections.ConfigDict({'decay': 0.0})  # 0 = off; e.g. 0.9998 keeps an EMA of the weights
  # timm's Mixup in batch mode with its label smoothing; both alphas 0 turn mixing off.
  config.mixup = ml_collections.ConfigDict(
    {'mixup_alpha': 0.8, 'cutmix_alpha': 1.0, 'switch_prob': 0.5, 'label_smoothing': 0.1}
  )
  # fsdp_min_size: state leaves with at least this many elements are split over the fsdp axis. spatial: the
  # rows of every image split over this many devices (docs/spatial.md); the batch splits over data x fsdp.
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'spatial': 1, 'fsdp_min_size': 2**18})
  # preemption_sync_steps: in a multi-process run, how often (in steps) the processes agree whether any of
  # them got SIGTERM; one small all-gather each time. A single process checks every step.
  # lock_heartbeat_s, lock_stale_s: WORKDIR/lock's heartbeat interval, and the heartbeat age after which
  # another host's job may take the lock over (atlas_jax/workdir_lock.py).
  config.checkpoint = ml_collections.ConfigDict(
    {
      'every_steps': 1000,
      'keep': 3,
      'async_save': True,
      'preemption_sync_steps': 10,
      'lock_heartbeat_s': 30.0,
      'lock_stale_s': 120.0,
    }
  )
  # batch_size 0 = the training micro-batch (batch_size / grad_accum_steps).
  config.eval = ml_collections.ConfigDict({'every_steps': 1000, 'batch_size': 0})
  config.log = ml_collections.ConfigDict({'every_steps': 50})
  # A jax.profiler trace of `num_steps` steps from `start_step` into WORKDIR/profile; -1 = off.
  config.profile = ml_collections.ConfigDict({'start_step': -1, 'num_steps': 5})
  config.compilation_cache_dir = '~/.cache/atlas_jax/xla'  # '' turns the persistent cache off
  config.mode = 'train'  # train | eval | compile | linear_eval
  # mode=linear_eval: ridge regression on frozen pooled features; the penalty is picked from `l2_grid` on a
  # held-out `holdout_fraction` of the train split, then refit on all of it.
  config.linear_eval = ml_collections.ConfigDict(
    {'holdout_fraction': 0.2, 'l2_grid': (1e-6, 1e-4, 1e-2, 1.0, 100.0), 'max_train_examples': 0}
  )  # max_train_examples 0 = the whole train split
  # mode=compile plans for devices of this many GiB; 0 = the backend's own figure (CPU: host RAM / devices).
  config.device_memory_gib = 0.0
  config.init_from = config_dict.placeholder(str)
  return config
