"""Small layers shared by the stem, the MSA block and the baselines, initialised as PyTorch does.

PyTorch's default init (the reference has no custom init): Linear and Conv weights are
kaiming_uniform(a=sqrt(5)), i.e. uniform with variance 1/(3 fan_in); biases uniform(+-1/sqrt(fan_in)).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

torch_weight_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def remat_policy(name: str):
  """'block' saves nothing inside a rematerialised unit; any other name is a jax.checkpoint_policies attribute."""
  if name == 'block':
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None:
    raise ValueError(f"model.remat must be 'none', 'block' or a jax.checkpoint_policies name, got {name!r}")
  return policy


def torch_bias_init(fan_in: int):
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def Linear(features: int, fan_in: int, use_bias: bool = True, dtype: Dtype = jnp.float32, name=None):
  """nn.Dense with PyTorch's nn.Linear initialisation (needs fan_in for the bias bound)."""
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=torch_weight_init,
    bias_init=torch_bias_init(fan_in),
    name=name,
  )


def Conv3x3(
  features: int,
  fan_in_channels: int,
  strides: int = 1,
  use_bias: bool = True,
  dtype: Dtype = jnp.float32,
  name=None,
):
  """3x3 conv padded by 1 on every side, as PyTorch's padding=1 (Flax 'SAME' pads stride 2 asymmetrically)."""
  return nn.Conv(
    features,
    (3, 3),
    strides=(strides, strides),
    padding=((1, 1), (1, 1)),
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=torch_weight_init,
    bias_init=torch_bias_init(9 * fan_in_channels),
    name=name,
  )


LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-5)
gelu = functools.partial(nn.gelu, approximate=False)  # PyTorch nn.GELU is the exact erf form


class DropPath(nn.Module):
  """Stochastic depth with one keep/drop draw per leading row (per window, as the reference), rescaled."""

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool, rate=None):
    """`rate` (a scalar, possibly traced: a scanned stage's per-block rate) overrides the field's, which
    then only says whether drop path exists (0: never)."""
    if deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - (self.rate if rate is None else rate)
    keep = jax.random.bernoulli(self.make_rng('dropout'), keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    # Rescaled in x's own dtype, as a Python-float rate would be: a float32 rate must not promote bf16 x.
    return jnp.where(keep, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros_like(x))


class Mlp(nn.Module):
  """Linear -> exact GELU -> Linear (timm's Mlp, no dropout)."""

  dim: int
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Linear(self.hidden, self.dim, dtype=self.dtype, name='fc1')(x)
    x = gelu(x)
    return Linear(self.dim, self.hidden, dtype=self.dtype, name='fc2')(x)


class PositionMLP(nn.Module):
  """The reference's additive position embedding: Linear(2, 512) -> ReLU -> Linear(512, dim, no bias).

  Applied to normalised (row, col) coordinates, (tokens, 2) -> (tokens, dim).
  """

  dim: int
  hidden: int = 512
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, coordinates):
    x = Linear(self.hidden, 2, dtype=self.dtype, name='fc1')(coordinates)
    x = nn.relu(x)
    return Linear(self.dim, self.hidden, use_bias=False, dtype=self.dtype, name='fc2')(x)
