"""Losses of the UniMatch loop and the prototype contrasts (pure functions, f32).

Labels are integer maps with `IGNORE` (255) for pixels that carry no label (padding, unannotated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = 255


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-pixel CE: logits `[..., C]`, labels `[...]` int (any value; out-of-range -> class 0) -> `[...]`."""
  labels = jnp.clip(labels.astype(jnp.int32), 0, logits.shape[-1] - 1)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean CE over pixels whose label is not IGNORE (PyTorch `CrossEntropyLoss(ignore_index=255)`)."""
  valid = (labels != IGNORE).astype(jnp.float32)
  return jnp.sum(pixel_cross_entropy(logits, labels) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def dice_loss(logits: jax.Array, labels: jax.Array, smooth: float = 1e-5) -> jax.Array:
  """TransUNet / UniMatch-medical Dice on softmax, mean over all C classes (background included).

  Per class c over the non-IGNORE pixels of the batch:
  `1 - (2 sum p_c t_c + smooth) / (sum p_c^2 + sum t_c^2 + smooth)`.
  """
  num_classes = logits.shape[-1]
  valid = (labels != IGNORE).astype(jnp.float32)[..., None]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) * valid
  target = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * valid
  axes = tuple(range(labels.ndim))
  intersection = jnp.sum(probs * target, axis=axes)
  denominator = jnp.sum(probs * probs, axis=axes) + jnp.sum(target * target, axis=axes)
  return jnp.mean(1.0 - (2.0 * intersection + smooth) / (denominator + smooth))


def confidence_mask(probs: jax.Array, threshold: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Softmax probabilities `[..., C]` -> (pseudo-label `[...]` int32, confidence `[...]`, conf >= tau)."""
  confidence = jnp.max(probs, axis=-1)
  return jnp.argmax(probs, axis=-1).astype(jnp.int32), confidence, confidence >= threshold


def masked_cross_entropy(logits: jax.Array, pseudo_labels: jax.Array, confidence: jax.Array,
                         ignore: jax.Array, threshold: float) -> jax.Array:
  """UniMatch's unsupervised term.

  `sum CE * [conf >= tau] * [ignore != 255] / #{ignore != 255}`: the denominator counts every
  non-padded pixel, confident or not (UniMatch's normaliser).
  """
  counted = (ignore != IGNORE).astype(jnp.float32)
  keep = (confidence >= threshold).astype(jnp.float32) * counted
  return jnp.sum(pixel_cross_entropy(logits, pseudo_labels) * keep) / jnp.maximum(jnp.sum(counted), 1.0)


def prototype_logits(embeddings: jax.Array, prototypes: jax.Array, temperature: float) -> jax.Array:
  """Cosine logits: unit embeddings `[..., E]`, unit prototypes `[C, E]` -> `[..., C]` / T."""
  return jnp.einsum('...e,ce->...c', embeddings.astype(jnp.float32), prototypes.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST) / temperature


def prototype_infonce(embeddings: jax.Array, prototypes: jax.Array, labels: jax.Array, weights: jax.Array,
                      normaliser: jax.Array, temperature: float) -> jax.Array:
  """Pixel-to-prototype InfoNCE: `sum_i w_i * -log softmax_c(<e_i, P_c> / T)[y_i] / normaliser`.

  Args:
    embeddings: `[..., E]` unit pixel embeddings.
    prototypes: `[C, E]` unit prototypes (one per class); each pixel's positive is its label's row,
      the other classes' rows are its negatives.
    labels: `[...]` int class per pixel.
    weights: `[...]` 0/1 (or soft) pixel weights (valid and, for pseudo-labels, confident pixels).
    normaliser: scalar divisor (number of labelled pixels, or UniMatch's count of non-padded pixels).
  """
  per_pixel = pixel_cross_entropy(prototype_logits(embeddings, prototypes, temperature), labels)
  return jnp.sum(per_pixel * weights.astype(jnp.float32)) / jnp.maximum(normaliser, 1.0)
