"""DualProtoSeg training state, optimizer, and the pure train / eval step functions (the loop: trainer.py)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from protoseg_jax import augment, builders, cam, metrics as metrics_lib, ops, sharding
from protoseg_jax.data import pipeline
from protoseg_jax.models.dualprotoseg import DualProtoSeg


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. Frozen towers are carried but never differentiated or updated."""

  step: jax.Array
  trainable: Any
  frozen: Any
  opt_state: Any

  @property
  def params(self) -> dict:
    return {**self.frozen, **self.trainable}


def weight_decay_mask(params: Any) -> Any:
  """Decay matrices and higher-rank tensors only: no decay on biases, norms, 0-D/1-D parameters."""
  return jax.tree.map(lambda leaf: leaf.ndim >= 2, params)


def make_optimizer(train_config: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with the poly schedule `lr * (1 - t/T)^power` (no warm-up) and masked weight decay."""
  schedule = optax.polynomial_schedule(train_config.learning_rate, 0.0, train_config.poly_power,
                                       max(total_steps, 1))
  optimizer = optax.adamw(schedule, b1=train_config.adam_b1, b2=train_config.adam_b2,
                          eps=train_config.adam_eps, weight_decay=train_config.weight_decay,
                          mask=weight_decay_mask)
  return optimizer, schedule


def create_train_state(params: dict, optimizer: optax.GradientTransformation) -> TrainState:
  trainable, frozen = builders.split_params(params)
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                    opt_state=optimizer.init(trainable))


def create_sharded_train_state(params: dict, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                               rules) -> tuple[TrainState, TrainState]:
  """-> (state laid out on `mesh` by `rules`, the state's tree of `NamedSharding`s).

  `params` are host or single-device values, identical on every process; they are placed shard by shard
  and the optimizer state is created directly sharded (never whole on one device).
  """
  abstract = jax.eval_shape(lambda p: create_train_state(p, optimizer), params)
  shardings = sharding.train_state_shardings(abstract, mesh, rules)
  placed = sharding.place_tree(params, {**shardings.frozen, **shardings.trainable})
  state = jax.jit(lambda p: create_train_state(p, optimizer), out_shardings=shardings)(placed)
  return state, shardings


def multiscale_bce(level_scores: jax.Array, labels: jax.Array, num_classes: int, merge: str,
                   level_weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Σ_i λ_i BCEWithLogits(merge(scores_i), y): scores `[L, B, P]`, labels `[B, C]` -> (loss, `[L]`)."""
  class_scores = ops.merge_prototypes(level_scores.astype(jnp.float32), num_classes, merge)
  per_level = jnp.mean(optax.sigmoid_binary_cross_entropy(class_scores, labels[None].astype(jnp.float32)),
                       axis=(1, 2))
  return jnp.sum(level_weights * per_level), per_level


def prototype_diversity(cam: jax.Array, labels: jax.Array, num_classes: int) -> jax.Array:
  """Diversity term on one level's CAM `[B, s, s, P]`, labels `[B, C]` -> scalar.

  Each prototype's map becomes a distribution over pixels (softmax over space). For every pair (k, l) of
  prototypes of one class, J = KL(p_k || p_l) + KL(p_l || p_k) (Jeffreys divergence); the term is
  mean over present classes and pairs of exp(-J), so it is 1 when a class's prototypes fire on the same
  pixels and falls towards 0 as they spread over different parts of the tissue.
  """
  batch, height, width, num_prototypes = cam.shape
  group = num_prototypes // num_classes
  log_p = jax.nn.log_softmax(cam.astype(jnp.float32).reshape(batch, height * width, num_classes, group),
                             axis=1)
  p = jnp.exp(log_p)
  self_term = jnp.einsum('bncg,bncg->bcg', p, log_p)                   # Σ p_k log p_k
  cross = jnp.einsum('bnck,bncl->bckl', p, log_p)                      # Σ p_k log p_l
  jeffreys = self_term[..., :, None] + self_term[..., None, :] - cross - jnp.swapaxes(cross, -1, -2)
  off_diagonal = 1.0 - jnp.eye(group)
  per_class = jnp.sum(jnp.exp(-jeffreys) * off_diagonal, axis=(-1, -2)) / (group * (group - 1))
  present = labels.astype(jnp.float32)
  return jnp.sum(per_class * present) / jnp.maximum(jnp.sum(present), 1.0)


def train_step_fn(model: DualProtoSeg, config: ml_collections.ConfigDict, prompt_ids: np.ndarray,
                  optimizer: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
  """The pure, un-jitted `(state, batch, rng) -> (state, metrics)`; `make_train_step` jits it.

  The trunk runs once, outside the differentiated function; the text tower runs once per step on the
  C*M prompts (its gradient reaches the prompt context only).
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

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    step_rng = jax.random.fold_in(rng, state.step)
    augment_key, dropout_key = jax.random.split(step_rng)
    if augment_on_device:
      images = augment.flip_rotate(augment_key, batch['images'], data.augment.hflip, data.augment.vflip,
                                   data.augment.rot90)
      images = augment.normalize(images, data.mean, data.std)
    else:  # the input pipeline already flipped, rotated and normalised them (float32)
      images = batch['images']
    taps = model.apply({'params': state.params}, images, method=DualProtoSeg.trunk_taps)
    taps = jax.lax.stop_gradient(taps)

    def loss_fn(trainable):
      scores, cam = model.apply({'params': {**state.frozen, **trainable}}, taps, prompt_ids, True,
                                diversity_level, method=DualProtoSeg.head_scores,
                                rngs={'dropout': dropout_key})
      loss, level_losses = multiscale_bce(scores, batch['labels'], num_classes, train_config.merge,
                                          level_weights)
      aux = {f'loss_level{level + 1}': value for level, value in enumerate(level_losses)}
      if cam is not None:
        aux['diversity'] = prototype_diversity(cam, batch['labels'], num_classes)
        loss = loss + train_config.diversity_weight * aux['diversity']
      return loss, aux

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {'loss': loss, 'learning_rate': schedule(state.step), 'grad_norm': optax.tree.norm(grads),
               **aux}
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics

  return train_step


def make_train_step(model: DualProtoSeg, config: ml_collections.ConfigDict, prompt_ids: np.ndarray,
                    optimizer: optax.GradientTransformation, schedule: optax.Schedule) -> Callable:
  """`(state, batch, rng) -> (state, metrics)`, one jit with the state donated (single device)."""
  return jax.jit(train_step_fn(model, config, prompt_ids, optimizer, schedule), donate_argnums=(0,))


def make_sharded_train_step(model: DualProtoSeg, config: ml_collections.ConfigDict, prompt_ids: np.ndarray,
                            optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                            mesh: jax.sharding.Mesh, state_shardings: TrainState) -> Callable:
  """`(state, global batch, rng) -> (state, metrics)` on `mesh`: state by `state_shardings` (donated), the
  batch split over ('data', 'fsdp'), activations constrained by `config.sharding.logical_rules`."""
  sharding.check_global_batch(config.train.batch_size, mesh)
  return sharding.jit_train_step(train_step_fn(model, config, prompt_ids, optimizer, schedule), mesh,
                                 state_shardings, config.sharding.logical_rules)


def make_mask_fn(model: DualProtoSeg, config: ml_collections.ConfigDict) -> Callable:
  """Pure `(params, bank, images uint8 [B, H, W, 3], labels [B, C]) -> masks [B, H, W] int32 in 0..C`.

  Level-`cam_level` CAMs merged with `config.eval.merge`, TTA (flips x intensities), label gating,
  background power and argmax, as the reference's evaluation.
  """
  data, eval_config = config.data, config.eval
  level = eval_config.cam_level - 1
  if not 0 <= level < len(model.config.pyramid_channels):
    raise ValueError(f'config.eval.cam_level={eval_config.cam_level} is not a pyramid level '
                     f'(1..{len(model.config.pyramid_channels)})')

  def mask_fn(params, bank, images, labels):
    images = augment.normalize(images, data.mean, data.std)

    def class_map_fn(variant_images):
      return model.apply({'params': params}, variant_images, bank, level, eval_config.merge,
                         method=DualProtoSeg.class_maps)

    maps = cam.tta_class_maps(class_map_fn, images, labels, images.shape[1:3],
                              intensity_factors=tuple(eval_config.intensity_factors),
                              hflip=eval_config.hflip,
                              passes_in_one_call=eval_config.tta_in_one_batch)
    return cam.maps_to_mask(maps, background_power=eval_config.background_power)

  return mask_fn


def make_bank_fn(model: DualProtoSeg, prompt_ids: np.ndarray, mesh: Optional[jax.sharding.Mesh] = None,
                 param_shardings: Any = None, rules=None) -> Callable:
  """Jitted `params -> bank [P, F]`: the text tower runs once per evaluation, not per batch.

  With `mesh`, params come laid out by `param_shardings` and the bank is replicated.
  """
  prompt_ids = jnp.asarray(prompt_ids)
  bank_fn = lambda params: model.apply({'params': params}, prompt_ids, method=DualProtoSeg.text_bank)
  if mesh is None:
    return jax.jit(bank_fn)
  return sharding.jit_sharded(bank_fn, mesh, rules, in_shardings=(param_shardings,),
                              out_shardings=sharding.replicated(mesh))


def make_eval_fns(model: DualProtoSeg, config: ml_collections.ConfigDict, prompt_ids: np.ndarray,
                  mesh: Optional[jax.sharding.Mesh] = None, param_shardings: Any = None):
  """Returns jitted `bank_fn(params)` and `confusion_fn(params, bank, batch) -> [K, K] int32`.

  With `mesh` (and `param_shardings`, the layout of `state.params`, e.g. `{**shardings.frozen,
  **shardings.trainable}`), each eval batch is split over ('data', 'fsdp') and the confusion matrix comes
  back replicated (the same on every process). `batch` is then this host's rows of the global batch
  (`config.eval.batch_size / process_count`, as `pipeline.EvalSource.batches` gives) or the whole global
  batch, identical on every host. `config.eval.batch_size` must be divisible by the data-parallel size.
  """
  mask_fn = make_mask_fn(model, config)
  num_values = model.config.num_classes + 1

  def confusion(params, bank, batch):
    masks = mask_fn(params, bank, batch['images'], batch['labels'])
    valid = jnp.broadcast_to(batch['valid'][:, None, None], masks.shape)
    return metrics_lib.confusion_matrix(batch['masks'], masks, num_values, valid=valid)

  if mesh is None:
    return make_bank_fn(model, prompt_ids), jax.jit(confusion)
  if param_shardings is None:
    raise ValueError('make_eval_fns: a mesh needs param_shardings (the layout of the params passed in)')
  sharding.check_global_batch(config.eval.batch_size, mesh, 'config.eval.batch_size')
  rules = config.sharding.logical_rules
  replicated = sharding.replicated(mesh)
  sharded_confusion = sharding.jit_sharded(
      confusion, mesh, rules, in_shardings=(param_shardings, replicated, sharding.batch_sharding(mesh)),
      out_shardings=replicated)

  def confusion_fn(params, bank, batch):
    return sharded_confusion(params, bank, sharding.shard_host_batch(batch, mesh, config.eval.batch_size))

  return make_bank_fn(model, prompt_ids, mesh, param_shardings, rules), confusion_fn


def evaluate(params: dict, eval_set: pipeline.EvalSet, bank_fn, confusion_fn,
             config: ml_collections.ConfigDict) -> dict:
  """Confusion matrix over the whole split -> metrics dict."""
  bank = bank_fn(params)
  # Per-batch int32 matrices are summed on the host in int64 (a whole split can exceed 2^31 pixels);
  # dispatch stays asynchronous because nothing is read back until the loop ends.
  batch_confusions = [confusion_fn(params, bank, batch) for batch in eval_set.batches(config.eval.batch_size)]
  confusion = np.sum([np.asarray(c, np.int64) for c in batch_confusions], axis=0)
  result = metrics_lib.segmentation_metrics(
      confusion, list(config.data.class_names) + [config.data.background_name],
      num_tissue_classes=len(config.data.class_names),
      ignore_background=config.eval.ignore_background)
  result['confusion_matrix'] = confusion.tolist()
  return result
