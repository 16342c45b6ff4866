"""The training loss: soft-target cross-entropy (timm's SoftTargetCrossEntropy) and label-smoothed targets.

Mixup/CutMix (augment.py) make the soft targets. Losses are float32 whatever the logits dtype.
"""

import jax
import jax.numpy as jnp


def soft_target_cross_entropy(logits, targets):
  """Mean over the batch of -sum(targets * log_softmax(logits)); logits, targets (B, classes) -> ()."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1))


def one_hot_smoothed(labels, num_classes: int, smoothing: float = 0.0):
  """labels (B,) -> float32 (B, num_classes); timm's values: off smoothing / classes, on 1 - smoothing + off."""
  off_value = smoothing / num_classes
  on_value = 1.0 - smoothing + off_value
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on_value - off_value) + off_value
