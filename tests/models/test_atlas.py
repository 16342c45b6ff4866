"""Atlas and its baselines: sizes, parameter counts, every switch, gradients, drop path."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax.config import resolve
from atlas_jax.models import build_model
from atlas_jax.models import layout as layout_lib
from atlas_jax.models.geometry import Geometry
from atlas_jax.models.layers import DropPath
from atlas_jax.models.layout import LayoutError
from atlas_jax.models.msa import MSABlock
from atlas_jax.models.stem import ConvStem
from configs import common


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _abstract_variables(config):
  config = resolve(config)
  model = build_model(config)
  height, width = config.image_size
  return model, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, height, width, 3)))


@pytest.mark.parametrize(
  'size, depths, expected',
  [
    (1024, None, 118_253_604),
    (2048, None, 148_190_244),
    (2048, (2, 10), 208_063_524),  # the reference's two-stage variant
  ],
)
def test_atlas_b_parameter_count(size, depths, expected):
  config = common.base_config('B', size)
  config.model.depths = depths
  _, variables = _abstract_variables(config)
  assert _count(variables['params']) == expected


# (H, W) -> per stage, the (windows, tokens) of each scale present, finest first.
EXPECTED_SCALES = {
  (1024, 1024): [[(16, 256), (1, 256)], [(1, 256)]],
  (2048, 2048): [[(64, 256), (4, 256), (1, 64)], [(4, 256), (1, 64)], [(1, 64)]],
  (4096, 4096): [[(256, 256), (16, 256), (1, 256)], [(16, 256), (1, 256)], [(1, 256)]],
  (1024, 2048): [[(32, 256), (2, 256), (1, 32)], [(2, 256), (1, 32)], [(1, 32)]],
}


@pytest.mark.parametrize('variant, dim', [('S', 384), ('B', 768)])
@pytest.mark.parametrize('size', list(EXPECTED_SCALES))
def test_scale_shapes(variant, dim, size):
  config = common.base_config(variant, size)
  model = build_model(resolve(config))
  batch = 2
  stem_map, stages = jax.eval_shape(
    lambda images: model.init_with_output(jax.random.key(0), images, method=model.encode)[0],
    jnp.zeros((batch,) + size + (3,)),
  )
  assert stem_map.shape == (batch, size[0] // 16, size[1] // 16, dim)
  got = [[(tokens.shape[0] // batch, tokens.shape[1]) for tokens in scales] for scales in stages]
  assert got == EXPECTED_SCALES[size]
  assert all(tokens.shape[2] == dim for scales in stages for tokens in scales)


# (2048, 128): each side fits as a square's, but not together (128 tokens are pooled twice, 8 tokens not).
@pytest.mark.parametrize('size', [1000, (1024, 1000), 1280, 100, (2048, 128)])
def test_unwindowable_size_is_refused_naming_sizes_that_work(size):
  config = common.base_config('S', size)
  with pytest.raises(LayoutError, match='nearest sizes that work: ') as error:
    build_model(resolve(config))
  assert '\n' not in str(error.value)
  suggestions = str(error.value).split('nearest sizes that work: ')[1].split(', ')
  for suggestion in suggestions:
    height, width = map(int, suggestion.split('x'))
    layout_lib.check_image_size((height, width), 16)  # each suggestion really works


@pytest.mark.parametrize('size', [256, 512, 768, 1024, 2048, 3072, 4096, (1024, 2048)])
def test_listed_sizes_are_accepted(size):
  build_model(resolve(common.base_config('S', size)))
  assert resolve(common.base_config('S', size)).image_size == (
    (size, size) if isinstance(size, int) else size
  )


def test_more_stages_than_scales_is_refused():
  config = common.base_config('S', 1024)
  config.model.depths = (1, 1, 1)
  with pytest.raises(LayoutError, match='only 2 scales'):
    resolve(config)


def test_default_depths_follow_the_number_of_scales():
  depths = {size: resolve(common.base_config('S', size)).model.depths for size in (256, 1024, 2048, 4096)}
  assert depths == {256: (12,), 1024: (2, 10), 2048: (2, 2, 8), 4096: (2, 2, 8)}


def _small_config(name='atlas', communication='full', composition='atlas', patch_size=4, size=32):
  """A two-scale model small enough to compile fast: 4x4-token windows and 2x2 pooling, so 32 px at patch 4
  gives an 8x8 token map (4 windows) and a 4x4 coarse scale (1 window)."""
  config = common.base_config('T', size)
  config.model.update(
    name=name,
    communication=communication,
    composition=composition,
    patch_size=patch_size,
    dim=16,
    num_heads=2,
    stem_width=4,
    depths=(1, 1),
    num_classes=5,
    dtype='float32',
    drop_path_rate=0.1,
    window=4,
    pool=2,
  )
  return config


def _images(batch=2, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


# The conv stem (patch 16) stands in for one variant, so BatchNorm and the stem get their gradients checked.
VARIANTS = [
  ('atlas', 'full', 'atlas', 16),
  ('atlas', 'top_down', 'atlas', 4),
  ('atlas', 'bottom_up', 'atlas', 4),
  ('atlas', 'none', 'atlas', 4),
  ('atlas', 'full', 'stack', 4),
  ('vit', 'full', 'atlas', 4),
  ('window_vit', 'full', 'atlas', 4),
]


@pytest.mark.parametrize('name, communication, composition, patch_size', VARIANTS)
def test_every_switch_runs_forward_and_backward(name, communication, composition, patch_size):
  size = 8 * patch_size
  model = build_model(resolve(_small_config(name, communication, composition, patch_size, size)))
  images = _images(size=size)
  variables = jax.jit(model.init)(jax.random.key(0), images)

  @jax.jit
  def loss_and_grads(params):
    def loss(params):
      logits, _ = model.apply(
        {**variables, 'params': params},
        images,
        train=True,
        rngs={'dropout': jax.random.key(1)},
        mutable=['batch_stats'],
      )
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

    return jax.value_and_grad(loss)(params)

  loss, grads = loss_and_grads(variables['params'])
  assert np.isfinite(loss)
  assert ('batch_stats' in variables) == (patch_size == 16)
  flat = flax.traverse_util.flatten_dict(grads)
  assert all(np.all(np.isfinite(leaf)) for leaf in flat.values())
  if communication in ('full', 'bottom_up') or composition == 'stack':
    # Gradients reach every parameter. (With atlas composition and no bottom-up, the finest scale's last
    # update in stage 0 feeds nothing: that is the ablation, not a bug.)
    dead = ['/'.join(path) for path, leaf in flat.items() if not np.any(np.asarray(leaf))]
    assert not dead


@pytest.mark.parametrize('communication, independent', [('none', True), ('full', False)])
def test_fine_tokens_see_other_windows_only_through_communication(communication, independent):
  """d(fine window 0 after stage 0) / d(pixels of the last window): zero for `none`, not for `full`."""
  config = _small_config(communication=communication)
  config.model.drop_path_rate = 0.0
  model = build_model(resolve(config))
  images = _images(batch=1)
  variables = jax.jit(model.init)(jax.random.key(0), images)

  def first_window(images):
    return model.apply(variables, images, method=model.encode)[1][0][0][0].sum()

  pixel_grads = jax.jit(jax.grad(first_window))(images)
  # The patchify stem has no overlap, so window 3 (bottom-right 16x16 pixels) reaches window 0 only
  # through attention across windows.
  far = np.abs(np.asarray(pixel_grads[0, 16:, 16:])).max()
  near = np.abs(np.asarray(pixel_grads[0, :16, :16])).max()
  assert near > 0
  assert (far == 0) == independent


def test_drop_path_masks_differ_between_windows_of_one_image():
  layout = layout_lib.ScaleLayout(16, 16, 4, 4)  # 16 windows of one image
  block = MSABlock(num_scales=1, dim=8, num_heads=2, drop_path_rate=0.5)
  tokens = jax.random.normal(jax.random.key(0), (16, 16, 8))
  geometry = Geometry((layout,))
  variables = block.init(jax.random.key(1), [tokens], geometry)
  trained = block.apply(variables, [tokens], geometry, False, rngs={'dropout': jax.random.key(2)})[0]
  # With both residual branches dropped a window is its input plus the position embedding.
  positions = block.apply(
    variables,
    jnp.asarray(layout_lib.window_coordinates(layout)),
    method=lambda module, coordinates: module.positions[0](coordinates),
  )
  untouched = np.all(np.isclose(np.asarray(trained), np.asarray(tokens + positions), atol=1e-6), axis=(1, 2))
  assert untouched.any() and not untouched.all()
  keep = DropPath(0.5).apply({}, jnp.ones((64, 3, 2)), False, rngs={'dropout': jax.random.key(3)})
  rows = np.asarray(keep).reshape(64, -1)
  assert np.all(rows == rows[:, :1])  # one decision per row (window)
  assert set(np.unique(rows)) == {0.0, 2.0}  # dropped, or kept and rescaled by 1 / keep_prob


def test_batchnorm_uses_the_statistics_of_the_whole_batch():
  """Train-mode BatchNorm under jit: an image's output depends on the other images of the batch."""
  stem = ConvStem(dim=8, width=2, in_dim=4)
  images = _images(batch=4, size=32)
  variables = stem.init(jax.random.key(0), images)
  apply = jax.jit(lambda images: stem.apply(variables, images, train=True, mutable=['batch_stats'])[0])
  together = apply(images)
  changed = apply(images.at[1:].multiply(3.0))
  assert not np.allclose(together[0], changed[0])


