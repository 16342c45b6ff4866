"""Atlas (ATLAS.md §2): stem, scale pyramid, macro-stages of MSA blocks that drop the finest scale, readout."""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from atlas_jax.models import layout as layout_lib
from atlas_jax.models.layers import LayerNorm, Linear
from atlas_jax.models.msa import drop_path_rates, map_from_windows, max_pool, stage_blocks, windows_from_map
from atlas_jax.models.stem import ConvStem, PatchifyStem

REMAT_POLICIES = ('none', 'block')


def make_stem(
  patch_size: int, dim: int, stem_width: int, stem_in_dim: int, dtype, remat: str = 'none', name='stem'
):
  if patch_size == 16:
    return ConvStem(dim=dim, width=stem_width, in_dim=stem_in_dim, remat=remat, dtype=dtype, name=name)
  if patch_size in (4, 8):
    return PatchifyStem(dim=dim, patch_size=patch_size, dtype=dtype, name=name)
  raise ValueError(f'model.patch_size must be 16 (conv stem) or 4 or 8 (patchify stem), got {patch_size}')


class Readout(nn.Module):
  """LayerNorm -> mean over tokens -> LayerNorm -> Linear, as the reference's forward_head."""

  dim: int
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, pre_logits: bool = False):
    """tokens: (batch, tokens, dim) -> logits (batch, num_classes), float32; with `pre_logits` the pooled
    vector the head reads instead, (batch, dim) float32 (timm's forward_head(pre_logits=True))."""
    x = LayerNorm(dtype=self.dtype, name='readout_norm')(tokens).mean(axis=1)
    x = LayerNorm(dtype=self.dtype, name='fc_norm')(x)
    if pre_logits:
      return x.astype(jnp.float32)
    return Linear(self.num_classes, self.dim, dtype=self.dtype, name='head')(x).astype(jnp.float32)


class Atlas(nn.Module):
  """Atlas on images (batch, H, W, 3), NHWC, normalised; every field as DESIGN.md's model config."""

  image_size: Sequence[int]
  dim: int
  num_heads: int
  depths: Sequence[int]
  stem_width: int
  num_classes: int = 100
  stem_in_dim: int = 64
  patch_size: int = 16
  window: int = 16
  pool: int = 4
  mlp_ratio: int = 4
  parent_window: str = 'spatial'
  communication: str = 'full'
  composition: str = 'atlas'
  drop_path_rate: float = 0.0
  attention: str = 'auto'
  remat: str = 'none'
  dtype: Any = jnp.float32

  def setup(self):
    self.layouts = layout_lib.check_image_size(self.image_size, self.patch_size, self.window, self.pool)
    self.stage_scales = layout_lib.stage_scales(len(self.layouts), self.depths, self.composition)
    self.stem = make_stem(
      self.patch_size, self.dim, self.stem_width, self.stem_in_dim, self.dtype, self.remat
    )
    # One scanned module per stage, `stage{k}_blocks`, its parameters stacked (depth, ...).
    self.stages = [
      stage_blocks(
        depth,
        self.remat,
        name=f'stage{stage}_blocks',
        layouts=tuple(self.layouts[s] for s in scales),
        dim=self.dim,
        num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio,
        drop_path_rate=self.drop_path_rate,
        parent_window=self.parent_window,
        communication=self.communication,
        pool=self.pool,
        attention=self.attention,
        dtype=self.dtype,
      )
      for stage, (depth, scales) in enumerate(zip(self.depths, self.stage_scales))
    ]
    self.readout = Readout(self.dim, self.num_classes, self.dtype, name='readout')

  def encode(self, images, train: bool = False):
    """Returns (stem map (batch, h, w, dim), per stage the tokens of its scales after it, finest first).

    Tokens of a scale are window-major: (batch * windows, tokens per window, dim).
    """
    stem_map = self.stem(images.astype(self.dtype), train)
    maps = [stem_map]
    for _ in self.layouts[1:]:
      maps.append(max_pool(maps[-1], self.pool))
    tokens = [
      windows_from_map(token_map, layout.window_height, layout.window_width)
      for token_map, layout in zip(maps, self.layouts)
    ]
    stages = []
    for scales, depth, stage in zip(self.stage_scales, self.depths, self.stages):
      # Drop path restarts in every stage: linspace(0, rate, depth), as the reference.
      rates = drop_path_rates(depth, self.drop_path_rate)
      current, _ = stage([tokens[s] for s in scales], not train, rates)
      for s, updated in zip(scales, current):
        tokens[s] = updated
      stages.append(current)
    return stem_map, stages

  def __call__(self, images, train: bool = False):
    """images (batch, H, W, 3) -> logits (batch, num_classes), float32."""
    return self.classify(self.encode(images, train)[1][-1])

  def pre_logits(self, images):
    """images (batch, H, W, 3) -> the pooled vector the head reads, (batch, dim) float32 (inference)."""
    return self.classify(self.encode(images)[1][-1], pre_logits=True)

  def features(self, images, train: bool = False):
    """Every scale as a map (batch, height, width, dim), finest first, for detection or segmentation heads."""
    return self.scale_maps(self.encode(images, train)[1])

  def scale_maps(self, stages):
    """`encode`'s per-stage tokens -> every scale as a map (batch, height, width, dim), finest first.

    Each scale comes from the end of the last stage that processes it: with `atlas` composition, scale s
    from stage s, which drops it, and the scales the last stage keeps from the last stage.
    """
    latest = {}
    for scales, stage_tokens in zip(self.stage_scales, stages):
      latest.update(zip(scales, stage_tokens))
    return [
      map_from_windows(latest[scale], layout.height, layout.width, layout.window_height, layout.window_width)
      for scale, layout in enumerate(self.layouts)
    ]

  def classify(self, last_stage_scales, pre_logits: bool = False):
    """Readout over the tokens of every scale present at the end (each (batch * windows, tokens, dim))."""
    batch = last_stage_scales[-1].shape[0] // self.layouts[-1].num_windows
    per_image = [scale.reshape(batch, -1, scale.shape[-1]) for scale in last_stage_scales]
    return self.readout(jnp.concatenate(per_image, axis=1), pre_logits)
