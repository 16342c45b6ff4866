"""The largest square image that trains, and that infers, per device count and memory (docs/spatial.md).

python experiments/spatial_capacity/run.py [--sizes=2048,4096,8192,16384] [--output=DIR]

An estimate from backend-independent counts, not a GPU measurement: XLA's CPU memory analysis is not a
GPU's. For Atlas-B as configs/atlas_b_16384.py trains it (4 scales, depths (2, 2, 2, 6),
`model.remat=block`, bfloat16 compute, float32 parameters, AdamW, accumulation, no EMA), each term is
counted from the program's shapes, with jaxprs traced from abstract values (nothing is allocated):
- saved residuals of one training image: the bytes the backward pass keeps, from
  `jax._src.ad_checkpoint.saved_residuals` of the loss (as docs/performance.md counts them), without the
  parameters themselves. Counted at every size of `--sizes` (each with the scales its own config has) to
  check that they grow with the pixel count, then scaled from the 16384 px count. Residuals of scale 0
  and of the stem are split over `spatial` devices (their rows divide once the canvas is padded to whole
  bands of windows); a coarser scale's window-major tokens are split only where its rows of windows
  divide by the device count, else every device holds them whole (docs/spatial.md);
- the training activation peak: 4 x the largest single array of the training forward pass (the stem's
  first activations), per device. A rematerialised unit's backward holds its recomputed input, its
  largest intermediate, and the cotangents of both;
- the inference peak: 2 x the largest array of the inference forward pass (the input and the output of
  the largest operation, the stem's first) plus the scale-0 tokens (bfloat16, the compute dtype), per
  device;
- the state on every device (no fsdp): float32 parameters, AdamW's two moments, the gradients and the
  accumulator of `grad_accum_steps` > 1, that is 20 bytes per parameter in training (24 with an EMA);
  4 bytes per parameter at inference.
A device's memory is its nominal size (GB = 1e9 bytes) less 10% for the runtime and fragmentation. One
image per data-parallel group: all N devices split one image (mesh spatial N). Sizes are whole windows
(256 px); a size whose rows of windows do not divide by N is padded to the next multiple, and the
padding is counted. Writes DIR/residuals.csv (the counts) and DIR/results.csv (the table); default: this
folder. About 30 s on the 2-core CPU machine.
"""

import argparse
import csv
import math
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `python experiments/spatial_capacity/run.py` from anywhere
  sys.path.insert(0, str(ROOT))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

DEVICES = (1, 8, 64)
MEMORY_GB = (80, 141)
USABLE = 0.9
WINDOW_PX = 256  # patch 16 x window 16


def _config(image_px: int):
  from atlas_jax import config as config_lib
  from configs import atlas_b_16384, common

  if image_px == 16384:
    config = atlas_b_16384.get_config()
  else:
    config = common.base_config('B', image_px)
    config.model.remat = 'block'
    config.batch_size, config.grad_accum_steps = 8, 8
  config.data.source = 'synthetic'
  config.compilation_cache_dir = ''
  config.mesh.update(data=1, fsdp=1, spatial=1)
  return config_lib.resolve(config)


def _largest_arrays(jaxpr) -> tuple[int, int]:
  """Bytes of the largest array any equation of `jaxpr` (or of a jaxpr inside it) produces: (of rank at
  most 4, of rank 5). Rank 5 is attention's scores and probabilities (batch, windows, heads, queries,
  keys), which XLA's attention on CPU materialises and cuDNN's fused attention on a GPU does not."""
  from jax._src import core

  largest = [0, 0]
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      aval = var.aval
      if hasattr(aval, 'shape'):
        rank5 = int(len(aval.shape) >= 5)
        largest[rank5] = max(largest[rank5], math.prod(aval.shape) * aval.dtype.itemsize)
    for value in eqn.params.values():
      for inner in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(inner, (core.ClosedJaxpr, core.Jaxpr)):
          found = _largest_arrays(inner.jaxpr if isinstance(inner, core.ClosedJaxpr) else inner)
          largest = [max(a, b) for a, b in zip(largest, found)]
  return tuple(largest)


