"""Atlas-S at 4096 px on HR-IN100, the reference recipe.

python -m atlas_jax.main --config=configs/atlas_s_4096.py --workdir=WORKDIR
"""

from configs import common


def get_config(arg=None):
  del arg  # no arguments: override fields with --config.FIELD=VALUE
  return common.base_config('S', 4096)
