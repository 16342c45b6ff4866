"""Geometry of the scale pyramid, in pure Python and numpy (no parameters).

Scale 0 is the token map the stem produces; scale l+1 is scale l max-pooled by `pool` x `pool`.
Pooling stops once a scale fits in one window. Every scale is cut into non-overlapping windows of
`window` x `window` tokens (a scale no larger than a window on a side uses that side whole) and stored
window-major: (batch * windows, tokens per window, channels), windows in raster order over the window
grid, tokens in raster order inside a window, as the reference does.

Any other size (docs/any_size.md): the number of scales stays that of `config.image_size`; along each
axis, `pyramid_sides` pads every scale's map to whole windows (to a multiple of `pool` where a scale no
larger than a window is pooled again), fine to coarse, so each coarse map holds the pooled fine map and
perhaps more padding. The arithmetic is written once, for Python ints (a canvas, static) and for jnp int
arrays (each image's own size, traced) alike.
"""

import dataclasses
from typing import Sequence

import numpy as np

from atlas_jax.errors import AtlasError


class LayoutError(AtlasError, ValueError):
  """An image size or a geometry the scale pyramid cannot window."""


@dataclasses.dataclass(frozen=True)
class ScaleLayout:
  """One scale of the pyramid: its token map and how it is cut into windows."""

  height: int  # tokens
  width: int
  window_height: int  # tokens per window side
  window_width: int

  @property
  def grid(self) -> tuple[int, int]:
    return self.height // self.window_height, self.width // self.window_width

  @property
  def num_windows(self) -> int:
    rows, cols = self.grid
    return rows * cols


