"""Atlas-B at 2048 px on HR-IN100, the reference recipe.

python -m atlas_jax.main --config=configs/atlas_b_2048.py --workdir=WORKDIR
"""

try:  # an installed atlas_jax ships the configs as atlas_jax.configs
  from atlas_jax.configs import common
except ModuleNotFoundError:  # a source checkout: the repository's configs/ folder
  from configs import common


def get_config(arg=None):
  del arg  # no arguments: override fields with --config.FIELD=VALUE
  return common.base_config('B', 2048)
