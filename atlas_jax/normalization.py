"""ImageNet normalisation, the one every transform ends with (the reference's mean and std).

numpy only and outside data/: the data transforms use it on the host, and the train step (augment.py) takes
the constants without importing the data pipeline or the image libraries.
"""

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# uint8 -> (x / 255 - mean) / std as one multiply-add per pixel.
_NORMALIZE_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_STD))).astype(np.float32)
_NORMALIZE_OFFSET = (-np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD)).astype(np.float32)


def normalize_image(image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (H, W, 3), (image / 255 - mean) / std with ImageNet's; into `out` if given."""
  if out is None:
    out = np.empty(image.shape, np.float32)
  height, width, channels = image.shape
  # Rows of W * 3 values against a scale and offset tiled to that length: broadcasting a (3,) vector
  # makes numpy loop 3 elements at a time, about 4x slower.
  rows, out_rows = image.reshape(height, width * channels), out.reshape(height, width * channels)
  np.multiply(rows, np.tile(_NORMALIZE_SCALE, width), out=out_rows)
  np.add(out_rows, np.tile(_NORMALIZE_OFFSET, width), out=out_rows)
  return out
