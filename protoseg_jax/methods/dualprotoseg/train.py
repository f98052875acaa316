"""DualProtoSeg's losses, optimizer, train step and per-pixel scores (pure functions; the loop is the core's).

Shapes: B batch, C classes, P = 2·C·M prototypes, L pyramid levels, S tile size.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from protoseg_jax import augment, ops, train_state
from protoseg_jax.method import TrainState
from protoseg_jax.methods.dualprotoseg import cam
from protoseg_jax.methods.dualprotoseg.model import DualProtoSeg


def model_input(images: jax.Array, data: ml_collections.ConfigDict) -> jax.Array:
  """uint8 RGB tiles -> normalised f32 in `config.data.channel_order` (BGR in the published config)."""
  return augment.to_model_input(images, data.mean, data.std, data.get('channel_order', 'rgb'))


def make_optimizer(train_config: ml_collections.ConfigDict, trainable: Any,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with the poly schedule `lr * (1 - t/T)^power` (no warm-up); weight decay on every trainable
  tensor (`weight_decay_on='all'`, the reference) or on matrices only ('matrices')."""
  schedule = train_state.poly_schedule(train_config.learning_rate, train_config.poly_power, total_steps)
  mask = train_state.decay_mask(trainable, train_config.get('weight_decay_on', 'all'))
  return train_state.adamw(train_config, schedule, mask), schedule


