"""Tests for atlas_jax.losses: cross entropies, smoothed one-hot, and Mixup/CutMix invariants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atlas_jax import losses

NUM_CLASSES = 5

# The Beta sampler is slow to compile on CPU: every hyperparameter goes in positionally as a traced
# scalar, so one compilation per image dtype serves every test.
_jitted_mixup_cutmix = jax.jit(losses.mixup_cutmix, static_argnums=3)


def mix(rng, images, labels, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
        label_smoothing=0.1):
  mixed, targets = _jitted_mixup_cutmix(rng, images, labels, num_classes, mixup_alpha, cutmix_alpha,
                                        switch_prob, label_smoothing)
  return np.asarray(mixed), np.asarray(targets)  # numpy from here: eager jax ops compile one by one


def example_batch(batch=4, size=8):
  images = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(np.float32)
  labels = np.arange(batch) % NUM_CLASSES  # labels[i] != labels[::-1][i] for even batch < 2 * classes
  return images, labels


def implied_lam(targets, labels, smoothing):
  """lam from targets[i, labels[i]] = lam * on + (1 - lam) * off (labels differ from the partner's)."""
  off = smoothing / NUM_CLASSES
  on = 1 - smoothing + off
  return (targets[0, labels[0]] - off) / (on - off)


def test_soft_target_cross_entropy_matches_numpy():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(3, NUM_CLASSES)), jnp.bfloat16)
  targets = rng.dirichlet(np.ones(NUM_CLASSES), size=3).astype(np.float32)
  x = np.asarray(logits, np.float64)
  log_probs = x - x.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  expected = np.mean(-(np.asarray(targets) * log_probs).sum(-1))
  loss = losses.soft_target_cross_entropy(logits, targets)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_cross_entropy_equals_soft_with_one_hot():
  logits = np.random.default_rng(3).normal(size=(4, NUM_CLASSES)).astype(np.float32)
  labels = np.array([0, 4, 2, 2])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels),
                             losses.soft_target_cross_entropy(logits, jax.nn.one_hot(labels, NUM_CLASSES)),
                             rtol=1e-6)


def test_one_hot_smoothed_timm_values():
  targets = losses.one_hot_smoothed(jnp.array([1, 3]), NUM_CLASSES, 0.1)
  np.testing.assert_allclose(targets[0], [0.02, 0.92, 0.02, 0.02, 0.02], rtol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(losses.one_hot_smoothed(jnp.array([2]), 3, 0.0), [[0, 0, 1]])


@pytest.mark.parametrize('seed', range(4))
def test_mixup_forced_blends_with_flipped_batch(seed):
  images, labels = example_batch()
  mixed, targets = mix(jax.random.key(seed), images, labels, NUM_CLASSES, switch_prob=0.0)
  lam = implied_lam(targets, labels, 0.1)
  assert 0.0 <= lam <= 1.0
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-5)
  smoothed = np.full((len(labels), NUM_CLASSES), 0.02)
  smoothed[np.arange(len(labels)), labels] = 0.92
  expected_targets = lam * smoothed + (1 - lam) * smoothed[::-1]
  np.testing.assert_allclose(targets, expected_targets, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('seed', range(8))
def test_cutmix_forced_pastes_a_box_and_corrects_lam(seed):
  images, labels = example_batch()
  mixed, targets = mix(jax.random.key(seed), images, labels, NUM_CLASSES, switch_prob=1.0)
  from_self = np.all(mixed == images, axis=-1)       # (B, H, W)
  from_partner = np.all(mixed == images[::-1], axis=-1)
  assert np.all(from_self ^ from_partner)            # every pixel from exactly one source
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  lam = implied_lam(targets, labels, 0.1)
  np.testing.assert_allclose(lam, from_self[0].mean(), rtol=1e-5, atol=1e-6)
  # The pasted region is one axis-aligned box, the same for every image.
  pasted = ~from_self[0]
  assert np.all(~from_self == pasted)
  if pasted.any():
    rows, cols = np.nonzero(pasted.any(1))[0], np.nonzero(pasted.any(0))[0]
    assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    assert pasted.sum() == len(rows) * len(cols)


def test_cutmix_only_and_mixup_only_alphas():
  images, labels = example_batch()
  mixed, _ = mix(jax.random.key(5), images, labels, NUM_CLASSES, mixup_alpha=0.0, switch_prob=0.0)
  assert np.all((mixed == images).all(-1) ^ (mixed == images[::-1]).all(-1))
  assert not np.all(mixed == images)
  mixed, targets = mix(jax.random.key(5), images, labels, NUM_CLASSES, cutmix_alpha=0.0, switch_prob=1.0)
  lam = implied_lam(targets, labels, 0.1)
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-5)


def test_both_alphas_zero_is_identity_with_smoothed_targets():
  images, labels = example_batch()
  mixed, targets = losses.mixup_cutmix(jax.random.key(0), images, labels, NUM_CLASSES, mixup_alpha=0.0,
                                       cutmix_alpha=0.0, label_smoothing=0.1)
  np.testing.assert_array_equal(mixed, images)
  np.testing.assert_array_equal(targets, losses.one_hot_smoothed(labels, NUM_CLASSES, 0.1))


def test_deterministic_under_jit():
  images, labels = example_batch()
  first = mix(jax.random.key(7), images, labels, NUM_CLASSES)
  again = mix(jax.random.key(7), images, labels, NUM_CLASSES)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  other = mix(jax.random.key(8), images, labels, NUM_CLASSES)
  assert not np.allclose(first[1], other[1])


def test_both_modes_occur_with_default_switch_prob():
  images, labels = example_batch()
  modes = set()
  for seed in range(16):
    mixed, _ = mix(jax.random.key(seed), images, labels, NUM_CLASSES)
    exact = (mixed == images).all(-1) | (mixed == images[::-1]).all(-1)
    modes.add(bool(np.all(exact)))
  assert modes == {True, False}


def test_bfloat16_images_keep_dtype():
  images, labels = example_batch()
  # eval_shape: dtypes without a second compilation of the sampler.
  mix_bfloat16 = functools.partial(losses.mixup_cutmix, num_classes=NUM_CLASSES)
  mixed, targets = jax.eval_shape(mix_bfloat16, jax.random.key(3), images.astype(jnp.bfloat16), labels)
  assert mixed.dtype == jnp.bfloat16 and mixed.shape == images.shape
  assert targets.dtype == jnp.float32 and targets.shape == (len(labels), NUM_CLASSES)
