"""Atlas (docs/model.md): stem, scale pyramid, macro-stages of MSA blocks that drop the finest scale, readout.

Input of any size (docs/any_size.md): `config.image_size` fixes the number of scales and so the parameters;
a canvas of another size is padded to whole windows at every scale, and `sizes` says where each image of
the batch ends. Windowable canvases without `sizes` run exactly today's computation, unmasked.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from atlas_jax.models import geometry as geometry_lib
from atlas_jax.models import layout as layout_lib
from atlas_jax.models.layers import LayerNorm, Linear
from atlas_jax.models.msa import drop_path_rates, map_from_windows, pool_scale, stage_blocks, windows_from_map
from atlas_jax.models.partitioning import spatial_size, split_rows, split_windows
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
  def __call__(self, tokens, pre_logits: bool = False, valid=None):
    """tokens: (batch, tokens, dim) -> logits (batch, num_classes), float32; with `pre_logits` the pooled
    vector the head reads instead, (batch, dim) float32 (timm's forward_head(pre_logits=True)).
    `valid` (batch, tokens) bool: average the valid tokens only (padded input)."""
    x = LayerNorm(dtype=self.dtype, name='readout_norm')(tokens)
    if valid is None:
      x = x.mean(axis=1)
    else:
      x = jnp.where(valid[..., None], x, 0).sum(axis=1) / valid.sum(axis=1, keepdims=True).astype(x.dtype)
    x = LayerNorm(dtype=self.dtype, name='fc_norm')(x)
    if pre_logits:
      return x.astype(jnp.float32)
    return Linear(self.num_classes, self.dim, dtype=self.dtype, name='head')(x).astype(jnp.float32)


class Atlas(nn.Module):
  """Atlas on images (batch, H, W, 3), NHWC, normalised; every field as docs/design.md's config table."""

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
        num_scales=len(scales),
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

  def geometry(self, images, sizes=None):
    """(the canvas's Geometry, the images padded to it): unpadded for a windowable canvas without `sizes`."""
    tokens_hw = geometry_lib.canvas_tokens(images.shape[1:3], self.patch_size)
    # Spatial parallelism needs rows of windows that divide over its devices: pad rows up to that.
    tokens_hw = geometry_lib.spatial_tokens(tokens_hw, self.window, spatial_size())
    layouts = layout_lib.canvas_layouts(tokens_hw, len(self.layouts), self.window, self.pool)
    return geometry_lib.canvas_geometry(
      images, sizes, layouts, self.patch_size, self.window, self.pool, self.parent_window, self.dtype
    )

  def encode(self, images, train: bool = False, sizes=None):
    """Returns (stem map (batch, h, w, dim), per stage the tokens of its scales after it, finest first).

    Tokens of a scale are window-major: (batch * windows, tokens per window, dim). `sizes` (batch, 2) int:
    each image's (height, width) in pixels at the canvas's top-left; None: every image fills the canvas.
    """
    return self.encode_geometry(images, train, sizes)[:2]

  def encode_geometry(self, images, train: bool = False, sizes=None):
    """`encode`'s two results and the Geometry they are laid out in."""
    geometry, images, sizes = self.geometry(images, sizes)
    stem_map = split_rows(self.stem(split_rows(images.astype(self.dtype)), train, sizes))
    maps = [stem_map]
    for scale in range(1, len(geometry.layouts)):
      maps.append(split_rows(pool_scale(maps[-1], geometry, scale, self.pool)))  # pooled where it lies
    tokens = [
      split_windows(windows_from_map(token_map, layout.window_height, layout.window_width), layout.grid[0])
      for token_map, layout in zip(maps, geometry.layouts)
    ]
    stages = []
    for scales, depth, stage in zip(self.stage_scales, self.depths, self.stages):
      # Drop path restarts in every stage: linspace(0, rate, depth), as the reference.
      rates = drop_path_rates(depth, self.drop_path_rate)
      current, _ = stage([tokens[s] for s in scales], not train, rates, geometry.select(scales))
      for s, updated in zip(scales, current):
        tokens[s] = updated
      stages.append(current)
    return stem_map, stages, geometry

  def __call__(self, images, train: bool = False, sizes=None):
    """images (batch, H, W, 3) -> logits (batch, num_classes), float32."""
    _, stages, geometry = self.encode_geometry(images, train, sizes)
    return self.classify(stages[-1], geometry=geometry)

  def pre_logits(self, images, sizes=None):
    """images (batch, H, W, 3) -> the pooled vector the head reads, (batch, dim) float32 (inference)."""
    _, stages, geometry = self.encode_geometry(images, False, sizes)
    return self.classify(stages[-1], pre_logits=True, geometry=geometry)

  def features(self, images, train: bool = False, sizes=None):
    """Every scale as a map (batch, height, width, dim), finest first, for detection or segmentation heads.

    Padded input gives the canvas's padded maps with zeros where an image has no valid token; image b's
    valid region at scale s is `layout.valid_token_sides(sizes[b], patch_size, num_scales, pool)[s]`."""
    _, stages, geometry = self.encode_geometry(images, train, sizes)
    return self.scale_maps(stages, geometry)

  def scale_maps(self, stages, geometry=None):
    """`encode`'s per-stage tokens -> every scale as a map (batch, height, width, dim), finest first.

    Each scale comes from the end of the last stage that processes it: with `atlas` composition, scale s
    from stage s, which drops it, and the scales the last stage keeps from the last stage.
    """
    geometry = geometry or geometry_lib.Geometry(self.layouts)
    latest = {}
    for scales, stage_tokens in zip(self.stage_scales, stages):
      latest.update(zip(scales, stage_tokens))
    maps = [
      map_from_windows(latest[scale], layout.height, layout.width, layout.window_height, layout.window_width)
      for scale, layout in enumerate(geometry.layouts)
    ]
    if geometry.padded:
      maps = [jnp.where(valid[..., None], token_map, 0) for token_map, valid in zip(maps, geometry.valid)]
    return maps

  def classify(self, last_stage_scales, pre_logits: bool = False, geometry=None):
    """Readout over the tokens of every scale present at the end (each (batch * windows, tokens, dim)).

    `geometry`: the canvas's (encode_geometry's third result); None for today's unpadded `image_size`."""
    geometry = geometry or geometry_lib.Geometry(self.layouts)
    batch = last_stage_scales[-1].shape[0] // geometry.layouts[-1].num_windows
    per_image = [scale.reshape(batch, -1, scale.shape[-1]) for scale in last_stage_scales]
    valid = None
    if geometry.padded:
      last_scales = self.stage_scales[-1]
      valid = jnp.concatenate([geometry.valid_windows[s].reshape(batch, -1) for s in last_scales], axis=1)
    return self.readout(jnp.concatenate(per_image, axis=1), pre_logits, valid)
