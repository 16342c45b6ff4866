"""What padding costs Atlas-B at real any-size inputs: tokens per scale and forward FLOPs (XLA's count).

  python experiments/any_size/padding_cost.py [--out=DIR]

For each size: per scale the valid token map, the padded canvas map and its windows; the forward FLOPs
XLA's cost analysis counts for the padded canvas (batch 1, bfloat16, lowered only: nothing is compiled or
run); and the padding's share, estimated per scale as FLOPs x padded tokens / canvas tokens with each
scale's FLOPs taken proportional to its tokens (windows have a fixed size, so a block's cost per token is
the same at every window of a scale). Writes DIR/results.json (default: a temporary directory).
"""

import argparse
import json
import os
import tempfile

import jax
import jax.numpy as jnp

from atlas_jax.config import resolve
from atlas_jax.models import build_model
from atlas_jax.models import layout as layout_lib
from configs import common

SIZES = [(3000, 4700), (10980, 10980), (3328, 2560)]


def measure(height: int, width: int, config_size: int = 4096) -> dict:
  config = resolve(common.base_config('B', config_size))
  config.model.dtype = 'bfloat16'
  model = build_model(config)
  num_scales = len(layout_lib.check_image_size(config.image_size, 16))
  tokens = (-(-height // 16), -(-width // 16))
  layouts = layout_lib.canvas_layouts(tokens, num_scales)
  valid = layout_lib.valid_token_sides((height, width), 16, num_scales, 4)
  images = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  lowered = jax.jit(model.apply).lower(variables, images)
  flops = float(lowered.cost_analysis()['flops'])
  valid_tokens = [rows * cols for rows, cols in valid]
  canvas_tokens = [layout.height * layout.width for layout in layouts]
  # Split the total over scales by tokens (each MSA block costs about the same per token at every scale).
  total_tokens = sum(canvas_tokens)
  padded_share = sum((c - v) / total_tokens for v, c in zip(valid_tokens, canvas_tokens))
  return {
    'size': [height, width],
    'scales': [
      {
        'valid': list(side),
        'canvas': [layout.height, layout.width],
        'windows': layout.num_windows,
        'padding_fraction': round(1 - v / c, 4),
      }
      for side, layout, v, c in zip(valid, layouts, valid_tokens, canvas_tokens)
    ],
    'forward_tflops': round(flops / 1e12, 3),
    'padded_share': round(padded_share, 4),
    'padded_tflops': round(flops * padded_share / 1e12, 3),
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default=os.path.join(tempfile.gettempdir(), 'atlas_any_size'))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  results = [measure(*size) for size in SIZES]
  for row in results:
    scales = ', '.join(
      f'{s["valid"][0]}x{s["valid"][1]} in {s["canvas"][0]}x{s["canvas"][1]}' for s in row['scales']
    )
    print(
      f'{row["size"][0]}x{row["size"][1]}: {scales}; {row["forward_tflops"]} TFLOPs, '
      f'{100 * row["padded_share"]:.1f}% on padding ({row["padded_tflops"]} TFLOPs)'
    )
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({'device': 'lowered on CPU (XLA cost analysis, nothing run)', 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
