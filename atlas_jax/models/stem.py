"""Stems: images (batch, H, W, 3) -> the scale-0 token map (batch, H / patch, W / patch, dim).

`ConvStem` is the reference's `MultiConvEmbed` (FasterViT's stem), stride 16; `PatchifyStem` is one strided
conv for patch 4 or 8 (small images, CPU work; no BatchNorm).

With `remat` set, each unit of the conv stem (the two stride-2 convs with their norms, each residual, each
downsample) is rematerialised: at 4096 px its activations are most of the training memory (the 1/2- and
1/4-resolution maps), and the MSA blocks' own remat leaves them saved. Names stay those of the plain stem.

Padded input (`sizes`, docs/any_size.md): the padded pixels are zeroed, and after every layer the positions
that cover no valid pixel are zeroed again, at that layer's stride; BatchNorm's training statistics count
valid positions only. A valid output then reads only valid inputs and zeros, as at the image's own border,
so the stem's output on valid positions does not depend on what the padding held.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from atlas_jax.models.layers import Conv3x3, gelu, remat_policy, torch_bias_init, torch_weight_init
from atlas_jax.models.partitioning import split_rows

# PyTorch BatchNorm momentum 0.1 is Flax momentum 0.9. Training statistics in one pass over the activation
# (E[x^2] - E[x]^2 in float32, beside the mean) instead of two: about 7-10% fewer bytes in the stem's training
# step by XLA's cost analysis, and train-mode logits as close to the reference (experiments/stem_folding).
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, use_fast_variance=True)


def valid_positions(sizes, stride: int, height: int, width: int):
  """(batch, height, width, 1) bool: the positions of a stride-`stride` map that cover a valid pixel of
  images `sizes` (batch, 2) at their top-left (ceil(side / stride) per side)."""
  valid = -(-sizes // stride)
  rows = jnp.arange(height)[None, :] < valid[:, :1]
  cols = jnp.arange(width)[None, :] < valid[:, 1:]
  return (rows[:, :, None] & cols[:, None, :])[..., None]


def _zero_padding(x, mask):
  return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


class ConvResidual(nn.Module):
  """x + BN(Conv(GELU(BN(Conv(x))))): the reference's EarlyConvResidual (convs with bias, BN eps 1e-5).

  `mask` (batch, H, W, 1) bool or None: the valid positions of padded input (module doc)."""

  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    y = Conv3x3(self.width, self.width, dtype=self.dtype, name='conv1')(x)
    y = BatchNorm(use_running_average=not train, epsilon=1e-5, dtype=self.dtype, name='bn1')(y, mask=mask)
    y = _zero_padding(gelu(y), mask)
    y = Conv3x3(self.width, self.width, dtype=self.dtype, name='conv2')(y)
    y = BatchNorm(use_running_average=not train, epsilon=1e-5, dtype=self.dtype, name='bn2')(y, mask=mask)
    return x + _zero_padding(y, mask)


class ConvDownsample(nn.Module):
  """LayerNorm over channels (eps 1e-6, timm's LayerNorm2d) -> 3x3 conv stride 2, no bias."""

  width: int
  out_width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, out_mask=None):
    """`mask`, `out_mask`: the valid positions at the input's and the output's resolution, or None."""
    x = _zero_padding(nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x), mask)
    x = Conv3x3(self.out_width, self.width, strides=2, use_bias=False, dtype=self.dtype, name='conv')(x)
    return _zero_padding(x, out_mask)


class ConvStem(nn.Module):
  """conv 3->in_dim s2, BN, ReLU, conv ->width s2, BN, ReLU; 3 residuals; down x2; 3 residuals; down -> dim."""

  dim: int
  width: int
  in_dim: int = 64
  num_residual: int = 3
  remat: str = 'none'  # none | block | a jax.checkpoint_policies name
  dtype: Any = jnp.float32

  def _to_quarter_resolution(self, images, train: bool, half_mask=None, quarter_mask=None):
    """(batch, H, W, 3) -> (batch, H / 4, W / 4, width): two stride-2 convs, each with BN and ReLU."""
    x = Conv3x3(self.in_dim, images.shape[-1], strides=2, use_bias=False, dtype=self.dtype, name='conv1')(
      images
    )
    x = BatchNorm(use_running_average=not train, epsilon=1e-4, dtype=self.dtype, name='bn1')(
      x, mask=half_mask
    )
    x = _zero_padding(nn.relu(x), half_mask)
    x = Conv3x3(self.width, self.in_dim, strides=2, use_bias=False, dtype=self.dtype, name='conv2')(x)
    x = BatchNorm(use_running_average=not train, epsilon=1e-4, dtype=self.dtype, name='bn2')(
      x, mask=quarter_mask
    )
    return _zero_padding(nn.relu(x), quarter_mask)

  @nn.compact
  def __call__(self, images, train: bool = False, sizes=None):
    """images (batch, H, W, 3), H and W multiples of 16 -> (batch, H / 16, W / 16, dim); `sizes` (batch, 2)
    int: each image's valid (height, width) at the top-left, the rest padding (module doc), or None."""
    residual, downsample = ConvResidual, ConvDownsample
    to_quarter_resolution = type(self)._to_quarter_resolution
    if self.remat != 'none':
      policy = remat_policy(self.remat)
      residual = nn.remat(ConvResidual, static_argnums=(2,), policy=policy)
      downsample = nn.remat(ConvDownsample, policy=policy)
      # A lifted function of this module: its convs and norms keep their names directly under the stem.
      to_quarter_resolution = nn.remat(to_quarter_resolution, static_argnums=(2,), policy=policy)
    masks = {stride: None for stride in (1, 2, 4, 8, 16)}
    if sizes is not None:
      height, width = images.shape[1:3]
      masks = {
        stride: valid_positions(sizes, stride, -(-height // stride), -(-width // stride)) for stride in masks
      }
      images = _zero_padding(images, masks[1])
    # Spatial parallelism: each unit's output keeps the image's rows split (partitioning.py); the 3x3
    # convolutions exchange a halo of rows with the neighbouring devices.
    x = split_rows(to_quarter_resolution(self, images, train, masks[2], masks[4]))
    for i in range(self.num_residual):
      x = split_rows(residual(self.width, self.dtype, name=f'res1_{i}')(x, train, masks[4]))
    x = split_rows(downsample(self.width, 2 * self.width, self.dtype, name='down1')(x, masks[4], masks[8]))
    for i in range(self.num_residual):
      x = split_rows(residual(2 * self.width, self.dtype, name=f'res2_{i}')(x, train, masks[8]))
    return downsample(2 * self.width, self.dim, self.dtype, name='down2')(x, masks[8], masks[16])


class PatchifyStem(nn.Module):
  """One conv with kernel = stride = patch_size."""

  dim: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False, sizes=None):
    """`sizes` (batch, 2) or None: as ConvStem's; padded pixels are zeroed, so a token that covers some of
    them sees zeros there, as the image alone padded to whole patches would."""
    del train  # no BatchNorm: nothing differs between train and eval
    if sizes is not None:
      height, width = images.shape[1:3]
      images = _zero_padding(images, valid_positions(sizes, 1, height, width))
    fan_in = images.shape[-1] * self.patch_size**2
    return nn.Conv(
      self.dim,
      (self.patch_size,) * 2,
      strides=(self.patch_size,) * 2,
      padding='VALID',
      dtype=self.dtype,
      kernel_init=torch_weight_init,
      bias_init=torch_bias_init(fan_in),
      name='patch',
    )(images)
