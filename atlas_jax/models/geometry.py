"""Each image's own layout inside a padded canvas: the masks and coordinates of any-size input.

A batch is a canvas of (H, W) pixels holding each image at its top-left, `sizes[b]` = (height, width) of
image b, the rest padding. `canvas_layouts` windows the canvas; an image's windows are the canvas's
windows restricted to its valid tokens, because windows start at the top-left and an image's padded sides
are never larger than the canvas's (docs/any_size.md). What differs per image is computed here, traced:
- `valid[s]`: (batch, rows, cols) bool, token (r, c) of scale s is valid when r < ceil(height / patch /
  pool^s) and likewise for c; `valid_windows[s]` the same window-major, (batch * windows, tokens);
- `coordinates[s]`: (batch, tokens of one canvas window, 2), the window-local coordinates with the side of
  the image's own window at scale s, which is smaller than the canvas's where the image's scale fits in
  one window and the canvas's does not.
"""

from typing import Sequence

import flax.struct
import jax.numpy as jnp
import numpy as np

from atlas_jax.models import layout as layout_lib


@flax.struct.dataclass
class Geometry:
  """The canvas layouts (static) and, for a padded batch, the per-image masks (traced; None otherwise)."""

  layouts: tuple = flax.struct.field(pytree_node=False)
  valid: tuple | None = None  # per scale (batch, rows, cols) bool
  valid_windows: tuple | None = None  # per scale (batch * windows, tokens) bool
  coordinates: tuple | None = None  # per scale (batch, tokens, 2)

  @property
  def padded(self) -> bool:
    return self.valid is not None

  def select(self, scales: Sequence[int]) -> 'Geometry':
    """The geometry of the scales `scales` only (a stage's)."""
    if not self.padded:
      return Geometry(tuple(self.layouts[s] for s in scales))
    return Geometry(
      *(
        tuple(field[s] for s in scales)
        for field in (self.layouts, self.valid, self.valid_windows, self.coordinates)
      )
    )


def to_windows(token_map, window_height: int, window_width: int):
  """(batch, H, W, ...) -> (batch * windows, window_height * window_width, ...), windows in raster order."""
  batch, height, width = token_map.shape[:3]
  trailing = token_map.shape[3:]
  rows, cols = height // window_height, width // window_width
  x = token_map.reshape((batch, rows, window_height, cols, window_width) + trailing)
  x = x.transpose((0, 1, 3, 2, 4) + tuple(range(5, x.ndim)))
  return x.reshape((batch * rows * cols, window_height * window_width) + trailing)