def count(image_px: int) -> dict:
  """The counts of one training and inference image at `image_px`."""
  import jax
  from jax._src.ad_checkpoint import saved_residuals
  import jax.numpy as jnp

  from atlas_jax import losses, run_setup

  config = _config(image_px)
  setup = run_setup.train_setup(config)
  model, params = setup.model, setup.abstract_state.params
  batch_stats = setup.abstract_state.batch_stats
  images = jax.ShapeDtypeStruct((1, image_px, image_px, 3), jnp.float32)
  targets = jnp.full((1, config.model.num_classes), 1.0 / config.model.num_classes)

  def loss(params, images):
    logits, _ = model.apply(
      run_setup.model_variables(params, batch_stats),
      images,
      train=True,
      rngs={'dropout': jax.random.key(0)},
      mutable=['batch_stats'],
    )
    return losses.soft_target_cross_entropy(logits, targets)

  from atlas_jax.models import layout as layout_lib

  layouts = layout_lib.check_image_size(
    (image_px, image_px), config.model.patch_size, config.model.window, config.model.pool
  )
  coarse = {  # (windows, tokens per window) of every scale above 0 -> its rows of windows
    (layout.num_windows, layout.window_height * layout.window_width): layout.grid[0] for layout in layouts[1:]
  }
  fine = coarse_bytes = 0
  coarse_rows = {}
  for aval, origin in saved_residuals(loss, params, images):
    if origin.startswith('from the argument') and 'images' not in origin:
      continue  # the parameters: counted once, as state
    size = math.prod(aval.shape) * aval.dtype.itemsize
    key = tuple(aval.shape[-3:-1]) if len(aval.shape) >= 3 else None
    if key in coarse:
      coarse_bytes += size
      coarse_rows[coarse[key]] = coarse_rows.get(coarse[key], 0) + size
    else:
      fine += size
  train_largest, train_scores = _largest_arrays(jax.make_jaxpr(loss)(params, images).jaxpr)
  infer_largest, _ = _largest_arrays(
    jax.make_jaxpr(
      lambda params, images: model.apply(run_setup.model_variables(params, batch_stats), images)
    )(params, images).jaxpr
  )
  tokens = (image_px // config.model.patch_size) ** 2
  return {
    'image_px': image_px,
    'scales': len(layouts),
    'depths': 'x'.join(str(depth) for depth in config.model.depths),
    'params': sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)),
    'residual_bytes': fine + coarse_bytes,
    'residual_split_bytes': fine,
    'residual_coarse_bytes': coarse_bytes,
    # rows of windows of each coarse scale and its residual bytes, 'rows:bytes;...'
    'residual_coarse_by_rows': ';'.join(f'{rows}:{size}' for rows, size in sorted(coarse_rows.items())),
    'train_largest_array_bytes': train_largest,
    'infer_largest_array_bytes': infer_largest,
    'attention_scores_bytes': train_scores,  # XLA's attention only; not counted in the table
    'scale0_token_bytes': tokens * config.model.dim * 2,  # bfloat16
    'grad_accum_steps': config.grad_accum_steps,
    'ema': int(config.ema.decay > 0),
  }


def per_device_bytes(base: dict, image_px: int, devices: int, train: bool) -> float:
  """Bytes on each of `devices` that split one `image_px` image, scaled from the counts of `base`."""
  rows = -(-image_px // WINDOW_PX)  # rows of scale-0 windows, padded to a multiple of the devices
  rows = -(-rows // devices) * devices
  area = rows * WINDOW_PX * image_px / base['image_px'] ** 2  # the padded canvas against the counted one
  if not train:
    activations = 2 * base['infer_largest_array_bytes'] + base['scale0_token_bytes']
    return 4 * base['params'] + area * activations / devices
  state_per_param = 16 + 4 * (base['grad_accum_steps'] > 1) + 4 * base['ema']
  residuals = area * base['residual_split_bytes'] / devices
  base_rows = base['image_px'] // WINDOW_PX
  for item in filter(None, base['residual_coarse_by_rows'].split(';')):
    coarse_rows, size = (int(part) for part in item.split(':'))
    # The coarse scale's rows of windows at this canvas: a fixed fraction of scale 0's.
    scaled_rows = rows * coarse_rows // base_rows
    residuals += area * size / (devices if scaled_rows and scaled_rows % devices == 0 else 1)
  peak = area * 4 * base['train_largest_array_bytes'] / devices
  return state_per_param * base['params'] + residuals + peak


def largest_side(base: dict, devices: int, memory_gb: int, train: bool) -> int:
  budget = USABLE * memory_gb * 1e9
  side = 0
  while per_device_bytes(base, side + WINDOW_PX, devices, train) <= budget:
    side += WINDOW_PX
  return side


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--sizes', default='2048,4096,8192,16384', help='sides counted (16384 must be one)')
  parser.add_argument('--output', default=str(pathlib.Path(__file__).parent))
  args = parser.parse_args(argv)
  output = pathlib.Path(args.output)
  output.mkdir(parents=True, exist_ok=True)
  counts = []
  for image_px in (int(size) for size in args.sizes.split(',')):
    counts.append(count(image_px))
    row = counts[-1]
    print(
      f'{image_px} px ({row["scales"]} scales): residuals {row["residual_bytes"] / 2**30:.3f} GiB '
      f'({row["residual_bytes"] / image_px**2:.2f} B/px, coarse {row["residual_coarse_bytes"] / 2**30:.3f} '
      f'GiB), largest train array {row["train_largest_array_bytes"] / 2**30:.3f} GiB, inference '
      f'{row["infer_largest_array_bytes"] / 2**30:.3f} GiB',
      flush=True,
    )
  with open(output / 'residuals.csv', 'w', newline='') as file:
    writer = csv.DictWriter(file, list(counts[0]))
    writer.writeheader()
    writer.writerows(counts)
  (base,) = [row for row in counts if row['image_px'] == 16384]
  rows = []
  for devices in DEVICES:
    for memory_gb in MEMORY_GB:
      train_side = largest_side(base, devices, memory_gb, True)
      infer_side = largest_side(base, devices, memory_gb, False)
      rows.append(
        {
          'devices': devices,
          'memory_gb': memory_gb,
          'train_px': train_side,
          'train_gib_per_device': round(per_device_bytes(base, train_side, devices, True) / 2**30, 2),
          'infer_px': infer_side,
          'infer_gib_per_device': round(per_device_bytes(base, infer_side, devices, False) / 2**30, 2),
        }
      )
      print(rows[-1], flush=True)
  with open(output / 'results.csv', 'w', newline='') as file:
    writer = csv.DictWriter(file, list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  print(f'wrote {output / "results.csv"}')


if __name__ == '__main__':
  main()
