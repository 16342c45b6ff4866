"""Models by name from a resolved `config.model` (atlas_jax.config.resolve): `atlas`, `vit`, `window_vit`.

`VARIANTS` and `default_depths` are the facts the config resolver derives the model's fields from; here the
fields are only read, so what a stored config says is exactly what is built.
"""

import jax.numpy as jnp

from atlas_jax.models.atlas import Atlas
from atlas_jax.models.baselines import ViT, WindowViT

VARIANTS = {  # dim, num_heads, stem_width (docs/model.md, "Variants and sizes")
  'T': (192, 3, 48),
  'S': (384, 6, 96),
  'B': (768, 12, 192),
}
MODELS = {'atlas': Atlas, 'vit': ViT, 'window_vit': WindowViT}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def default_depths(num_scales: int) -> tuple[int, ...]:
  """12 blocks split by the number of scales: (12), (2, 10), (2, 2, 8), (2, 2, 2, 6), ..."""
  return (2,) * (num_scales - 1) + (12 - 2 * (num_scales - 1),)


def build_model(config, dtype: str | None = None):
  """The Flax module a resolved `config.model` describes; `dtype` overrides the compute dtype."""
  model = config.model
  if model.dim is None or model.depths is None or isinstance(config.image_size, int):
    raise TypeError('build_model takes a resolved config: pass atlas_jax.config.resolve(config)')
  fields = dict(
    image_size=tuple(config.image_size),
    dim=model.dim,
    num_heads=model.num_heads,
    depths=tuple(model.depths),
    stem_width=model.stem_width,
    num_classes=model.num_classes,
    stem_in_dim=model.stem_in_dim,
    patch_size=model.patch_size,
    window=model.window,
    pool=model.pool,
    mlp_ratio=model.mlp_ratio,
    drop_path_rate=model.drop_path_rate,
    attention=model.attention,
    remat=model.remat,
    dtype=DTYPES[dtype or model.dtype],
  )
  if model.name == 'atlas':
    fields.update(
      parent_window=model.parent_window, communication=model.communication, composition=model.composition
    )
  return MODELS[model.name](**fields)