def canvas_tokens(canvas_hw: Sequence[int], patch_size: int) -> tuple[int, int]:
  """Scale-0 tokens of a canvas of `canvas_hw` pixels: ceil(side / patch) per side."""
  return tuple(-(-int(side) // patch_size) for side in canvas_hw)


def spatial_tokens(tokens_hw: Sequence[int], window: int, spatial: int) -> tuple[int, int]:
  """Scale-0 tokens of a canvas whose rows of windows divide by `spatial` (spatial parallelism splits
  them over devices): the rows rounded up to whole bands of windows, the extra rows padding."""
  rows, cols = int(tokens_hw[0]), int(tokens_hw[1])
  if spatial == 1:
    return rows, cols
  window_rows = -(-rows // window) if rows > window else 1
  if window_rows % spatial == 0:
    return rows, cols
  return -(-window_rows // spatial) * spatial * window, cols


def is_unpadded(layouts: Sequence[layout_lib.ScaleLayout], tokens_hw: Sequence[int], pool: int) -> bool:
  """True when `layouts` pad nothing for a `tokens_hw` map: today's windowable sizes."""
  height, width = tokens_hw
  for index, scale in enumerate(layouts):
    if index:
      height, width = -(-height // pool), -(-width // pool)
    if (scale.height, scale.width) != (height, width):
      return False
  return True


def padded_geometry(
  layouts: Sequence[layout_lib.ScaleLayout],
  sizes,
  patch_size: int,
  window: int,
  pool: int,
  whole_window: bool = False,
  dtype=jnp.float32,
) -> Geometry:
  """The masks of images `sizes` (batch, 2) int pixels in a canvas windowed as `layouts`.

  `whole_window`: the model's one window is the whole token map (ViT), so an image's window side is its
  own valid side rather than `pyramid_sides`' window side.
  """
  sizes = jnp.asarray(sizes, jnp.int32)
  valid_tokens = -(-sizes // patch_size)  # (batch, 2) at scale 0
  num_scales = len(layouts)
  per_axis = [layout_lib.pyramid_sides(valid_tokens[:, axis], num_scales, window, pool) for axis in (0, 1)]
  valid, valid_windows, coordinates = [], [], []
  for scale, canvas in enumerate(layouts):
    (row_valid, _, row_window), (col_valid, _, col_window) = per_axis[0][scale], per_axis[1][scale]
    if whole_window:
      row_window, col_window = row_valid, col_valid
    rows = jnp.arange(canvas.height)[None, :] < row_valid[:, None]  # (batch, rows)
    cols = jnp.arange(canvas.width)[None, :] < col_valid[:, None]
    scale_valid = rows[:, :, None] & cols[:, None, :]
    valid.append(scale_valid)
    valid_windows.append(to_windows(scale_valid, canvas.window_height, canvas.window_width))
    local_rows = np.repeat(np.arange(canvas.window_height), canvas.window_width)  # raster order in a window
    local_cols = np.tile(np.arange(canvas.window_width), canvas.window_height)
    coordinates.append(
      jnp.stack(
        [
          layout_lib.normalized_coordinates(jnp.asarray(local_rows, dtype)[None], row_window[:, None]),
          layout_lib.normalized_coordinates(jnp.asarray(local_cols, dtype)[None], col_window[:, None]),
        ],
        axis=-1,
      ).astype(dtype)
    )
  return Geometry(tuple(layouts), tuple(valid), tuple(valid_windows), tuple(coordinates))


def attendable(key_mask):
  """(rows, keys) bool -> the same with key 0 marked where a row has no valid key (a window of padding
  only), so its softmax stays finite; such rows are padding and their output is never read."""
  empty = ~key_mask.any(axis=1)
  return key_mask.at[:, 0].set(key_mask[:, 0] | empty)


def canvas_geometry(
  images,
  sizes,
  layouts,
  patch_size,
  window,
  pool,
  parent_window='spatial',
  dtype=jnp.float32,
  whole_window: bool = False,
):
  """(Geometry, images padded to the canvas's layouts, sizes or None) for a batch (batch, H, W, 3).

  Unpadded (today's computation) when the canvas needs no padding and `sizes` is None; otherwise the
  pixels are zero-padded below and to the right to `layouts[0]` times the patch, and `sizes` defaults to
  the whole canvas for every image."""
  batch, height, width = images.shape[:3]
  tokens_hw = canvas_tokens((height, width), patch_size)
  if sizes is None and tokens_hw[0] * patch_size == height and tokens_hw[1] * patch_size == width:
    if is_unpadded(layouts, tokens_hw, pool):
      return Geometry(tuple(layouts)), images, None
  if parent_window == 'raster':
    raise layout_lib.LayoutError(
      f"model.parent_window='raster' pairs windows by their count, which padding changes: a {height}x{width} "
      "input needs padding; use model.parent_window='spatial'"
    )
  if sizes is None:
    sizes = jnp.broadcast_to(jnp.asarray([height, width], jnp.int32), (batch, 2))
  sizes = jnp.minimum(jnp.asarray(sizes, jnp.int32), jnp.asarray([height, width], jnp.int32))
  padded_height, padded_width = layouts[0].height * patch_size, layouts[0].width * patch_size
  images = jnp.pad(images, ((0, 0), (0, padded_height - height), (0, padded_width - width), (0, 0)))
  geometry = padded_geometry(layouts, sizes, patch_size, window, pool, whole_window, dtype)
  return geometry, images, sizes