def _ceil_to(value, multiple):
  return -(-value // multiple) * multiple


def _where(condition, if_true, if_false):
  """`if_true if condition else if_false` for Python values, elementwise for traced arrays."""
  if isinstance(condition, (bool, np.bool_)):
    return if_true if condition else if_false
  import jax.numpy as jnp  # only for traced per-image sizes; the static layouts stay numpy

  return jnp.where(condition, if_true, if_false)


def pyramid_sides(valid, num_scales: int, window: int = 16, pool: int = 4):
  """Along one axis, for `valid` tokens at scale 0: per scale (valid tokens, padded side, window side).

  A token is valid when any position it pools is, so valid sides are ceilings. Each padded side holds
  the pooled padded side below it, rounded up to whole windows when larger than a window, else (when
  pooled again) to a multiple of `pool`; the coarsest scale no larger than a window keeps its side.
  Windowable sizes pad nothing: their padded sides are today's sides.
  """
  sides, padded = [], None
  for scale in range(num_scales):
    if scale:
      valid = -(-valid // pool)
    needed = valid if padded is None else padded // pool
    small = needed if scale == num_scales - 1 else _ceil_to(needed, pool)
    padded = _where(needed > window, _ceil_to(needed, window), small)
    sides.append((valid, padded, _where(padded > window, window, padded)))
  return sides


def canvas_layouts(tokens_hw, num_scales: int, window: int = 16, pool: int = 4) -> tuple[ScaleLayout, ...]:
  """The padded layouts of a canvas of `tokens_hw` scale-0 tokens (each side any size >= 1)."""
  rows = pyramid_sides(int(tokens_hw[0]), num_scales, window, pool)
  cols = pyramid_sides(int(tokens_hw[1]), num_scales, window, pool)
  return tuple(
    ScaleLayout(int(row[1]), int(col[1]), int(row[2]), int(col[2])) for row, col in zip(rows, cols)
  )


def valid_token_sides(image_hw, patch_size: int, num_scales: int, pool: int = 4) -> list[tuple[int, int]]:
  """(rows, cols) of valid tokens of an `image_hw` pixel image at every scale: ceil(side / patch / pool^s)."""
  sides = []
  rows, cols = -(-int(image_hw[0]) // patch_size), -(-int(image_hw[1]) // patch_size)
  for scale in range(num_scales):
    if scale:
      rows, cols = -(-rows // pool), -(-cols // pool)
    sides.append((rows, cols))
  return sides


def _window_side(side: int, window: int) -> int | None:
  """Window side along one axis, or None when `side` cannot be windowed."""
  if side <= window:
    return side
  return window if side % window == 0 else None


def scale_layouts(tokens_hw: tuple[int, int], window: int = 16, pool: int = 4) -> tuple[ScaleLayout, ...]:
  """The layouts of every scale for a `tokens_hw` map at scale 0; raises LayoutError when one does not fit."""
  height, width = tokens_hw
  layouts = []
  while True:
    window_height, window_width = _window_side(height, window), _window_side(width, window)
    if window_height is None or window_width is None or height < 1 or width < 1:
      raise LayoutError(f'a {height}x{width} token map cannot be cut into {window}x{window} windows')
    layouts.append(ScaleLayout(height, width, window_height, window_width))
    if height <= window and width <= window:
      return tuple(layouts)
    if height % pool or width % pool:
      raise LayoutError(f'a {height}x{width} token map cannot be max-pooled by {pool}')
    height, width = height // pool, width // pool


def _nearest_working_sizes(height: int, width: int, patch_size: int, window: int, pool: int) -> list[str]:
  """Up to two (H, W) near `height` x `width` whose pyramid fits: the nearest no larger in area and the
  nearest no smaller. Sides are searched together, since whether one side fits depends on how many times
  the longer side is pooled."""

  def near(side):  # the 48 multiples of the patch size nearest to `side`
    candidates = range(patch_size, 4 * side + 48 * patch_size, patch_size)
    return sorted(candidates, key=lambda c: abs(c - side))[:48]

  fitting = []
  for h in near(height):
    for w in near(width):
      try:
        scale_layouts((h // patch_size, w // patch_size), window, pool)
      except LayoutError:
        continue
      fitting.append((abs(h - height) + abs(w - width), h, w))
  area = height * width
  smaller = min((f for f in fitting if f[1] * f[2] <= area), default=None)
  larger = min((f for f in fitting if f[1] * f[2] >= area), default=None)
  picked = sorted({f for f in (smaller, larger) if f is not None}, key=lambda f: f[1] * f[2])
  return [f'{h}x{w}' for _, h, w in picked]


def check_image_size(
  image_size: Sequence[int], patch_size: int, window: int = 16, pool: int = 4
) -> tuple[ScaleLayout, ...]:
  """Layouts for an image of `image_size` (H, W) pixels, or one LayoutError line naming sizes that work."""
  height, width = int(image_size[0]), int(image_size[1])
  if window < 1 or pool < 2 or window % pool:
    # Bottom-up attention groups the coarse tokens above each fine window: window / pool per side.
    raise LayoutError(f'model.window={window} must be a multiple of model.pool={pool} (and pool >= 2)')
  try:
    if height % patch_size or width % patch_size:
      raise LayoutError('not a multiple of the patch size')
    return scale_layouts((height // patch_size, width // patch_size), window, pool)
  except LayoutError:
    pass
  suggestions = ', '.join(_nearest_working_sizes(height, width, patch_size, window, pool)) or 'none near'
  raise LayoutError(
    f'image size {height}x{width} does not fit the scale pyramid (patch {patch_size}, {window}x{window} '
    f'windows, {pool}x{pool} pooling: at every scale each side in tokens must be at most {window} or a '
    f'multiple of {window}); nearest sizes that work: {suggestions}'
  )


def parent_windows(fine: ScaleLayout, coarse: ScaleLayout, rule: str, downsample: int) -> np.ndarray:
  """For each window of `fine`, the index of the `coarse` window whose K/V it attends to top-down.

  `spatial`: the coarse window that covers the fine window (the paper). `raster`: window i gets coarse
  window i // (fine windows / coarse windows), what the reference code's repeat_interleave does; the two
  agree when the coarse scale is one window. `downsample` is pool ** (scales between them): fine token (r, c)
  lies under coarse token (r // downsample, c // downsample), which with padding is not fine.height //
  coarse.height.
  """
  if rule == 'raster':
    ratio = fine.num_windows // coarse.num_windows
    return np.arange(fine.num_windows) // ratio
  if rule != 'spatial':
    raise ValueError(f"parent_window must be 'spatial' or 'raster', got {rule!r}")
  rows, cols = np.meshgrid(np.arange(fine.grid[0]), np.arange(fine.grid[1]), indexing='ij')
  # Top-left token of each fine window, in coarse tokens, then the coarse window holding it.
  coarse_rows = rows * fine.window_height // downsample // coarse.window_height
  coarse_cols = cols * fine.window_width // downsample // coarse.window_width
  return (coarse_rows * coarse.grid[1] + coarse_cols).reshape(-1)


def normalized_coordinates(index, side):
  """Token `index` of a window of `side` tokens, in [-1, 1): (index - side // 2) / max(side // 2, 1)."""
  half = side // 2
  return (index - half) / _where(half > 1, half, 1)


def window_coordinates(layout: ScaleLayout) -> np.ndarray:
  """Window-local (row, col) coordinates of a window's tokens, in [-1, 1): (tokens, 2), as the reference."""

  def normalized(side):
    return normalized_coordinates(np.arange(side, dtype=np.float32), side).astype(np.float32)

  rows, cols = np.meshgrid(normalized(layout.window_height), normalized(layout.window_width), indexing='ij')
  return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)


def stage_scales(num_scales: int, depths: Sequence[int], composition: str) -> list[range]:
  """The scales each macro-stage processes: `atlas` drops the finest after each stage, the last keeps the rest."""
  if len(depths) > num_scales and composition == 'atlas':
    raise LayoutError(
      f'{len(depths)} stages (depths {tuple(depths)}) but the image gives only {num_scales} '
      f'scales: use at most {num_scales} stages'
    )
  if composition == 'stack':
    return [range(num_scales) for _ in depths]
  if composition != 'atlas':
    raise ValueError(f"composition must be 'atlas' or 'stack', got {composition!r}")
  return [range(stage, num_scales) for stage in range(len(depths))]
