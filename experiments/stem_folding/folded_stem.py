"""The conv stem's inference forward with every conv -> BatchNorm pair folded into one convolution.

A functional twin of `atlas_jax.models.stem.ConvStem(train=False)` that reads the stem's own variables by
name: each running-average BatchNorm is a per-channel affine map, so conv then BN is one conv with kernel
* s and bias (bias - mean) * s + bn_bias, s = scale / sqrt(var + eps), folded in float32 inside the jitted
function. It lives here, not in the package, because XLA's CPU cost analysis showed no saving (README of
this experiment: docs/performance.md); it is kept for a GPU A/B.
"""

import functools

import flax.linen as nn
from flax.linen.dtypes import promote_dtype
from jax import lax
import jax.numpy as jnp

from atlas_jax.models.layers import gelu

_f32 = functools.partial(jnp.asarray, dtype=jnp.float32)


def fold(conv: dict, bn: dict, stats: dict, epsilon: float):
  """(kernel (3, 3, in, out), bias (out,)) in float32 of `conv` followed by inference BatchNorm `bn`."""
  multiplier = _f32(bn['scale']) * lax.rsqrt(_f32(stats['var']) + epsilon)
  bias = _f32(conv['bias']) if 'bias' in conv else jnp.zeros_like(multiplier)
  return _f32(conv['kernel']) * multiplier, (bias - _f32(stats['mean'])) * multiplier + _f32(bn['bias'])


def conv_bn(x, params: dict, stats: dict, conv: str, bn: str, epsilon: float, dtype, strides: int = 1):
  """x (batch, H, W, in) -> (batch, H / strides, W / strides, out): one 3x3 conv (padding 1) in `dtype`."""
  kernel, bias = fold(params[conv], params[bn], stats[bn], epsilon)
  x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)  # as nn.Conv(dtype=...) casts
  y = lax.conv_general_dilated(
    x, kernel, (strides,) * 2, ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )
  return y + bias


def downsample(x, params: dict, dtype):
  """ConvDownsample: LayerNorm over channels (eps 1e-6), then a 3x3 stride-2 conv without bias."""
  x = nn.LayerNorm(epsilon=1e-6, dtype=dtype).apply({'params': params['norm']}, x)
  x, kernel = promote_dtype(x, params['conv']['kernel'], dtype=dtype)
  return lax.conv_general_dilated(
    x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def folded_stem(variables: dict, images, dtype, num_residual: int = 3):
  """ConvStem's inference forward from its variables: images (batch, H, W, 3) -> (batch, H/16, W/16, dim)."""
  params, stats = variables['params'], variables['batch_stats']
  x = nn.relu(conv_bn(images, params, stats, 'conv1', 'bn1', 1e-4, dtype, strides=2))
  x = nn.relu(conv_bn(x, params, stats, 'conv2', 'bn2', 1e-4, dtype, strides=2))
  for group, down in (('res1', 'down1'), ('res2', 'down2')):
    for index in range(num_residual):
      name = f'{group}_{index}'
      y = gelu(conv_bn(x, params[name], stats[name], 'conv1', 'bn1', 1e-5, dtype))
      x = x + conv_bn(y, params[name], stats[name], 'conv2', 'bn2', 1e-5, dtype)
    x = downsample(x, params[down], dtype)
  return x
