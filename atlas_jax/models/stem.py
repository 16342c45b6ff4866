"""Stems: images (batch, H, W, 3) -> the scale-0 token map (batch, H / patch, W / patch, dim).

`ConvStem` is the reference's `MultiConvEmbed` (FasterViT's stem), stride 16; `PatchifyStem` is one strided
conv for patch 4 or 8 (small images, CPU work; no BatchNorm).

With `remat` set, each unit of the conv stem (the two stride-2 convs with their norms, each residual, each
downsample) is rematerialised: at 4096 px its activations are most of the training memory (the 1/2- and
1/4-resolution maps), and the MSA blocks' own remat leaves them saved. Names stay those of the plain stem.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from atlas_jax.models.layers import Conv3x3, gelu, remat_policy, torch_bias_init, torch_weight_init

# PyTorch BatchNorm momentum 0.1 is Flax momentum 0.9. Training statistics in one pass over the activation
# (E[x^2] - E[x]^2 in float32, beside the mean) instead of two: about 7-10% fewer bytes in the stem's training
# step by XLA's cost analysis, and train-mode logits as close to the reference (experiments/stem_folding).
BatchNorm = functools.partial(nn.BatchNorm, momentum=0.9, use_fast_variance=True)


class ConvResidual(nn.Module):
  """x + BN(Conv(GELU(BN(Conv(x))))): the reference's EarlyConvResidual (convs with bias, BN eps 1e-5)."""

  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    y = Conv3x3(self.width, self.width, dtype=self.dtype, name='conv1')(x)
    y = BatchNorm(use_running_average=not train, epsilon=1e-5, dtype=self.dtype, name='bn1')(y)
    y = gelu(y)
    y = Conv3x3(self.width, self.width, dtype=self.dtype, name='conv2')(y)
    y = BatchNorm(use_running_average=not train, epsilon=1e-5, dtype=self.dtype, name='bn2')(y)
    return x + y


class ConvDownsample(nn.Module):
  """LayerNorm over channels (eps 1e-6, timm's LayerNorm2d) -> 3x3 conv stride 2, no bias."""

  width: int
  out_width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    return Conv3x3(self.out_width, self.width, strides=2, use_bias=False, dtype=self.dtype, name='conv')(x)


class ConvStem(nn.Module):
  """conv 3->in_dim s2, BN, ReLU, conv ->width s2, BN, ReLU; 3 residuals; down x2; 3 residuals; down -> dim."""

  dim: int
  width: int
  in_dim: int = 64
  num_residual: int = 3
  remat: str = 'none'  # none | block | a jax.checkpoint_policies name
  dtype: Any = jnp.float32

  def _to_quarter_resolution(self, images, train: bool):
    """(batch, H, W, 3) -> (batch, H / 4, W / 4, width): two stride-2 convs, each with BN and ReLU."""
    x = Conv3x3(self.in_dim, images.shape[-1], strides=2, use_bias=False, dtype=self.dtype, name='conv1')(
      images
    )
    x = nn.relu(BatchNorm(use_running_average=not train, epsilon=1e-4, dtype=self.dtype, name='bn1')(x))
    x = Conv3x3(self.width, self.in_dim, strides=2, use_bias=False, dtype=self.dtype, name='conv2')(x)
    return nn.relu(BatchNorm(use_running_average=not train, epsilon=1e-4, dtype=self.dtype, name='bn2')(x))

  @nn.compact
  def __call__(self, images, train: bool = False):
    residual, downsample = ConvResidual, ConvDownsample
    to_quarter_resolution = type(self)._to_quarter_resolution
    if self.remat != 'none':
      policy = remat_policy(self.remat)
      residual = nn.remat(ConvResidual, static_argnums=(2,), policy=policy)
      downsample = nn.remat(ConvDownsample, policy=policy)
      # A lifted function of this module: its convs and norms keep their names directly under the stem.
      to_quarter_resolution = nn.remat(to_quarter_resolution, static_argnums=(2,), policy=policy)
    x = to_quarter_resolution(self, images, train)
    for i in range(self.num_residual):
      x = residual(self.width, self.dtype, name=f'res1_{i}')(x, train)
    x = downsample(self.width, 2 * self.width, self.dtype, name='down1')(x)
    for i in range(self.num_residual):
      x = residual(2 * self.width, self.dtype, name=f'res2_{i}')(x, train)
    return downsample(2 * self.width, self.dim, self.dtype, name='down2')(x)


class PatchifyStem(nn.Module):
  """One conv with kernel = stride = patch_size."""

  dim: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    del train  # no BatchNorm: nothing differs between train and eval
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
