"""The one attention function every block calls: cuDNN flash attention on GPU in bf16/fp16, XLA elsewhere.

Padded input passes a key mask. XLA applies it as a mask. cuDNN's flash kernel takes per-row key lengths
instead of a mask (an explicit mask would drop to a slower kernel), so `valid_first_attention` moves each
row's valid keys to the front, in their order, and passes their count: attention without a bias does not
depend on the order of its keys, and the position embedding has already been added to the tokens.
"""

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


def dot_product_attention(query, key, value, implementation: str = 'auto', key_mask=None):
  """Softmax attention, scale 1/sqrt(head_dim), no bias; `key_mask` (batch, kv_tokens) bool or None.

  query: (batch, q_tokens, heads, head_dim); key, value: (batch, kv_tokens, heads, head_dim).
  Returns (batch, q_tokens, heads, head_dim). Every row of `key_mask` must hold a valid key.
  """
  implementation = resolve_implementation(implementation, query.dtype)
  if key_mask is None:
    return jax.nn.dot_product_attention(query, key, value, implementation=implementation)
  if implementation == 'cudnn':
    return valid_first_attention(query, key, value, key_mask, implementation)
  return masked_attention(query, key, value, key_mask, implementation)


def masked_attention(query, key, value, key_mask, implementation: str = 'xla'):
  """Attention with the key mask broadcast over heads and queries: (batch, 1, 1, kv_tokens)."""
  mask = key_mask[:, None, None, :]
  return jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=implementation)


def valid_first_attention(query, key, value, key_mask, implementation: str = 'cudnn'):
  """The same attention as `masked_attention`, as cuDNN's flash kernel takes it: keys reordered so each
  row's valid ones come first (a stable sort keeps their order), and their count as the row's length."""
  order = jnp.argsort(~key_mask, axis=1, stable=True)  # (batch, kv_tokens): valid keys first
  key = jnp.take_along_axis(key, order[:, :, None, None], axis=1)
  value = jnp.take_along_axis(value, order[:, :, None, None], axis=1)
  lengths = key_mask.sum(axis=1, dtype=jnp.int32)
  return jax.nn.dot_product_attention(
    query, key, value, key_value_seq_lengths=lengths, implementation=implementation
  )
