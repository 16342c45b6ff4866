"""Any image size (docs/any_size.md): padding never reaches a valid token, batching never changes an image,
windowable sizes keep today's numbers, and the masked block is the block on the valid tokens alone."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.config import resolve
from atlas_jax.models import build_model
from atlas_jax.models import geometry as geometry_lib
from atlas_jax.models import layout as layout_lib
from atlas_jax.models.attention import masked_attention, valid_first_attention
from atlas_jax.models.layout import LayoutError
from atlas_jax.models.msa import MSABlock, map_from_windows, windows_from_map
from configs import common

PINNED = 'tests/fixtures/pinned_windowable_logits.npz'


def _config(name='atlas', patch_size=4, size=32, communication='full', composition='atlas', **fields):
  """A tiny model: 4x4-token windows and 2x2 pooling, so small images already have several scales."""
  config = common.base_config('T', size)
  config.model.update(
    name=name,
    patch_size=patch_size,
    communication=communication,
    composition=composition,
    dim=16,
    num_heads=2,
    stem_width=4,
    stem_in_dim=4,
    depths=(1, 1),
    num_classes=5,
    dtype='float32',
    drop_path_rate=0.0,
    window=4,
    pool=2,
  )
  config.model.update(fields)
  return resolve(config)


def _relative_difference(first, second) -> float:
  first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
  return float(np.abs(first - second).max() / max(np.abs(first).max(), 1e-30))


def _valid_pixels(sizes, height, width):
  """(batch, height, width, 1) bool: the pixels inside each image's size, at the top-left."""
  sizes = np.asarray(sizes)
  rows = np.arange(height)[None, :] < sizes[:, :1]
  cols = np.arange(width)[None, :] < sizes[:, 1:]
  return (rows[:, :, None] & cols[:, None, :])[..., None]


def _valid_features(features, size, config, num_scales):
  """Image-size `size`'s valid region of every scale's map (batch row already taken)."""
  model = config.model
  sides = layout_lib.valid_token_sides(size, model.patch_size, num_scales, model.pool)
  return [np.asarray(token_map[:rows, :cols]) for token_map, (rows, cols) in zip(features, sides)]


# (stem, patch size, config image size, canvas, the batch's image sizes). The second case's canvas holds
# whole windows of padding at every scale; every size here is unwindowable.
INVARIANCE_CASES = [
  ('conv', 16, 256, (1000, 1500), [(1000, 1500), (777, 1234)]),
  ('patchify', 8, 128, (700, 4000), [(300, 4000), (450, 1800)]),
]


@pytest.mark.parametrize('stem, patch_size, size, canvas, sizes', INVARIANCE_CASES)
def test_padding_content_changes_no_logit_feature_or_gradient(stem, patch_size, size, canvas, sizes):
  """Zeros vs random values in the padding: the same logits, valid features and gradients (1e-5 relative
  per leaf), in float32, with train-mode BatchNorm (statistics of valid positions only)."""
  config = _config(patch_size=patch_size, size=size, depths=(1, 1, 1))
  model = build_model(config)
  height, width = canvas
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  assert ('batch_stats' in variables) == (stem == 'conv')
  sizes = jnp.asarray(sizes, jnp.int32)
  weights = jnp.arange(1.0, 6.0)

  @jax.jit
  def outputs(images):
    def loss(params):
      logits, _ = model.apply(
        {**variables, 'params': params}, images, train=True, sizes=sizes, mutable=['batch_stats']
      )
      return jnp.sum(jax.nn.log_softmax(logits) * weights)

    grads = jax.grad(loss)(variables['params'])
    logits = model.apply(variables, images, sizes=sizes)
    features = model.apply(variables, images, sizes=sizes, method='features')
    return logits, features, grads

  content = jax.random.normal(jax.random.key(1), (len(sizes), height, width, 3))
  noise = 3.0 * jax.random.normal(jax.random.key(2), content.shape)
  valid = jnp.asarray(_valid_pixels(sizes, height, width))
  zero_padded = outputs(jnp.where(valid, content, 0.0))
  noise_padded = outputs(jnp.where(valid, content, noise))

  assert _relative_difference(zero_padded[0], noise_padded[0]) < 1e-5
  for index, image_size in enumerate(np.asarray(sizes)):
    for first, second in zip(
      _valid_features([m[index] for m in zero_padded[1]], image_size, config, 3),
      _valid_features([m[index] for m in noise_padded[1]], image_size, config, 3),
    ):
      assert first.size and _relative_difference(first, second) < 1e-5
  flat_zero = flax.traverse_util.flatten_dict(zero_padded[2])
  flat_noise = flax.traverse_util.flatten_dict(noise_padded[2])
  for path, leaf in flat_zero.items():
    assert _relative_difference(leaf, flat_noise[path]) < 1e-5, '/'.join(path)
  # The padding is not inert because nothing reached it: zeroing it out of the loss would change nothing,
  # yet the valid region is what the gradients see.
  assert any(np.abs(np.asarray(leaf)).max() > 0 for leaf in flat_zero.values())


