"""Baselines on Atlas's own stem, MSA block and readout, so experiments compare like with like.

Both run all `sum(depths)` blocks on the finest scale alone (one scale: no pooled summaries, no top-down
or bottom-up), differing only in the window:
- `ViT`: one window holding every token, so attention is global. The block's position MLP then sees
  whole-image coordinates: it is a global position embedding, re-added every block, and nothing else is
  needed.
- `WindowViT`: Atlas's 16x16 windows, never communicating. The block's window-local MLP gives no global
  position (every window looks the same), so a `PositionMLP` on whole-image coordinates is added once after
  the stem, the continuous analogue of ViT's learned absolute embedding that works at any resolution.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from atlas_jax.models import geometry as geometry_lib
from atlas_jax.models import layout as layout_lib
from atlas_jax.models.atlas import Readout, make_stem
from atlas_jax.models.layers import PositionMLP
from atlas_jax.models.msa import drop_path_rates, map_from_windows, stage_blocks, windows_from_map
from atlas_jax.models.partitioning import spatial_size, split_rows


class _SingleScale(nn.Module):
  """Stem -> sum(depths) MSA blocks on the finest scale cut into `_layout()` windows -> readout."""

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
  drop_path_rate: float = 0.0
  attention: str = 'auto'
  remat: str = 'none'
  dtype: Any = jnp.float32

  def _layout(self, tokens_hw) -> layout_lib.ScaleLayout:
    """The one scale's layout for a canvas of `tokens_hw` tokens."""
    raise NotImplementedError

  def _add_global_position(self, token_map, geometry, sizes):
    return token_map

  def setup(self):
    self.stem = make_stem(
      self.patch_size, self.dim, self.stem_width, self.stem_in_dim, self.dtype, self.remat
    )
    self.blocks = stage_blocks(
      sum(self.depths),
      self.remat,
      name='stage0_blocks',
      num_scales=1,
      dim=self.dim,
      num_heads=self.num_heads,
      mlp_ratio=self.mlp_ratio,
      drop_path_rate=self.drop_path_rate,
      pool=self.pool,
      attention=self.attention,
      dtype=self.dtype,
    )
    self.readout = Readout(self.dim, self.num_classes, self.dtype, name='readout')

  def encode_geometry(self, images, train: bool = False, sizes=None):
    """(stem map, [[finest-scale tokens (batch * windows, tokens, dim)]], Geometry), as Atlas's."""
    layout = self._layout(geometry_lib.canvas_tokens(images.shape[1:3], self.patch_size))
    if isinstance(self, WindowViT):  # rows of windows that divide over the spatial devices (padding)
      tokens_hw = geometry_lib.spatial_tokens((layout.height, layout.width), self.window, spatial_size())
      layout = self._layout(tokens_hw)
    geometry, images, sizes = geometry_lib.canvas_geometry(
      images,
      sizes,
      (layout,),
      self.patch_size,
      self.window,
      self.pool,
      dtype=self.dtype,
      whole_window=isinstance(self, ViT),
    )
    stem_map = split_rows(self.stem(split_rows(images.astype(self.dtype)), train, sizes))
    tokens = windows_from_map(
      self._add_global_position(stem_map, geometry, sizes), layout.window_height, layout.window_width
    )
    rates = drop_path_rates(sum(self.depths), self.drop_path_rate)
    tokens = self.blocks([tokens], not train, rates, geometry)[0][0]
    return stem_map, [[tokens]], geometry

  def encode(self, images, train: bool = False, sizes=None):
    """Same contract as Atlas.encode: (stem map, [[finest-scale tokens (batch * windows, tokens, dim)]])."""
    return self.encode_geometry(images, train, sizes)[:2]

  def __call__(self, images, train: bool = False, pre_logits: bool = False, sizes=None):
    _, stages, geometry = self.encode_geometry(images, train, sizes)
    tokens = stages[-1][0]
    batch = tokens.shape[0] // geometry.layouts[0].num_windows
    valid = geometry.valid_windows[0].reshape(batch, -1) if geometry.padded else None
    return self.readout(tokens.reshape(batch, -1, self.dim), pre_logits, valid)

  def pre_logits(self, images, sizes=None):
    """images (batch, H, W, 3) -> the pooled vector the head reads, (batch, dim) float32 (inference)."""
    return self(images, pre_logits=True, sizes=sizes)

  def features(self, images, train: bool = False, sizes=None):
    """The one scale as a map: [(batch, height, width, dim)], the same contract as Atlas.features."""
    _, stages, geometry = self.encode_geometry(images, train, sizes)
    layout = geometry.layouts[0]
    token_map = map_from_windows(
      stages[-1][0], layout.height, layout.width, layout.window_height, layout.window_width
    )
    if geometry.padded:
      token_map = jnp.where(geometry.valid[0][..., None], token_map, 0)
    return [token_map]


class ViT(_SingleScale):
  """Global attention over all tokens of the finest scale."""

  def _layout(self, tokens_hw):
    height, width = tokens_hw
    return layout_lib.ScaleLayout(height, width, height, width)


class WindowViT(_SingleScale):
  """Window attention on the finest scale only, plus a global position MLP added once."""

  def _layout(self, tokens_hw):
    return layout_lib.canvas_layouts(tokens_hw, 1, self.window, self.pool)[0]

  def setup(self):
    layout_lib.check_image_size(self.image_size, self.patch_size, self.window, self.pool)
    super().setup()
    self.global_position = PositionMLP(self.dim, dtype=self.dtype)

  def _add_global_position(self, token_map, geometry, sizes):
    """Whole-image coordinates: each image's own valid token map spans [-1, 1) (padding beyond it)."""
    height, width = token_map.shape[1:3]
    if not geometry.padded:
      whole_map = layout_lib.ScaleLayout(height, width, height, width)
      coordinates = jnp.asarray(layout_lib.window_coordinates(whole_map), self.dtype)
      position = self.global_position(coordinates)
      return token_map + position.reshape(height, width, self.dim).astype(token_map.dtype)
    valid_tokens = -(-sizes // self.patch_size)  # (batch, 2)
    rows = layout_lib.normalized_coordinates(jnp.arange(height, dtype=self.dtype)[None], valid_tokens[:, :1])
    cols = layout_lib.normalized_coordinates(jnp.arange(width, dtype=self.dtype)[None], valid_tokens[:, 1:])
    coordinates = jnp.stack(
      [
        jnp.broadcast_to(rows[:, :, None], (rows.shape[0], height, width)),
        jnp.broadcast_to(cols[:, None, :], (cols.shape[0], height, width)),
      ],
      axis=-1,
    ).astype(self.dtype)  # (batch, height, width, 2)
    position = self.global_position(coordinates)
    return token_map + jnp.where(geometry.valid[0][..., None], position, 0).astype(token_map.dtype)
