"""The Multi-Scale Attention block (docs/model.md, "The MSA block"), as the reference codes it.

One MSA block holds, per scale, a position MLP and a `ScaleBlock` (norms, q/kv/proj, MLP). It runs:
  (a) position MLP added to every scale;
  (b) pooled summaries, fine to coarse: scale s+1 += maxpool(scale s), cumulatively;
  (c) top-down, coarse to fine: each scale attends to its own window plus the covering window of every
      coarser, already updated scale (K/V of a scale made once, by its own norm and projection);
  (d) bottom-up, fine to coarse: the coarse tokens above each fine window attend to that window's
      tokens, then go through their MLP a second time.
`communication` switches (c)'s coarser K/V and step (d) off; (a) and (b) always run. Padded input
(docs/any_size.md) runs the same steps with masks: each image's own position coordinates in (a), padded
tokens excluded from the max in (b), padded keys excluded from every attention in (c) and (d).

The blocks of a stage share their layouts, so `stage_blocks` scans them: the compiler sees one block body
per stage however deep it is, and the parameters of the stage's blocks are stacked on a leading axis.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from atlas_jax.models import layout as layout_lib
from atlas_jax.models.attention import dot_product_attention
from atlas_jax.models.geometry import Geometry, attendable
from atlas_jax.models.layers import DropPath, LayerNorm, Linear, Mlp, PositionMLP, remat_policy
from atlas_jax.models.partitioning import split_rows, split_windows

COMMUNICATIONS = ('full', 'top_down', 'bottom_up', 'none')


def windows_from_map(token_map, window_height: int, window_width: int):
  """(batch, H, W, C) -> (batch * windows, window_height * window_width, C), windows in raster order."""
  batch, height, width, channels = token_map.shape
  rows, cols = height // window_height, width // window_width
  x = token_map.reshape(batch, rows, window_height, cols, window_width, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch * rows * cols, window_height * window_width, channels)


def map_from_windows(windows, height: int, width: int, window_height: int, window_width: int):
  """(batch * windows, window_height * window_width, C) -> (batch, H, W, C); inverse of windows_from_map."""
  rows, cols = height // window_height, width // window_width
  channels = windows.shape[-1]
  x = windows.reshape(-1, rows, cols, window_height, window_width, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, height, width, channels)


def max_pool(token_map, pool: int):
  """(batch, H, W, C) -> (batch, H / pool, W / pool, C), stride = kernel = pool."""
  batch, height, width, channels = token_map.shape
  x = token_map.reshape(batch, height // pool, pool, width // pool, pool, channels)
  return x.max(axis=(2, 4))


def pool_scale(fine_map, geometry: Geometry, scale: int, pool: int):
  """Scale `scale - 1`'s map (batch, H, W, C) -> scale `scale`'s (batch, h, w, C), max-pooled by `pool`.

  With padding, padded fine tokens never win the max, the pooled map is padded to the coarse layout, and
  padded coarse tokens are zero."""
  if not geometry.padded:
    return max_pool(fine_map, pool)
  lowest = jnp.finfo(fine_map.dtype).min
  pooled = max_pool(jnp.where(geometry.valid[scale - 1][..., None], fine_map, lowest), pool)
  coarse = geometry.layouts[scale]
  pooled = _pad_map(pooled, coarse.height, coarse.width)
  return jnp.where(geometry.valid[scale][..., None], pooled, jnp.zeros((), pooled.dtype))


class ScaleBlock(nn.Module):
  """The per-scale weights of an MSA block (the reference's CrossWindowBlock), pre-norm."""

  dim: int
  num_heads: int
  mlp_ratio: int = 4
  drop_path_rate: float = 0.0
  attention: str = 'auto'
  dtype: Any = jnp.float32

  def setup(self):
    self.norm_q = LayerNorm(dtype=self.dtype)
    self.norm_kv = LayerNorm(dtype=self.dtype)
    self.q = Linear(self.dim, self.dim, dtype=self.dtype)
    self.kv = Linear(2 * self.dim, self.dim, dtype=self.dtype)
    self.proj = Linear(self.dim, self.dim, dtype=self.dtype)
    self.norm_mlp = LayerNorm(dtype=self.dtype)
    self.mlp = Mlp(self.dim, self.mlp_ratio * self.dim, dtype=self.dtype)
    self.drop_path = DropPath(self.drop_path_rate)

  def keys_values(self, tokens):
    """(rows, tokens, dim) -> keys, values: (rows, tokens, heads, head_dim) each, from this scale's norm."""
    rows, length, _ = tokens.shape
    kv = self.kv(self.norm_kv(tokens)).reshape(rows, length, 2, self.num_heads, self.dim // self.num_heads)
    return kv[:, :, 0], kv[:, :, 1]

  def __call__(self, tokens, keys, values, deterministic: bool, drop_path_rate=None, key_mask=None):
    """Attention of `tokens` to (keys, values), then the MLP; both residual with drop path per row.

    `drop_path_rate` (a scalar, possibly traced) overrides the field's rate, as a scanned stage passes it.
    `key_mask` (rows, keys) bool: the keys each row may attend to (padded input); None attends to all."""
    rows, length, _ = tokens.shape
    query = self.q(self.norm_q(tokens)).reshape(rows, length, self.num_heads, self.dim // self.num_heads)
    attended = dot_product_attention(
      query, keys.astype(query.dtype), values.astype(query.dtype), self.attention, key_mask
    )
    attended = self.proj(attended.reshape(rows, length, self.dim))
    tokens = tokens + self.drop_path(attended, deterministic, drop_path_rate)
    return tokens + self.drop_path(self.mlp(self.norm_mlp(tokens)), deterministic, drop_path_rate)


class MSABlock(nn.Module):
  """One Multi-Scale Attention block over `num_scales` scales (finest first), window-major tokens.

  The layouts come with each call (a `geometry.Geometry`): the parameters depend only on the number of
  scales, so one set of weights serves every canvas. A padded geometry masks what is padding: padded
  tokens are zeroed on entry, never pooled, never attended to.
  """

  num_scales: int
  dim: int
  num_heads: int
  mlp_ratio: int = 4
  drop_path_rate: float = 0.0
  parent_window: str = 'spatial'
  communication: str = 'full'
  pool: int = 4
  attention: str = 'auto'
  dtype: Any = jnp.float32

  def setup(self):
    if self.communication not in COMMUNICATIONS:
      raise ValueError(f'model.communication must be one of {COMMUNICATIONS}, got {self.communication!r}')
    self.positions = [
      PositionMLP(self.dim, dtype=self.dtype, name=f'position{s}') for s in range(self.num_scales)
    ]
    self.scales = [
      ScaleBlock(
        self.dim,
        self.num_heads,
        self.mlp_ratio,
        self.drop_path_rate,
        self.attention,
        self.dtype,
        name=f'scale{s}',
      )
      for s in range(self.num_scales)
    ]

  def __call__(self, scales, geometry: Geometry, deterministic: bool = True, drop_path_rate=None):
    """scales[s]: (batch * windows_s, tokens_s, dim) -> the same shapes, updated.

    `drop_path_rate` overrides the field's rate (the field then only says whether drop path exists)."""
    layouts = geometry.layouts
    padded = geometry.padded
    top_down = self.communication in ('full', 'top_down')
    bottom_up = self.communication in ('full', 'bottom_up')
    # Spatial parallelism: every scale split in bands of windows where its rows divide (partitioning.py).
    scales = [split_windows(tokens, layout.grid[0]) for tokens, layout in zip(scales, layouts)]
    batch = scales[0].shape[0] // layouts[0].num_windows

    # (a) window-local position embedding, re-added in every block; with padding, each image's own.
    for s, layout in enumerate(layouts):
      if not padded:
        coordinates = jnp.asarray(layout_lib.window_coordinates(layout), self.dtype)
        scales[s] = scales[s] + self.positions[s](coordinates).astype(scales[s].dtype)
        continue
      valid = geometry.valid_windows[s][..., None]
      position = self.positions[s](geometry.coordinates[s].astype(self.dtype))  # (batch, tokens, dim)
      per_image = jnp.where(valid, scales[s], 0).reshape((batch, -1) + scales[s].shape[1:])
      scales[s] = (per_image + position[:, None].astype(per_image.dtype)).reshape(scales[s].shape)

    # (b) cumulative pooled summaries, fine to coarse (padded tokens never win a max, nor receive one).
    for s in range(len(layouts) - 1):
      fine, coarse = layouts[s], layouts[s + 1]
      fine_map = map_from_windows(scales[s], fine.height, fine.width, fine.window_height, fine.window_width)
      pooled = split_rows(pool_scale(fine_map, geometry, s + 1, self.pool))  # pooled where it lies
      scales[s + 1] = scales[s + 1] + windows_from_map(pooled, coarse.window_height, coarse.window_width)

    # (c) top-down, coarse to fine; `updated_kv[t]` caches scale t's K/V after its own update.
    updated_kv = {}
    for s in reversed(range(len(layouts))):
      keys, values = (
        split_windows(part, layouts[s].grid[0]) for part in self.scales[s].keys_values(scales[s])
      )
      key_mask = geometry.valid_windows[s] if padded else None
      if top_down:
        key_parts, value_parts, mask_parts = [keys], [values], [key_mask]
        rows = layouts[s].grid[0]
        for t in range(s + 1, len(layouts)):
          parents = layout_lib.parent_windows(
            layouts[s], layouts[t], self.parent_window, self.pool ** (t - s)
          )
          # Each fine window's parents, gathered where that window lies (a coarse scale may be replicated
          # over `spatial`, but what it hands each fine window must not be gathered whole).
          key_parts.append(split_windows(_gather_windows(updated_kv[t][0], parents, batch), rows))
          value_parts.append(split_windows(_gather_windows(updated_kv[t][1], parents, batch), rows))
          if padded:
            mask_parts.append(split_windows(_gather_windows(geometry.valid_windows[t], parents, batch), rows))
        keys, values = jnp.concatenate(key_parts, axis=1), jnp.concatenate(value_parts, axis=1)
        if padded:
          key_mask = jnp.concatenate(mask_parts, axis=1)
      if padded:
        key_mask = attendable(key_mask)
      scales[s] = self.scales[s](scales[s], keys, values, deterministic, drop_path_rate, key_mask)
      if top_down and s > 0:
        updated_kv[s] = self.scales[s].keys_values(scales[s])

    # (d) bottom-up, fine to coarse: coarse queries grouped by the fine window they sit above. With
    # padding the coarse map may extend past the pooled fine map; that part is padding and stays as it is.
    if bottom_up:
      for s in range(1, len(layouts)):
        fine, coarse = layouts[s - 1], layouts[s]
        keys, values = self.scales[s - 1].keys_values(scales[s - 1])
        # The fine windows' keys stay where their windows are, beside the queries above them.
        keys, values = (split_windows(part, fine.grid[0]) for part in (keys, values))
        key_mask = attendable(geometry.valid_windows[s - 1]) if padded else None
        coarse_map = map_from_windows(
          scales[s], coarse.height, coarse.width, coarse.window_height, coarse.window_width
        )
        above_height, above_width = fine.height // self.pool, fine.width // self.pool
        query_height, query_width = fine.window_height // self.pool, fine.window_width // self.pool
        above = coarse_map[:, :above_height, :above_width]
        queries = windows_from_map(above, query_height, query_width)  # (batch * fine windows, 16, dim)
        queries = split_windows(queries, fine.grid[0])  # laid out as the fine windows they sit above
        queries = self.scales[s](queries, keys, values, deterministic, drop_path_rate, key_mask)
        above = map_from_windows(queries, above_height, above_width, query_height, query_width)
        if (above_height, above_width) != (coarse.height, coarse.width):
          coarse_map = coarse_map.at[:, :above_height, :above_width].set(above)
        else:
          coarse_map = above
        scales[s] = windows_from_map(coarse_map, coarse.window_height, coarse.window_width)
    return [split_windows(tokens, layout.grid[0]) for tokens, layout in zip(scales, layouts)]


class StageBlock(MSABlock):
  """One block of a scanned stage: the carry is the scales, the scanned input the block's drop path rate,
  the geometry broadcast to every block."""

  def __call__(self, scales, deterministic: bool, drop_path_rate, geometry: Geometry):
    return MSABlock.__call__(self, scales, geometry, deterministic, drop_path_rate), None


def stage_blocks(depth: int, remat: str = 'none', name=None, **block_fields):
  """`depth` MSA blocks as one module, scanned: (scales, deterministic, rates, geometry) -> (scales, None).

  Every parameter gets a leading axis of `depth` (block i at index i). `rates` (depth,) are the blocks'
  drop path rates; `block_fields['drop_path_rate']` is their maximum, 0 meaning no drop path at all. With
  `remat` each block is rematerialised, so the backward pass keeps only the scales between blocks.
  """
  block = StageBlock
  if remat != 'none':
    # prevent_cse=False: inside a scan the loop already keeps XLA from merging the recomputation away.
    block = nn.remat(StageBlock, static_argnums=(2,), policy=remat_policy(remat), prevent_cse=False)
  scanned = nn.scan(
    block,
    variable_axes={'params': 0},
    split_rngs={'params': True, 'dropout': True},
    in_axes=(nn.broadcast, 0, nn.broadcast),
    length=depth,
  )
  return scanned(name=name, **block_fields)


def drop_path_rates(depth: int, rate: float):
  """linspace(0, rate, depth) as float32, the reference's per-block rates within a stage."""
  return jnp.asarray(np.linspace(0.0, rate, depth), jnp.float32)


def _pad_map(token_map, height: int, width: int):
  """(batch, h, w, C) -> (batch, height, width, C), zeros below and to the right."""
  extra_rows, extra_cols = height - token_map.shape[1], width - token_map.shape[2]
  if not extra_rows and not extra_cols:
    return token_map
  return jnp.pad(token_map, ((0, 0), (0, extra_rows), (0, extra_cols), (0, 0)))


def _gather_windows(windows, parents: np.ndarray, batch: int):
  """(batch * coarse windows, ...) -> (batch * len(parents), ...): row i of each image is window parents[i]."""
  per_image = windows.reshape((batch, -1) + windows.shape[1:])
  if per_image.shape[1] == 1:  # one coarse window covers all: broadcast rather than gather
    gathered = jnp.broadcast_to(per_image, (batch, len(parents)) + windows.shape[1:])
  else:
    gathered = per_image[:, parents]
  return gathered.reshape((-1,) + windows.shape[1:])
