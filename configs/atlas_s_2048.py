"""Atlas-S at 2048 px on HR-IN100, the reference recipe.

python -m atlas_jax.main --config=configs/atlas_s_2048.py --workdir=WORKDIR
"""

from configs import common


def get_config(arg=None):
  del arg  # no arguments: override fields with --config.FIELD=VALUE
  return common.base_config('S', 2048)