VARIANTS = [
  ('atlas', 'full', 'atlas'),
  ('atlas', 'top_down', 'atlas'),
  ('atlas', 'bottom_up', 'atlas'),
  ('atlas', 'none', 'atlas'),
  ('atlas', 'full', 'stack'),
  ('vit', 'full', 'atlas'),
  ('window_vit', 'full', 'atlas'),
]


@pytest.mark.parametrize('name, communication, composition', VARIANTS)
def test_an_image_alone_and_in_a_larger_batch_agree(name, communication, composition):
  """Image A at its own (unwindowable) size, and A beside a larger image B on B's canvas, padding random."""
  num_scales = 2 if name == 'atlas' else 1  # 32 px at patch 4: 8x8 and 4x4 tokens
  config = _config(name, communication=communication, composition=composition)
  model = build_model(config)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  image = jax.random.normal(jax.random.key(1), (1, 37, 53, 3))
  canvas = jax.random.normal(jax.random.key(2), (2, 61, 70, 3)).at[0, :37, :53].set(image[0])
  sizes = jnp.asarray([[37, 53], [61, 70]])

  @jax.jit
  def logits_and_features(images, sizes):
    return model.apply(variables, images, sizes=sizes), model.apply(
      variables, images, sizes=sizes, method='features'
    )

  alone, alone_features = logits_and_features(image, None)
  together, together_features = logits_and_features(canvas, sizes)
  assert _relative_difference(alone[0], together[0]) < 1e-5
  assert len(alone_features) == num_scales
  for first, second in zip(
    _valid_features([m[0] for m in alone_features], (37, 53), config, num_scales),
    _valid_features([m[0] for m in together_features], (37, 53), config, num_scales),
  ):
    assert _relative_difference(first, second) < 1e-5
  shapes = [
    m.shape[:2] for m in _valid_features([m[0] for m in alone_features], (37, 53), config, num_scales)
  ]
  assert shapes == [(math.ceil(37 / 4 / 2**s), math.ceil(53 / 4 / 2**s)) for s in range(num_scales)]


@pytest.mark.parametrize('name', ['atlas_conv', 'atlas_patchify'])
def test_windowable_sizes_give_the_logits_pinned_before_padding_existed(name):
  """The fixture holds weights, input and logits written by the code before any-size input."""
  pinned = np.load(PINNED)
  prefix = f'{name}/variables/'
  variables = flax.traverse_util.unflatten_dict(
    {tuple(key[len(prefix) :].split('/')): pinned[key] for key in pinned.files if key.startswith(prefix)}
  )
  pixels = pinned[f'{name}/pixels']
  patch_size = 16 if name == 'atlas_conv' else 4
  config = common.base_config('T', 1024)
  config.image_size = pixels.shape[1:3]
  config.model.update(
    patch_size=patch_size, dim=32, num_heads=2, stem_width=8, stem_in_dim=8, depths=(1, 1), num_classes=7
  )
  config.model.dtype = 'float32'
  model = build_model(resolve(config))
  images = jnp.asarray(pixels, jnp.float32) / 64.0 - 2.0
  geometry, _, _ = model.apply(variables, images, method='geometry')
  assert not geometry.padded  # today's code path, unmasked
  logits = jax.jit(model.apply)(variables, images)
  assert _relative_difference(pinned[f'{name}/logits'], logits) < 1e-6


def test_padded_layouts_follow_the_contract():
  # 1000x1500 px at patch 16 with Atlas-B's 16-token windows and 4x4 pooling, two scales.
  assert layout_lib.canvas_layouts((63, 94), 2) == (
    layout_lib.ScaleLayout(64, 96, 16, 16),
    layout_lib.ScaleLayout(16, 32, 16, 16),  # 16x24 pooled, padded to whole windows
  )
  # A side no larger than a window keeps its own side, rounded to the pool where it is pooled again.
  assert layout_lib.canvas_layouts((10, 19), 2) == (
    layout_lib.ScaleLayout(12, 32, 12, 16),
    layout_lib.ScaleLayout(3, 8, 3, 8),
  )
  # Windowable sizes pad nothing.
  assert layout_lib.canvas_layouts((128, 64), 3) == layout_lib.check_image_size((2048, 1024), 16)
  assert layout_lib.valid_token_sides((1000, 1500), 16, 3, 4) == [(63, 94), (16, 24), (4, 6)]


