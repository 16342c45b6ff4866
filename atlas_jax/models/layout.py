"""Geometry of the scale pyramid, in pure Python and numpy (no parameters).

Scale 0 is the token map the stem produces; scale l+1 is scale l max-pooled by `pool` x `pool`.
Pooling stops once a scale fits in one window. Every scale is cut into non-overlapping windows of
`window` x `window` tokens (a scale no larger than a window on a side uses that side whole) and stored
window-major: (batch * windows, tokens per window, channels), windows in raster order over the window
grid, tokens in raster order inside a window, as the reference does.
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


def _valid_side_lengths(patch_size: int, limit: int, window: int, pool: int) -> list[int]:
  sides = []
  for side in range(patch_size, limit + 1, patch_size):
    try:
      scale_layouts((side // patch_size, side // patch_size), window, pool)
    except LayoutError:
      continue
    sides.append(side)
  return sides


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
  nearest = []
  sides = _valid_side_lengths(patch_size, 2 * max(height, width) + 16 * patch_size, window, pool)
  for side in (height, width):
    below = [s for s in sides if s <= side]
    above = [s for s in sides if s >= side]
    nearest.append(sorted({below[-1] if below else above[0], above[0] if above else below[-1]}))
  suggestions = ', '.join(f'{h}x{w}' for h in nearest[0] for w in nearest[1])
  raise LayoutError(
    f'image size {height}x{width} does not fit the scale pyramid (patch {patch_size}, {window}x{window} '
    f'windows, {pool}x{pool} pooling: at every scale each side in tokens must be at most {window} or a '
    f'multiple of {window}); nearest sizes that work: {suggestions}'
  )


def parent_windows(fine: ScaleLayout, coarse: ScaleLayout, rule: str) -> np.ndarray:
  """For each window of `fine`, the index of the `coarse` window whose K/V it attends to top-down.

  `spatial`: the coarse window that covers the fine window (the paper). `raster`: window i gets coarse
  window i // (fine windows / coarse windows), what the reference code's repeat_interleave does; the two
  agree when the coarse scale is one window.
  """
  if rule == 'raster':
    ratio = fine.num_windows // coarse.num_windows
    return np.arange(fine.num_windows) // ratio
  if rule != 'spatial':
    raise ValueError(f"parent_window must be 'spatial' or 'raster', got {rule!r}")
  down_rows, down_cols = fine.height // coarse.height, fine.width // coarse.width
  rows, cols = np.meshgrid(np.arange(fine.grid[0]), np.arange(fine.grid[1]), indexing='ij')
  # Top-left token of each fine window, in coarse tokens, then the coarse window holding it.
  coarse_rows = rows * fine.window_height // down_rows // coarse.window_height
  coarse_cols = cols * fine.window_width // down_cols // coarse.window_width
  return (coarse_rows * coarse.grid[1] + coarse_cols).reshape(-1)


def window_coordinates(layout: ScaleLayout) -> np.ndarray:
  """Window-local (row, col) coordinates of a window's tokens, in [-1, 1): (tokens, 2), as the reference."""

  def normalized(side):
    half = max(side // 2, 1)
    return (np.arange(side, dtype=np.float32) - side // 2) / half

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
