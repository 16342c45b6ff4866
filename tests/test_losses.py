"""Tests for atlas_jax.losses: the soft-target cross-entropy, the eval loss beside it, smoothed one-hot."""

import jax
import jax.numpy as jnp
import numpy as np

from atlas_jax import evaluate, losses

NUM_CLASSES = 5


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


def test_the_eval_loss_is_the_training_loss_with_one_hot_targets():
  logits = np.random.default_rng(3).normal(size=(4, NUM_CLASSES)).astype(np.float32)
  labels = np.array([0, 4, 2, 2])

  class FixedLogits:  # a model whose forward is these logits
    def apply(self, variables, images, train):
      return jnp.asarray(logits)

  sums = evaluate.make_eval_step(FixedLogits(), NUM_CLASSES)(
    {}, {'image': np.zeros((4, 1, 1, 3)), 'label': labels, 'mask': np.ones(4)}
  )
  np.testing.assert_allclose(
    sums['loss'] / 4, losses.soft_target_cross_entropy(logits, jax.nn.one_hot(labels, NUM_CLASSES)), rtol=1e-6
  )


def test_one_hot_smoothed_timm_values():
  targets = losses.one_hot_smoothed(jnp.array([1, 3]), NUM_CLASSES, 0.1)
  np.testing.assert_allclose(targets[0], [0.02, 0.92, 0.02, 0.02, 0.02], rtol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(losses.one_hot_smoothed(jnp.array([2]), 3, 0.0), [[0, 0, 1]])
