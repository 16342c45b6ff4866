"""Per-class report of an evaluation: WORKDIR/eval/<step>[_ema]_per_class.csv and _confusion.png.

`confusion[true, predicted]` counts the real examples of the split (padding and undecodable examples
excluded) by true class (row) and top-1 prediction (column); `top5_hits[c]` counts the examples of class c
with their class among the five most probable. numpy and PIL only: no plotting library at runtime. The
writers replace the file atomically (temp file + rename); the caller writes on process 0 only.
"""

import csv
import os
import pathlib
import tempfile

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from atlas_jax import storage

EVAL_DIR = 'eval'
MAX_CELL = 24  # px of a cell for few classes
MATRIX_SIDE = 1536  # px the matrix aims at: cells shrink with the class count down to MIN_CELL
MIN_CELL = 2
LABEL_MIN_CELL = 10  # below this a cell is shorter than a line of the default font: names are skipped
CHAR_WIDTH = 6  # px a character of the default font takes (the bitmap font's width; FreeType's is less)
MAX_LABEL_CHARS = 40  # longer names are cut to fit the margin
LABEL_PAD = 4  # px between a name and the image edge, and between a name and the matrix
BARE_MARGIN = 4  # px left and above the matrix when names are skipped
BACKGROUND = (255, 255, 255)
EMPTY_ROW = (228, 228, 228)  # a class with no examples: no fraction to shade
DARKEST = np.array([8, 48, 107], np.float64)  # a cell with the whole row
GRID_SHADE = 0.92  # the lines between cells: their colour a little darker


def report_paths(workdir, step: int, weights: str = 'raw') -> tuple[pathlib.Path, pathlib.Path]:
  """(per-class CSV, confusion PNG) of an evaluation at `step` of `weights` ('raw' or 'ema')."""
  prefix = f'{int(step)}' if weights == 'raw' else f'{int(step)}_{weights}'
  directory = storage.join(workdir, EVAL_DIR)
  return directory / f'{prefix}_per_class.csv', directory / f'{prefix}_confusion.png'


def _check(confusion, class_names) -> np.ndarray:
  confusion = np.asarray(confusion)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f'a confusion matrix is square, got shape {confusion.shape}')
  if len(class_names) != confusion.shape[0]:
    raise ValueError(f'{len(class_names)} class names for a confusion matrix of {confusion.shape[0]} classes')
  return confusion


def _replace_atomically(path, write) -> None:
  """write(file) into a temp file beside `path`, renamed over it: no reader sees half a file (on gs://
  the file is written locally, then uploaded as one object)."""
  if storage.is_remote(path):
    with tempfile.TemporaryFile() as file:
      write(file)
      file.flush()
      file.seek(0)
      storage.write_bytes(path, file.read())
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')  # open(), not mkstemp: the umask's permissions
  try:
    with open(temp, 'wb') as file:
      write(file)
    os.replace(temp, path)
  except BaseException:
    temp.unlink(missing_ok=True)
    raise


def write_per_class_csv(path, confusion, top5_hits, class_names) -> None:
  """Columns class,name,count,top1,top5, one row per class in index order.

  count: examples of the class; top1, top5: the fractions of them right at top-1 / top-5, 4 decimals.
  Both are empty for a class without examples, and top5 is empty with 5 classes or fewer (always right).
  """
  confusion = _check(confusion, class_names)
  top5_hits = np.asarray(top5_hits)
  num_classes = confusion.shape[0]
  counts = confusion.sum(axis=1)
  rows = []
  for index, name in enumerate(class_names):
    count = int(counts[index])
    top1 = f'{confusion[index, index] / count:.4f}' if count else ''
    top5 = f'{top5_hits[index] / count:.4f}' if count and num_classes > 5 else ''
    rows.append([index, name, count, top1, top5])

  def write(file):
    with open(file.fileno(), 'w', newline='', encoding='utf-8', closefd=False) as text:
      writer = csv.writer(text)
      writer.writerow(['class', 'name', 'count', 'top1', 'top5'])
      writer.writerows(rows)

  _replace_atomically(path, write)


