"""The one attention function every block calls: cuDNN flash attention on GPU in bf16/fp16, XLA elsewhere."""

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'cudnn', 'xla')


def resolve_implementation(implementation: str, dtype) -> str:
  """`auto` picks cuDNN where it runs (a GPU, half precision); XLA everywhere else (CPU, TPU, float32)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention must be one of {IMPLEMENTATIONS}, got {implementation!r}')
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  on_gpu = jax.default_backend() == 'gpu'
  if implementation == 'auto':
    return 'cudnn' if on_gpu and half else 'xla'
  if implementation == 'cudnn' and not (on_gpu and half):
    raise ValueError(
      "model.attention='cudnn' needs a GPU and model.dtype bfloat16 or float16; "
      "use model.attention='auto' or 'xla' here"
    )
  return implementation


def dot_product_attention(query, key, value, implementation: str = 'auto'):
  """Softmax attention, scale 1/sqrt(head_dim), no mask or bias.

  query: (batch, q_tokens, heads, head_dim); key, value: (batch, kv_tokens, heads, head_dim).
  Returns (batch, q_tokens, heads, head_dim).
  """
  implementation = resolve_implementation(implementation, query.dtype)
  return jax.nn.dot_product_attention(query, key, value, implementation=implementation)