def multiscale_bce(level_scores: jax.Array, labels: jax.Array, num_classes: int, merge: str,
                   level_weights: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Σ_i λ_i BCEWithLogits(merge(scores_i), y): scores `[L, B, P]`, labels `[B, C]` -> (loss, `[L]`).

  `valid` `[B]` (padding rows of a kept last partial batch are False) weights the batch mean: the loss is
  the mean over the real rows, as the reference's smaller last batch.
  """
  class_scores = ops.merge_prototypes(level_scores.astype(jnp.float32), num_classes, merge)
  per_element = optax.sigmoid_binary_cross_entropy(class_scores, labels[None].astype(jnp.float32))
  if valid is None:
    per_level = jnp.mean(per_element, axis=(1, 2))
  else:
    weights = valid.astype(jnp.float32)[None, :, None]
    per_level = jnp.sum(per_element * weights, axis=(1, 2)) / (jnp.maximum(jnp.sum(valid), 1) * num_classes)
  return jnp.sum(level_weights * per_level), per_level


def prototype_diversity(cam_map: jax.Array, labels: jax.Array, num_classes: int,
                        valid: jax.Array | None = None) -> jax.Array:
  """Diversity term on one level's CAM `[B, s, s, P]`, labels `[B, C]` -> scalar.

  Each prototype's map becomes a distribution over pixels (softmax over space). For every pair (k, l) of
  prototypes of one class, J = KL(p_k || p_l) + KL(p_l || p_k) (Jeffreys divergence); the term is
  mean over present classes and pairs of exp(-J), so it is 1 when a class's prototypes fire on the same
  pixels and falls towards 0 as they spread over different parts of the tissue.
  """
  batch, height, width, num_prototypes = cam_map.shape
  group = num_prototypes // num_classes
  log_p = jax.nn.log_softmax(cam_map.astype(jnp.float32).reshape(batch, height * width, num_classes, group),
                             axis=1)
  p = jnp.exp(log_p)
  self_term = jnp.einsum('bncg,bncg->bcg', p, log_p)                   # Σ p_k log p_k
  cross = jnp.einsum('bnck,bncl->bckl', p, log_p)                      # Σ p_k log p_l
  jeffreys = self_term[..., :, None] + self_term[..., None, :] - cross - jnp.swapaxes(cross, -1, -2)
  off_diagonal = 1.0 - jnp.eye(group)
  per_class = jnp.sum(jnp.exp(-jeffreys) * off_diagonal, axis=(-1, -2)) / (group * (group - 1))
  present = labels.astype(jnp.float32)
  if valid is not None:
    present = present * valid.astype(jnp.float32)[:, None]
  return jnp.sum(per_class * present) / jnp.maximum(jnp.sum(present), 1.0)


def train_step_fn(model: DualProtoSeg, config: ml_collections.ConfigDict, prompt_ids: np.ndarray,
                  optimizer: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
  """The pure `(state, batch, rng) -> (state, metrics)`.

  batch: 'images' `[B, S, S, 3]` uint8 RGB (f32 normalised with `augment_on='host'`), 'labels' `[B, C]`,
  optionally 'valid' `[B]` bool (padding rows of a kept last partial batch). The trunk runs once, outside
  the differentiated function; the text tower runs once per step on the C*M prompts (its gradient reaches
  the prompt context only).
  """
  data, train_config = config.data, config.train
  num_classes = model.config.num_classes
  level_weights = jnp.asarray(train_config.level_loss_weights, jnp.float32)
  if level_weights.shape != (len(model.config.pyramid_channels),):
    raise ValueError(f'config.train.level_loss_weights has {level_weights.shape[0]} entries for '
                     f'{len(model.config.pyramid_channels)} pyramid levels')
  prompt_ids = jnp.asarray(prompt_ids)
  diversity_level = train_config.diversity_level - 1 if train_config.diversity_weight > 0 else -1
  augment_on_device = data.get('augment_on', 'device') == 'device'
  rot90_prob = data.augment.get('rot90_prob', 0.5)

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    augment_key, dropout_key = jax.random.split(step_rng)
    valid = batch.get('valid')
    if augment_on_device:
      images = augment.flip_rotate(augment_key, batch['images'], data.augment.hflip, data.augment.vflip,
                                   data.augment.rot90, rot90_prob=rot90_prob)
      images = model_input(images, data)
    else:  # the input pipeline already flipped, rotated and normalised them (float32)
      images = batch['images']
    taps = model.apply({'params': state.params}, images, method=DualProtoSeg.trunk_taps)
    taps = jax.lax.stop_gradient(taps)

    def loss_fn(trainable):
      scores, cam_map = model.apply({'params': {**state.frozen, **trainable}}, taps, prompt_ids, True,
                                    diversity_level, method=DualProtoSeg.head_scores,
                                    rngs={'dropout': dropout_key})
      loss, level_losses = multiscale_bce(scores, batch['labels'], num_classes, train_config.merge,
                                          level_weights, valid)
      aux = {f'loss_level{level + 1}': value for level, value in enumerate(level_losses)}
      if cam_map is not None:
        aux['diversity'] = prototype_diversity(cam_map, batch['labels'], num_classes, valid)
        loss = loss + train_config.diversity_weight * aux['diversity']
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {'loss': loss, 'learning_rate': schedule(state.step), 'grad_norm': optax.tree.norm(grads),
               **aux}
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  return train_step


def gating_labels(known: jax.Array, image_scores: jax.Array, mode: str, threshold: float) -> jax.Array:
  """Image-level labels for CAM gating `[B, C]`: the known ones (entries >= 0), else by `mode`: 'none' = every
  class may be present, 'predicted' = sigmoid(mean-merged prototype scores) > threshold.

  `image_scores` `[B, C]` are the model's image-level logits (mean-merged level scores, as trained).
  """
  if mode == 'none':
    guess = jnp.ones_like(known)
  elif mode == 'predicted':
    guess = (jax.nn.sigmoid(image_scores) > threshold).astype(known.dtype)
  else:
    raise ValueError(f"gating must be 'none' or 'predicted', got {mode!r} (config.predict.gating / "
                     'config.slides.gating)')
  return jnp.where(known >= 0, known, guess)


def make_scores_fn(model: DualProtoSeg, config: ml_collections.ConfigDict, gating: str = 'none',
                   gating_threshold: float = 0.5) -> Callable:
  """Pure `(params, extra, bank, images uint8 [B, H, W, 3], labels [B, C]) -> scores [B, H, W, C + 1]`.

  Level-`cam_level` CAMs merged with `config.eval.merge`, TTA (flips x intensities), label gating (labels
  -1 = unknown: `gating`), then `[maps, (1 - max maps) ** background_power]`, whose argmax is the mask
  (values 0..C, C = background) as the reference's evaluation; softmax of it is the CRF's input.
  """
  data, eval_config = config.data, config.eval
  level = eval_config.cam_level - 1
  if not 0 <= level < len(model.config.pyramid_channels):
    raise ValueError(f'config.eval.cam_level={eval_config.cam_level} is not a pyramid level '
                     f'(1..{len(model.config.pyramid_channels)})')
  num_classes = model.config.num_classes

  def scores_fn(params, extra, bank, images, labels):
    del extra
    images = model_input(images, data)
    labels = labels.astype(jnp.int32)

    def class_map_fn(variant_images):
      maps, prototype_scores = model.apply({'params': params}, variant_images, bank, level, eval_config.merge,
                                           method=DualProtoSeg.class_maps_and_scores)
      return maps, ops.merge_prototypes(prototype_scores, num_classes, 'mean')

    def label_fn(pass_scores):  # [passes, B, C] image-level logits of the TTA passes
      return gating_labels(labels, jnp.mean(pass_scores, axis=0), gating, gating_threshold)

    maps = cam.tta_class_maps(class_map_fn, images, None, images.shape[1:3],
                              intensity_factors=tuple(eval_config.intensity_factors), hflip=eval_config.hflip,
                              passes_in_one_call=eval_config.tta_in_one_batch, label_fn=label_fn)
    return cam.with_background(maps, eval_config.background_power)

  return scores_fn
