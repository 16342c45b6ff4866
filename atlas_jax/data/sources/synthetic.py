"""The built-in synthetic tasks, which need long-range communication (docs/synthetic_task.md).

`SyntheticColourPairs` (`data.synthetic_task='colour_pairs'`, the quickstart's): two squares far apart,
each one of 4 colours, the label the XOR of their 2-bit colour codes. `SyntheticLongRange` (`markers_v1`,
the first version): two red or blue squares, the label whether their colours differ and whether they lie
in different halves of the whole image (two XORs). No sum of per-window evidence can represent either
label. It needs no files, works at any resolution and renders an example in about a
millisecond per megapixel.
"""

import dataclasses
import math
from typing import Sequence

import numpy as np

from atlas_jax.data.sources.common import SPLITS, DataSourceError, image_size_pair


@dataclasses.dataclass(frozen=True)
class LongRangeExample:
  """The generation parameters of one SyntheticLongRange example (pixel boxes are [top, top + side))."""

  colour_a: int  # palette index of marker A (left part of the image): 0 red, 1 blue
  colour_b: int  # palette index of marker B (right part of the image)
  region_a: int  # 1 when marker A lies in the top half of the image, 0 in the bottom half
  region_b: int  # the same for marker B
  top_a: int
  left_a: int
  top_b: int
  left_b: int
  side: int  # both markers are side x side squares
  label: int  # (colour_a ^ colour_b) + 2 * (region_a ^ region_b)