def test_the_raster_rule_is_refused_where_padding_would_change_it():
  config = _config(parent_window='raster')
  model = build_model(config)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(LayoutError, match="parent_window='spatial'"):
    model.apply(variables, jnp.zeros((1, 37, 53, 3)))


def test_valid_first_attention_with_lengths_equals_the_masked_attention():
  """The cuDNN path's reordering, run here by XLA with per-row key lengths, against the explicit mask."""
  keys = jax.random.split(jax.random.key(0), 4)
  rows, queries, length, heads, head_dim = 6, 5, 11, 2, 8
  query = jax.random.normal(keys[0], (rows, queries, heads, head_dim))
  key = jax.random.normal(keys[1], (rows, length, heads, head_dim))
  value = jax.random.normal(keys[2], (rows, length, heads, head_dim))
  key_mask = jax.random.bernoulli(keys[3], 0.5, (rows, length)).at[:, 3].set(True)
  key_mask = key_mask.at[0].set(False).at[0, 10].set(True)  # one valid key, the last
  key_mask = key_mask.at[1].set(True)  # no padding
  reordered = valid_first_attention(query, key, value, key_mask, implementation='xla')
  masked = masked_attention(query, key, value, key_mask, implementation='xla')
  np.testing.assert_allclose(np.asarray(reordered), np.asarray(masked), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# One masked MSA block against the block computed from its definition, in float64, on valid tokens only.


def _layer_norm(x, params, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  variance = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(variance + eps) * params['scale'] + params['bias']


def _dense(x, params):
  return x @ params['kernel'] + (params['bias'] if 'bias' in params else 0.0)


def _gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _attend(scale_params, query_token, key_tokens, key_params, heads):
  """One query token (dim,) attending to key tokens (n, dim) projected by `key_params`' norm and kv."""
  dim = query_token.shape[-1]
  head_dim = dim // heads
  query = _dense(_layer_norm(query_token, scale_params['norm_q']), scale_params['q']).reshape(heads, head_dim)
  kv = _dense(_layer_norm(key_tokens, key_params['norm_kv']), key_params['kv']).reshape(
    -1, 2, heads, head_dim
  )
  logits = np.einsum('hd,nhd->hn', query, kv[:, 0]) / math.sqrt(head_dim)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  attended = np.einsum('hn,nhd->hd', weights, kv[:, 1]).reshape(dim)
  return _dense(attended, scale_params['proj'])


def _mlp_residual(token, scale_params):
  hidden = _gelu(_dense(_layer_norm(token, scale_params['norm_mlp']), scale_params['mlp']['fc1']))
  return token + _dense(hidden, scale_params['mlp']['fc2'])


def _reference_block(params, scales, valid_sides, window_sides, pool, heads):
  """The MSA block of one image from docs/model.md's definition: scales[s] (rows, cols, dim) float64 maps, of
  which the top-left `valid_sides[s]` are the image; windows of `window_sides[s]` tokens."""
  scales = [np.array(scale[:rows, :cols]) for scale, (rows, cols) in zip(scales, valid_sides)]
  count = len(scales)

  def window_of(scale, row, col):
    window_rows, window_cols = window_sides[scale]
    return row // window_rows, col // window_cols

  def members(scale, window):
    rows, cols = valid_sides[scale]
    return [(r, c) for r in range(rows) for c in range(cols) if window_of(scale, r, c) == window]

  # (a) window-local position embedding
  for s in range(count):
    window_rows, window_cols = window_sides[s]
    position = params[f'position{s}']
    for r in range(valid_sides[s][0]):
      for c in range(valid_sides[s][1]):
        coordinates = np.array(
          [
            ((r % window_rows) - window_rows // 2) / max(window_rows // 2, 1),
            ((c % window_cols) - window_cols // 2) / max(window_cols // 2, 1),
          ]
        )
        hidden = np.maximum(_dense(coordinates, position['fc1']), 0.0)
        scales[s][r, c] += _dense(hidden, position['fc2'])
  # (b) cumulative max-pooled summaries over valid fine tokens
  for s in range(count - 1):
    for i in range(valid_sides[s + 1][0]):
      for j in range(valid_sides[s + 1][1]):
        block = scales[s][i * pool : (i + 1) * pool, j * pool : (j + 1) * pool]
        scales[s + 1][i, j] += block.reshape(-1, block.shape[-1]).max(axis=0)
  # (c) top-down: own window, then at every coarser (already updated) scale the window covering this one
  for s in reversed(range(count)):
    before = scales[s].copy()
    updated = scales[s].copy()
    for r in range(valid_sides[s][0]):
      for c in range(valid_sides[s][1]):
        window = window_of(s, r, c)
        own = members(s, window)
        key_parts = [(np.stack([before[t] for t in own]), params[f'scale{s}'])]
        top_row, top_col = window[0] * window_sides[s][0], window[1] * window_sides[s][1]
        for t in range(s + 1, count):
          down = pool ** (t - s)
          parent = members(t, window_of(t, top_row // down, top_col // down))
          key_parts.append((np.stack([scales[t][u] for u in parent]), params[f'scale{t}']))
        # K/V of each scale come from its own norm and projection: attend to the concatenation.
        dim = before.shape[-1]
        head_dim = dim // heads
        scale_params = params[f'scale{s}']
        query = _dense(_layer_norm(before[r, c], scale_params['norm_q']), scale_params['q']).reshape(
          heads, head_dim
        )
        kv = np.concatenate(
          [
            _dense(_layer_norm(tokens, key_params['norm_kv']), key_params['kv']).reshape(
              -1, 2, heads, head_dim
            )
            for tokens, key_params in key_parts
          ]
        )
        logits = np.einsum('hd,nhd->hn', query, kv[:, 0]) / math.sqrt(head_dim)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = np.einsum('hn,nhd->hd', weights, kv[:, 1]).reshape(dim)
        token = before[r, c] + _dense(attended, scale_params['proj'])
        updated[r, c] = _mlp_residual(token, scale_params)
    scales[s] = updated
  # (d) bottom-up: each coarse token attends to the fine window beneath it, then its MLP again
  for s in range(1, count):
    updated = scales[s].copy()
    for i in range(valid_sides[s][0]):
      for j in range(valid_sides[s][1]):
        fine = members(s - 1, window_of(s - 1, i * pool, j * pool))
        keys = np.stack([scales[s - 1][u] for u in fine])
        token = scales[s][i, j] + _attend(
          params[f'scale{s}'], scales[s][i, j], keys, params[f'scale{s - 1}'], heads
        )
        updated[i, j] = _mlp_residual(token, params[f'scale{s}'])
    scales[s] = updated
  return scales


def test_a_masked_block_is_the_block_on_the_valid_tokens_alone():
  """Image 0 (3x5 tokens at scale 0) beside a larger image 1 (14x9): its own scale-1 window is 2x4 tokens
  inside the canvas's 4x4 windows, its scale-0 windows padded; three scales, full communication."""
  window, pool, dim, heads, num_scales = 4, 2, 8, 2, 3
  block = MSABlock(num_scales=num_scales, dim=dim, num_heads=heads, pool=pool)
  canvas = layout_lib.canvas_layouts((14, 9), num_scales, window, pool)
  sizes = jnp.asarray([[3, 5], [14, 9]])  # in tokens: patch size 1
  geometry = geometry_lib.padded_geometry(canvas, sizes, 1, window, pool)
  maps = [
    jax.random.normal(jax.random.key(s), (2, layout.height, layout.width, dim))
    for s, layout in enumerate(canvas)
  ]
  tokens = [windows_from_map(m, layout.window_height, layout.window_width) for m, layout in zip(maps, canvas)]
  variables = jax.jit(block.init)(jax.random.key(9), tokens, geometry)
  with jax.default_matmul_precision('highest'):
    outputs = jax.jit(block.apply)(variables, tokens, geometry)
  outputs = [
    np.asarray(map_from_windows(o, layout.height, layout.width, layout.window_height, layout.window_width))
    for o, layout in zip(outputs, canvas)
  ]

  rows = layout_lib.pyramid_sides(3, num_scales, window, pool)
  cols = layout_lib.pyramid_sides(5, num_scales, window, pool)
  valid_sides = [(row[0], col[0]) for row, col in zip(rows, cols)]
  window_sides = [(row[2], col[2]) for row, col in zip(rows, cols)]
  assert window_sides[1] == (2, 4) and canvas[1].window_height == 4  # the image's own, smaller window
  params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), flax.core.unfreeze(variables['params']))
  expected = _reference_block(
    params, [np.asarray(m[0], np.float64) for m in maps], valid_sides, window_sides, pool, heads
  )
  for scale, (rows_valid, cols_valid) in enumerate(valid_sides):
    got = outputs[scale][0, :rows_valid, :cols_valid]
    np.testing.assert_allclose(got, expected[scale], rtol=1e-5, atol=1e-5, err_msg=f'scale {scale}')
