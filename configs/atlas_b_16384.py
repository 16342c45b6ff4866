"""Atlas-B at 16384 px (268 megapixels, a million scale-0 tokens), every image split over the devices.

python -m atlas_jax.main --config=configs/atlas_b_16384.py --workdir=WORKDIR

Four scales (1024x1024 tokens at scale 0 in 64x64 windows of 16x16, then 256x256, 64x64 and one 16x16
window; docs/spatial.md), the default depths (2, 2, 2, 6), every block and stem unit rematerialised, and the rows of
each image split over all devices (mesh.spatial=-1, one data-parallel group): 8 images per step in 8
micro-batches of one. Images reach the model at full resolution: nothing is decoded reduced below 16384^2
pixels and the host crops and augments at full size.
"""

try:  # an installed atlas_jax ships the configs as atlas_jax.configs
  from atlas_jax.configs import common
except ModuleNotFoundError:  # a source checkout: the repository's configs/ folder
  from configs import common


def get_config(arg=None):
  del arg  # no arguments: override fields with --config.FIELD=VALUE
  config = common.base_config('B', 16384)
  config.model.remat = 'block'
  config.batch_size = 8
  config.grad_accum_steps = 8
  config.mesh.update(data=1, fsdp=1, spatial=-1)
  config.data.max_pixels = 16384 * 16384  # 268,435,456: a full-size image is decoded whole
  config.data.augment.host_max_side = 0  # the host makes the full 16384 px crop; no device upsampling
  return config