class SyntheticLongRange:
  """Two coloured squares far apart; label = [colours differ] + 2 * [halves differ] (4 classes).

  Layout of an (H, W) image, side s = max(4, min(H, W) // 4):
    background: gray 128 with uniform noise in [-8, 8] per pixel and channel;
    marker A: an s x s square of colour red or blue inside columns [0, floor(3W/8));
    marker B: an s x s square of colour red or blue inside columns [ceil(5W/8), W);
    each marker lies wholly in the top half rows [0, H // 2) (region 1) or the bottom half rows
      [ceil(H/2), H) (region 0);
    so the columns of A and B are at least W/4 apart, and A is in the left half, B in the right half.
  label = (colour_a XOR colour_b) + 2 * (region_a XOR region_b): whether the two colours differ, and whether
  the two markers lie in different halves of the whole image. Colours, regions and positions are uniform
  and independent, so the label is uniform over the 4 classes and independent of any one marker alone.
  Example i of a split depends only on (seed, split, i).
  """

  num_classes = 4
  classes = (
    'same colour, same half',
    'colours differ, same half',
    'same colour, halves differ',
    'colours differ, halves differ',
  )
  PALETTE = np.array(
    [
      [220, 40, 40],  # red
      [50, 80, 230],
    ],  # blue
    dtype=np.int16,
  )
  PALETTE_NAMES = ('red', 'blue')
  BACKGROUND = 128
  NOISE = 8
  # The noise is a tile repeated at a random phase: per-pixel random numbers would cost ~10x more at 2048^2.
  # Tile sides are coprime with 16 so the pattern does not line up with the patch grid.
  NOISE_TILE = (61, 59)
  MIN_SIDE = 32

  def __init__(self, image_size: int | Sequence[int], size: int, seed: int = 0, split: str = 'train'):
    height, width = image_size_pair(image_size)
    if min(height, width) < self.MIN_SIDE:
      raise DataSourceError(
        f'SyntheticLongRange needs images of at least {self.MIN_SIDE}x{self.MIN_SIDE} '
        f'pixels, got {height}x{width}'
      )
    if split not in SPLITS:
      raise DataSourceError(f'split must be one of {SPLITS}, got {split!r}')
    if size < 1:
      raise DataSourceError(f'a synthetic split needs at least one example, got size={size}')
    if seed < 0:
      raise DataSourceError(f'seed must be >= 0 (numpy seed sequences take non-negative ints), got {seed}')
    self.image_shape = (height, width, 3)
    self.size = int(size)
    self.seed = int(seed)
    self.split = split
    self._split_id = SPLITS.index(split)
    self.side = max(4, min(height, width) // 4)

  def __len__(self) -> int:
    return self.size

  def _rng(self, index) -> np.random.Generator:
    if not isinstance(index, (int, np.integer)):
      raise TypeError(f'index must be an integer, got {type(index).__name__}')
    if not 0 <= index < self.size:
      raise IndexError(f'index {index} out of range for a split of {self.size} examples')
    return np.random.default_rng([self.seed, self._split_id, int(index)])

  def _draw_top(self, rng: np.random.Generator, region: int) -> int:
    """A marker's top row, the marker wholly in the top half (region 1) or the bottom half (region 0)."""
    height = self.image_shape[0]
    if region:
      return int(rng.integers(0, height // 2 - self.side + 1))
    return int(rng.integers(math.ceil(height / 2), height - self.side + 1))

  def _draw_parameters(self, rng: np.random.Generator) -> LongRangeExample:
    width = self.image_shape[1]
    side = self.side
    colour_a, colour_b, region_a, region_b = (int(v) for v in rng.integers(0, 2, size=4))
    top_a = self._draw_top(rng, region_a)
    left_a = int(rng.integers(0, (3 * width) // 8 - side + 1))
    top_b = self._draw_top(rng, region_b)
    left_b = int(rng.integers(math.ceil(5 * width / 8), width - side + 1))
    label = (colour_a ^ colour_b) + 2 * (region_a ^ region_b)
    return LongRangeExample(colour_a, colour_b, region_a, region_b, top_a, left_a, top_b, left_b, side, label)

  def describe(self, index: int) -> LongRangeExample:
    """The generation parameters of example `index` (the same draws as `self[index]`, without rendering)."""
    return self._draw_parameters(self._rng(index))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rng = self._rng(index)
    example = self._draw_parameters(rng)
    markers = (
      (example.colour_a, example.top_a, example.left_a),
      (example.colour_b, example.top_b, example.left_b),
    )
    return {'image': self._render(rng, markers, example.side), 'label': np.int32(example.label)}

  def _render(self, rng: np.random.Generator, markers, side: int) -> np.ndarray:
    """The noisy background with a side x side square of PALETTE[colour] at each (colour, top, left)."""
    height, width, _ = self.image_shape
    tile_height, tile_width = self.NOISE_TILE
    tile = rng.integers(
      self.BACKGROUND - self.NOISE,
      self.BACKGROUND + self.NOISE + 1,
      size=(tile_height, tile_width, 3),
      dtype=np.uint8,
    )
    phase_row, phase_col = (int(p) for p in rng.integers(0, [tile_height, tile_width]))
    repeats = (math.ceil((height + phase_row) / tile_height), math.ceil((width + phase_col) / tile_width), 1)
    image = np.ascontiguousarray(
      np.tile(tile, repeats)[phase_row : phase_row + height, phase_col : phase_col + width]
    )  # (H, W, 3)
    for colour, top, left in markers:
      patch = image[top : top + side, left : left + side].astype(np.int16)
      # The marker keeps the background's noise around its colour: solid to the eye, not a constant patch.
      image[top : top + side, left : left + side] = np.clip(
        patch - self.BACKGROUND + self.PALETTE[colour], 0, 255
      ).astype(np.uint8)
    return image


@dataclasses.dataclass(frozen=True)
class ColourPairExample:
  """The generation parameters of one SyntheticColourPairs example (pixel boxes are [top, top + side))."""

  colour_a: int  # palette index 0-3 of marker A (left part of the image)
  colour_b: int  # palette index of marker B (right part of the image)
  top_a: int
  left_a: int
  top_b: int
  left_b: int
  side: int  # both markers are side x side squares
  label: int  # colour_a XOR colour_b


class SyntheticColourPairs(SyntheticLongRange):
  """Two squares far apart, each one of 4 colours; label = colour_a XOR colour_b (4 classes).

  Layout of an (H, W) image, side s = max(4, min(H, W) // 4), background as SyntheticLongRange's:
    marker A: an s x s square anywhere inside columns [0, floor(3W/8)), any rows;
    marker B: an s x s square anywhere inside columns [ceil(5W/8), W), any rows;
    colours: 0 red, 1 green, 2 blue, 3 white, four corners of the RGB cube, each pair equally far apart.
  label = colour_a XOR colour_b (as 2-bit numbers): 0 the same colour, 1 red and green or blue and white,
  2 red and blue or green and white, 3 red and white or green and blue; in channels, which of R, G, B the
  two markers share (all three, only B, only G, only R). The colours are uniform and independent, so the
  label is uniform and independent of either marker alone: of any part of the image that does not hold
  both (docs/synthetic_task.md). Example i of a split depends only on (seed, split, i).
  """

  num_classes = 4
  PALETTE = np.array([[240, 15, 15], [15, 240, 15], [15, 15, 240], [240, 240, 240]], dtype=np.int16)
  PALETTE_NAMES = ('red', 'green', 'blue', 'white')
  classes = ('same colour', 'red-green or blue-white', 'red-blue or green-white', 'red-white or green-blue')

  def _draw_parameters(self, rng: np.random.Generator) -> ColourPairExample:
    height, width, _ = self.image_shape
    side = self.side
    colour_a, colour_b = (int(v) for v in rng.integers(0, 4, size=2))
    top_a = int(rng.integers(0, height - side + 1))
    left_a = int(rng.integers(0, (3 * width) // 8 - side + 1))
    top_b = int(rng.integers(0, height - side + 1))
    left_b = int(rng.integers(math.ceil(5 * width / 8), width - side + 1))
    return ColourPairExample(colour_a, colour_b, top_a, left_a, top_b, left_b, side, colour_a ^ colour_b)


# data.synthetic_task -> the source class; docs/synthetic_task.md describes both.
TASKS = {'colour_pairs': SyntheticColourPairs, 'markers_v1': SyntheticLongRange}


def class_names(data_config) -> tuple[str, ...]:
  """The class names of `data.synthetic_task`, in label order."""
  return _task(data_config).classes


def _task(data_config):
  task = data_config.get('synthetic_task', 'markers_v1')  # a config.json from before the field: markers_v1
  if task not in TASKS:
    raise DataSourceError(f'data.synthetic_task must be one of {", ".join(TASKS)}, got {task!r}')
  return TASKS[task]


def from_config(data_config, image_size, split: str, seed: int) -> SyntheticLongRange:
  """The split of `data.synthetic_train_size` or `data.synthetic_val_size` examples of `data.synthetic_task`."""
  task = data_config.get('synthetic_task', 'markers_v1')  # a config.json from before the field: markers_v1
  if task not in TASKS:
    raise DataSourceError(f'data.synthetic_task must be one of {", ".join(TASKS)}, got {task!r}')
  size = data_config.synthetic_train_size if split == 'train' else data_config.synthetic_val_size
  return TASKS[task](image_size, int(size), seed=seed, split=split)