def cell_size(num_classes: int) -> int:
  """px of a matrix cell: max(2, min(24, 1536 // num_classes))."""
  return max(MIN_CELL, min(MAX_CELL, MATRIX_SIDE // max(num_classes, 1)))


def label_margin(class_names) -> int:
  """px left of and above the matrix: 6 * min(40, longest name) + 2 * 4 when names are drawn, else 4.

  Names are drawn when a cell is at least 10 px (at most 153 classes); a name too wide for the margin in
  the font at hand is cut, so the size depends on the names' lengths only.
  """
  if cell_size(len(class_names)) < LABEL_MIN_CELL:
    return BARE_MARGIN
  longest = max((len(str(name)) for name in class_names), default=0)
  return CHAR_WIDTH * min(MAX_LABEL_CHARS, longest) + 2 * LABEL_PAD


def image_size(class_names) -> int:
  """Width = height of the confusion PNG: label_margin + num_classes * cell_size."""
  return label_margin(class_names) + len(class_names) * cell_size(len(class_names))


def _fit(draw, text: str, font, width: int) -> str:
  """`text`, cut with '..' until it is at most `width` px wide in `font`."""
  if draw.textlength(text, font=font) <= width:
    return text
  while text and draw.textlength(text + '..', font=font) > width:
    text = text[:-1]
  return text + '..' if text else ''


def _label_strip(class_names, width: int, cell: int, font, align_right: bool) -> Image.Image:
  """The names one under another, class i centred on rows [i * cell, (i + 1) * cell), on white."""
  strip = Image.new('RGB', (width, len(class_names) * cell), BACKGROUND)
  draw = ImageDraw.Draw(strip)
  room = width - 2 * LABEL_PAD
  for index, name in enumerate(class_names):
    text = _fit(draw, str(name), font, room)
    if not text:
      continue
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = width - LABEL_PAD - right if align_right else LABEL_PAD - left
    y = index * cell + (cell - (bottom - top)) // 2 - top
    draw.text((x, y), text, fill=(0, 0, 0), font=font)
  return strip


def write_confusion_png(path, confusion, class_names) -> None:
  """The confusion matrix as a PNG: row = true class, column = top-1 prediction, each cell shaded from
  white (none of the row) to dark blue (the whole row) by its count over its row's; a class without examples
  is a grey row. Cell side c = max(2, min(24, 1536 // num_classes)) px. With c >= 10 the names run down the
  left (rows) and along the top (columns, bottom to top) in a margin m = 6 * min(40, longest name) + 8 px;
  else there are no names and m = 4. Width = height = m + num_classes * c.
  """
  confusion = _check(confusion, class_names).astype(np.float64)
  num_classes = confusion.shape[0]
  cell, margin = cell_size(num_classes), label_margin(class_names)
  totals = confusion.sum(axis=1, keepdims=True)
  fractions = np.divide(confusion, totals, out=np.zeros_like(confusion), where=totals > 0)
  colours = np.asarray(BACKGROUND, np.float64) - fractions[..., None] * (np.asarray(BACKGROUND) - DARKEST)
  colours = np.round(colours).astype(np.uint8)
  colours[totals[:, 0] == 0] = EMPTY_ROW
  pixels = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
  if cell >= LABEL_MIN_CELL:  # a 1 px line between cells where they are big enough to tell apart
    line = np.arange(num_classes * cell) % cell == cell - 1
    pixels[line] = np.round(pixels[line] * GRID_SHADE).astype(np.uint8)
    pixels[:, line] = np.round(pixels[:, line] * GRID_SHADE).astype(np.uint8)
  side = margin + num_classes * cell
  image = Image.new('RGB', (side, side), BACKGROUND)
  image.paste(Image.fromarray(pixels, 'RGB'), (margin, margin))
  if cell >= LABEL_MIN_CELL:
    font = ImageFont.load_default()
    image.paste(_label_strip(class_names, margin, cell, font, align_right=True), (0, margin))
    # Drawn left-aligned, then turned a quarter counter-clockwise: each name starts at the matrix's top edge.
    columns = _label_strip(class_names, margin, cell, font, align_right=False)
    image.paste(columns.transpose(Image.Transpose.ROTATE_90), (margin, 0))
    draw = ImageDraw.Draw(image)
    for line_index, text in enumerate(('rows: true', 'cols: predicted')):  # in the corner, where they fit
      top = LABEL_PAD + line_index * (LABEL_MIN_CELL + 4)
      if draw.textlength(text, font=font) <= margin - 2 * LABEL_PAD and top + LABEL_MIN_CELL + 4 <= margin:
        draw.text((LABEL_PAD, top), text, fill=(96, 96, 96), font=font)

  _replace_atomically(path, lambda file: image.save(file, format='PNG'))
