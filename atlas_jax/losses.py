"""Classification losses and timm-style Mixup/CutMix with label smoothing, all jittable.

Training uses `mixup_cutmix` targets with `soft_target_cross_entropy` (timm's Mixup +
SoftTargetCrossEntropy); evaluation uses `cross_entropy` on integer labels. Losses are float32
whatever the logits dtype.
"""

import jax
import jax.numpy as jnp


def soft_target_cross_entropy(logits, targets):
  """Mean over the batch of -sum(targets * log_softmax(logits)); logits, targets (B, classes) -> ()."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.mean(-jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1))


def cross_entropy(logits, labels):
  """Mean cross entropy for integer labels; logits (B, classes), labels (B,) -> ()."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return -jnp.mean(picked)


def one_hot_smoothed(labels, num_classes: int, smoothing: float = 0.0):
  """labels (B,) -> float32 (B, num_classes); timm's values: off smoothing / classes, on 1 - smoothing + off."""
  off_value = smoothing / num_classes
  on_value = 1.0 - smoothing + off_value
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on_value - off_value) + off_value


def mixup_cutmix(rng, images, labels, num_classes: int, mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0, switch_prob: float = 0.5, label_smoothing: float = 0.1):
  """timm's Mixup in 'batch' mode with mix_prob 1: one mix for the whole batch, partner images[::-1].

  One draw per batch picks CutMix (probability switch_prob when both alphas are > 0, else whichever is
  > 0) or Mixup, then lam ~ Beta(alpha, alpha) with the chosen one's alpha. Mixup blends
  lam * x + (1 - lam) * x[::-1]. CutMix pastes a box of x[::-1] into x (timm's rand_bbox: sides
  floor(H, W * sqrt(1 - lam)), centre uniform over pixels, half-sides floored, clipped to the image)
  and resets lam to the fraction of pixels kept from x.

  Args:
    rng: PRNG key; the same key gives the same result.
    images: (B, H, W, C) float, NHWC.
    labels: (B,) int.
    num_classes: python int (static).
    mixup_alpha, cutmix_alpha, switch_prob, label_smoothing: python numbers or scalar arrays (may be
      traced, so one compiled step serves any setting). Both alphas python 0: no mixing at all.

  Returns:
    (mixed images (B, H, W, C) in images.dtype,
     targets (B, num_classes) float32 = lam * smoothed(labels) + (1 - lam) * smoothed(labels[::-1])).
  """
  targets = one_hot_smoothed(labels, num_classes, label_smoothing)
  if _is_zero(mixup_alpha) and _is_zero(cutmix_alpha):
    return images, targets
  height, width = images.shape[1], images.shape[2]
  switch_key, lam_key, box_key = jax.random.split(rng, 3)

  # Selection with jnp ops rather than python branches, so alphas and switch_prob may also be traced.
  mixup_alpha = jnp.asarray(mixup_alpha, jnp.float32)
  cutmix_alpha = jnp.asarray(cutmix_alpha, jnp.float32)
  use_cutmix = jnp.where(mixup_alpha <= 0, True,
                         jnp.where(cutmix_alpha <= 0, False, jax.random.uniform(switch_key) < switch_prob))
  alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
  # Beta(alpha, alpha) as g0 / (g0 + g1) of two Gamma(alpha) draws: one sampler for both mixes (it is
  # costly to compile), in log space as small alphas underflow. alpha 0 means no mix (lam 1).
  log_gammas = jax.random.loggamma(lam_key, jnp.full((2,), jnp.maximum(alpha, 1e-6)))
  lam_drawn = jnp.where(alpha > 0, jax.nn.softmax(log_gammas)[0], 1.0)

  # CutMix box as timm's rand_bbox: integer cut sides, integer centre, half-sides floored, clipped.
  ratio = jnp.sqrt(jnp.clip(1.0 - lam_drawn, 0.0, 1.0))
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  centre_key_y, centre_key_x = jax.random.split(box_key)
  cy = jax.random.randint(centre_key_y, (), 0, height)
  cx = jax.random.randint(centre_key_x, (), 0, width)
  y_low, y_high = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  x_low, x_high = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  in_box = (rows >= y_low) & (rows < y_high) & (cols >= x_low) & (cols < x_high)  # (H, W)
  lam_box = 1.0 - jnp.mean(in_box.astype(jnp.float32))

  # One blend covers both: the per-pixel weight of x is lam (Mixup) or 1/0 outside/inside the box
  # (CutMix), where 1 * a + 0 * b copies a pixel exactly. Blending in float32 keeps bfloat16 images exact.
  lam = jnp.where(use_cutmix, lam_box, lam_drawn).astype(jnp.float32)
  weight = jnp.where(use_cutmix, 1.0 - in_box.astype(jnp.float32), lam)[None, :, :, None]
  flipped = images[::-1]
  mixed = weight * images.astype(jnp.float32) + (1.0 - weight) * flipped.astype(jnp.float32)
  mixed_targets = lam * targets + (1.0 - lam) * targets[::-1]
  return mixed.astype(images.dtype), mixed_targets


def _is_zero(alpha) -> bool:
  """True for a python number <= 0; a traced alpha is handled inside the computation instead."""
  return isinstance(alpha, (int, float)) and alpha <= 0
