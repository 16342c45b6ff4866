"""Models by name from `config.model`: `atlas`, `vit`, `window_vit`.

`resolve_model_config` fills the derived fields (dim, heads and stem width from the variant, depths from
the number of scales) so that a stored config says exactly what was built; an explicit value always wins.
"""

import copy

import jax.numpy as jnp
import ml_collections

from atlas_jax.models import layout as layout_lib
from atlas_jax.models.atlas import Atlas
from atlas_jax.models.baselines import ViT, WindowViT

VARIANTS = {  # dim, num_heads, stem_width (ATLAS.md §9)
    'T': (192, 3, 48),
    'S': (384, 6, 96),
    'B': (768, 12, 192),
}
MODELS = {'atlas': Atlas, 'vit': ViT, 'window_vit': WindowViT}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def default_depths(num_scales: int) -> tuple[int, ...]:
  """12 blocks split by the number of scales: (12), (2, 10), (2, 2, 8), (2, 2, 2, 6), ..."""
  return (2,) * (num_scales - 1) + (12 - 2 * (num_scales - 1),)


def image_size_of(config) -> tuple[int, int]:
  """`config.image_size` as (H, W); a single number (`--config.image_size=2048`) means a square."""
  size = config.image_size
  size = (size,) if isinstance(size, int) else tuple(size)
  if len(size) == 1:
    size = size * 2
  if len(size) != 2 or any(not isinstance(side, int) or side <= 0 for side in size):
    raise ValueError(f'image_size must be (H, W) in pixels or one number for a square, got {config.image_size!r}')
  return size


def resolve_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with image_size as (H, W) and every derived model field set."""
  config = copy.deepcopy(config)
  config.image_size = image_size_of(config)
  model = config.model
  if model.name not in MODELS:
    raise ValueError(f'model.name must be one of {sorted(MODELS)}, got {model.name!r}')
  if model.variant not in VARIANTS:
    raise ValueError(f'model.variant must be one of {sorted(VARIANTS)}, got {model.variant!r}')
  dim, num_heads, stem_width = VARIANTS[model.variant]
  model.dim = dim if model.dim is None else model.dim
  model.num_heads = num_heads if model.num_heads is None else model.num_heads
  model.stem_width = stem_width if model.stem_width is None else model.stem_width
  if model.dim % model.num_heads:
    raise ValueError(f'model.dim {model.dim} is not divisible by model.num_heads {model.num_heads}')
  if model.dtype not in DTYPES:
    raise ValueError(f'model.dtype must be one of {sorted(DTYPES)}, got {model.dtype!r}')
  layouts = layout_lib.check_image_size(config.image_size, model.patch_size, model.window, model.pool)
  if model.depths is None:
    model.depths = default_depths(len(layouts))
  model.depths = tuple(int(depth) for depth in model.depths)
  if not model.depths or min(model.depths) < 1:
    raise ValueError(f'model.depths must be positive block counts, got {model.depths}')
  if model.name == 'atlas':
    layout_lib.stage_scales(len(layouts), model.depths, model.composition)
  return config


def build_model(config: ml_collections.ConfigDict, dtype: str | None = None):
  """The Flax module `config.model` describes; `dtype` overrides the compute dtype (e.g. float32 on CPU)."""
  config = resolve_model_config(config)
  model = config.model
  fields = dict(image_size=config.image_size, dim=model.dim, num_heads=model.num_heads, depths=model.depths,
                stem_width=model.stem_width, num_classes=model.num_classes, stem_in_dim=model.stem_in_dim,
                patch_size=model.patch_size, window=model.window, pool=model.pool, mlp_ratio=model.mlp_ratio,
                drop_path_rate=model.drop_path_rate, attention=model.attention, remat=model.remat,
                dtype=DTYPES[dtype or model.dtype])
  if model.name == 'atlas':
    fields.update(parent_window=model.parent_window, communication=model.communication,
                  composition=model.composition)
  return MODELS[model.name](**fields)