def test_initialization_follows_pytorch_defaults():
  """Linear/Conv weights kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)); biases U(+-1/sqrt(fan_in))."""
  from atlas_jax.models.layers import Conv3x3, Linear

  dense = Linear(512, 256).init(jax.random.key(0), jnp.zeros((1, 256)))['params']
  conv = Conv3x3(64, 32).init(jax.random.key(1), jnp.zeros((1, 8, 8, 32)))['params']
  for params, fan_in in ((dense, 256), (conv, 9 * 32)):
    bound = 1 / np.sqrt(fan_in)
    kernel, bias = np.asarray(params['kernel']), np.asarray(params['bias'])
    assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
    assert abs(kernel.std() - bound / np.sqrt(3)) < 0.02 * bound  # uniform's std is bound / sqrt(3)
    assert bias.std() > 0.4 * bound  # biases are not zero-initialised


def test_a_window_that_is_not_a_multiple_of_the_pool_is_refused():
  config = common.base_config('S', 384)
  config.model.update(patch_size=4, window=8, pool=3)
  with pytest.raises(LayoutError, match='model.window=8 must be a multiple of model.pool=3'):
    build_model(resolve(config))


@pytest.mark.parametrize('remat', ['block', 'dots_saveable'])
def test_stem_remat_keeps_names_and_numbers_and_saves_fewer_residuals(remat):
  from jax._src.ad_checkpoint import saved_residuals  # public only as print_saved_residuals

  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  plain = ConvStem(dim=32, width=16, in_dim=8)
  rematerialised = ConvStem(dim=32, width=16, in_dim=8, remat=remat)
  # Jitted: op by op, the two backward passes would compile hundreds of small programs.
  variables = jax.jit(lambda key: plain.init(key, images, True))(jax.random.key(0))
  assert jax.tree.structure(
    jax.eval_shape(lambda key: rematerialised.init(key, images, True), jax.random.key(0))
  ) == jax.tree.structure(variables)

  def loss(params, stem):
    out, updates = stem.apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, images, True, mutable=['batch_stats']
    )
    return (out**2).mean(), updates

  def loss_and_grads(stem):
    return jax.jit(jax.value_and_grad(lambda params: loss(params, stem), has_aux=True))(variables['params'])

  (plain_loss, plain_stats), plain_grads = loss_and_grads(plain)
  (remat_loss, remat_stats), remat_grads = loss_and_grads(rematerialised)
  np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
  for expected, actual in zip(
    jax.tree.leaves((plain_grads, plain_stats)), jax.tree.leaves((remat_grads, remat_stats))
  ):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)

  def residual_bytes(stem):
    return sum(
      np.prod(aval.shape) * aval.dtype.itemsize
      for aval, _ in saved_residuals(lambda params: loss(params, stem)[0], variables['params'])
    )

  # Saving only unit boundaries: measured 3.7x fewer bytes with 'block', 2.3x with dots_saveable.
  assert residual_bytes(rematerialised) < 0.5 * residual_bytes(plain)
