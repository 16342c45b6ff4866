"""python -m atlas_jax.main --config=configs/quickstart.py --workdir=/tmp/atlas_quickstart

A small Atlas on the built-in synthetic long-range task (docs/synthetic_task.md): 64 px images, a
patchify stem (patch 4: 16 x 16 tokens), windows of 4 x 4 tokens and a 4 x 4 pool, so two scales: 16
windows of the finest and one window over the whole image. It needs no download and learns on two CPU
cores in minutes. `:model=window_vit` trains the same blocks on windows only, the baseline that cannot
relate the two far-apart markers.
"""

try:  # an installed atlas_jax ships the configs as atlas_jax.configs
  from atlas_jax.configs import common
except ModuleNotFoundError:  # a source checkout: the repository's configs/ folder
  from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, model='atlas', steps=500)
  config = common.base_config('T', 64)
  config.model.update(
    name=args.model,
    patch_size=4,
    window=4,
    pool=4,
    dim=64,
    num_heads=2,
    depths=(2, 2),
    num_classes=4,
    drop_path_rate=0.0,
    dtype='float32',
  )  # XLA's CPU backend runs bfloat16 matmuls slower than float32
  config.data.source = 'synthetic'
  config.data.synthetic_task = 'colour_pairs'
  config.data.workers = 2
  config.batch_size = 16
  config.grad_accum_steps = 1
  config.total_steps = args.steps
  config.warmup_steps = min(40, args.steps // 10)
  config.lr = 2e-3
  config.min_lr = 5e-4  # a short run: keep learning to the end
  config.weight_decay = 0.05
  # Mixup and CutMix blend or cut away the markers the labels are about: off for this task.
  config.mixup.update(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
  config.checkpoint.every_steps = 200
  config.eval.every_steps = 100
  config.eval.batch_size = 250
  config.data.synthetic_val_size = 1000
  config.log.every_steps = 50
  return config
