"""MPAMatch / UniMatch / supervised-only: model building, train state, optimizer and the jitted train step.

One step (variant 'mpamatch'; 'unimatch' drops the prototype terms, 'supervised' uses the labelled batch
only), following UniMatch V1's `unimatch.py` with the CutMix partner = the batch reversed (UniMatch V2):
  1. weak views of x (with its mask) and u (with its padding map), two strong views of u_w;
  2. eval-mode (BatchNorm running statistics), no-gradient prediction on u_w -> the partner's pseudo-label
     and confidence for the pasted regions (V1's `model.eval()` pass on `u_w_mix`);
  3. paste the partner's strong view inside each CutMix box;
  4. train-mode forward of [x; u_w] with the feature-perturbation stream (decoder on [f; dropout2d(f)]),
     then of [u_s1; u_s2] (by default its BatchNorm statistics do not enter the running averages:
     `config.train.strong_views_update_bn_stats`);
  5. pseudo-label y_w = argmax, conf_w = max softmax of stop_grad(pred_u_w); mixed targets inside boxes;
  6. L = (L_x + 0.5 L_fp + 0.25 L_s1 + 0.25 L_s2) / 2
       + lambda_img (L_img^lab + L_img^unl) + lambda_txt (L_txt^lab + L_txt^unl)   (`composite_loss`),
     with L^unl the mean of the two strong views' terms (`prototype_contrast`); image prototypes are the EMA
     bank updated with this batch (GT pixels of x, confident weak-view pixels of u), text prototypes come
     from the prompts.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from protoseg_jax import config_base, tokenizer as tokenizer_lib, train_state
from protoseg_jax.errors import ConfigError
from protoseg_jax.method import TrainState
from protoseg_jax.methods.mpamatch import augment, losses
from protoseg_jax.methods.mpamatch.model import (ENCODER_COLLECTIONS, FROZEN_COLLECTIONS, MPAMatchModel,
                                                 SegmenterConfig)
from protoseg_jax.methods.mpamatch.prototypes import PrototypeBank, class_sums, ema_update
from protoseg_jax.models import text as text_lib
from protoseg_jax.models.text import TextConfig
from protoseg_jax.models.vit import VitConfig

VARIANTS = ('mpamatch', 'unimatch', 'supervised')
MODEL_KEYS = ('bottleneck_channels', 'decoder_channels', 'batch_norm_momentum', 'fp_dropout', 'embed_level',
              'embed_hidden', 'embed_dim', 'n_ctx')


# --- building --------------------------------------------------------------------------------------

def segmenter_config(config: ml_collections.ConfigDict) -> SegmenterConfig:
  model = config.model
  unknown = sorted(set(model.keys()) - set(MODEL_KEYS) - {'vit', 'text'})
  if unknown:
    raise ConfigError(f'unknown config key(s) {", ".join("config.model." + key for key in unknown)}')
  vit = config_base.dataclass_from_config(VitConfig, model.vit, 'config.model.vit')
  text = config_base.dataclass_from_config(TextConfig, model.text, 'config.model.text')
  values = {key: tuple(model[key]) if isinstance(model[key], (list, tuple)) else model[key]
            for key in MODEL_KEYS}
  return SegmenterConfig(vit=vit, text=text, num_classes=len(config.data.class_names), **values)


def build_model(config: ml_collections.ConfigDict) -> tuple[MPAMatchModel, np.ndarray]:
  """-> (model, prompt token ids `[C, L]`: `[BOS, ctx x n_ctx, class name, EOS]` per class)."""
  if len(config.data.class_names) < 2:
    raise ConfigError('config.data.class_names needs at least two classes (background first)')
  model = MPAMatchModel(segmenter_config(config), config_base.compute_dtype(config.train.compute_dtype))
  tokenizer = tokenizer_lib.build_tokenizer(config.tokenizer)
  text_lib.check_tokenizer_fits(tokenizer, config.model.text.vocab_size)
  prompt_ids = text_lib.prompt_token_ids(tokenizer, config.data.class_names, config.model.n_ctx,
                                         config.model.text.context_length)
  return model, prompt_ids


def random_variables(config: ml_collections.ConfigDict, model: MPAMatchModel, prompt_ids: np.ndarray,
                     rng: jax.Array) -> tuple[dict, dict]:
  """Randomly initialised (params, batch_stats); traceable (no files read)."""
  size = config.data.image_size
  params_key, dropout_key = jax.random.split(rng)
  variables = model.init({'params': params_key, 'dropout': dropout_key}, jnp.zeros((1, size, size, 3)),
                         jnp.asarray(prompt_ids))
  return flax.core.unfreeze(variables['params']), flax.core.unfreeze(variables['batch_stats'])


def init_variables(config: ml_collections.ConfigDict, model: MPAMatchModel, prompt_ids: np.ndarray,
                   rng: jax.Array) -> tuple[dict, dict]:
  """Random (params, batch_stats), then the pretrained parts `config.backbone` names: the UNI trunk
  (`source='timm'`, `path`) and the frozen text tower (`text_source='conch'|'hf_clip'`, `text_path`)."""
  backbone = config.backbone
  if backbone.source not in ('none', 'timm'):
    raise ConfigError(f"config.backbone.source must be 'none' or 'timm', got {backbone.source!r}")
  encoder = (load_timm_encoder(backbone.path, model.config.vit, backbone.get('checkpoint_key', ''))
             if backbone.source == 'timm' else {})
  text = load_text_tower(config, model)   # files first: a bad path fails before anything compiles
  params, batch_stats = jax.jit(lambda key: random_variables(config, model, prompt_ids, key))(rng)
  params.update(encoder)
  params.update(text)
  return params, batch_stats


def load_text_tower(config: ml_collections.ConfigDict, model: MPAMatchModel) -> dict:
  """`{'text_encoder': ...}` from `config.backbone.text_source` / `text_path`, or {} (random tower)."""
  from protoseg_jax.convert import pretrained  # pylint: disable=g-import-not-at-top

  backbone = config.backbone
  if not backbone.get('text_source', ''):
    return {}
  if not backbone.get('text_path', ''):
    raise ConfigError('config.backbone.text_path is empty (config.backbone.text_source is set)')
  tower = pretrained.text_tower(backbone.text_source, backbone.text_path, model.config.vit, model.config.text,
                                backbone.get('checkpoint_key', ''))
  return {'text_encoder': jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), tower)}


def frozen_params(config: ml_collections.ConfigDict, model: MPAMatchModel, prompt_ids: np.ndarray,
                  rng: jax.Array) -> dict:
  """The frozen text tower exactly as `init_variables(rng)` builds it (restores need nothing else).

  Loaded from `config.backbone.text_path`, or, when random, equal to the `init_variables` tower for the same
  `rng` (Flax derives each module's init key from its path); skipping the random init of everything else
  saves most of the start-up compile time of eval / predict.
  """
  frozen = load_text_tower(config, model)
  if not frozen:
    params_key, _ = jax.random.split(rng)
    text = jax.jit(lambda p: model.init({'params': p}, jnp.asarray(prompt_ids),
                                        method=MPAMatchModel.text_prototypes))(params_key)
    frozen = {key: flax.core.unfreeze(text['params'][key]) for key in FROZEN_COLLECTIONS}
  return frozen


def load_timm_encoder(path: str, vit: VitConfig, checkpoint_key: str = '') -> dict:
  """UNI (timm `vit_large_patch16_224`, `init_values=1e-5`) state dict -> {'encoder', 'encoder_norm'}.

  `.bin` / `.pth` files are read without torch and without unpickling arbitrary objects.
  """
  import os  # pylint: disable=g-import-not-at-top

  from protoseg_jax.convert import torch_files, torch_to_flax  # pylint: disable=g-import-not-at-top

  if not path or not os.path.isfile(path):
    raise ConfigError(f'config.backbone.path: timm checkpoint not found: {path!r}')
  state = torch_files.load_state_dict(path, checkpoint_key)
  encoder = torch_to_flax.vit_from_timm(state, vit)
  for key in ('norm.weight', 'norm.bias'):
    if key not in state:
      raise ConfigError(f'{path}: key {key!r} (final LayerNorm) is missing (config.backbone.path)')
  norm = {'scale': np.asarray(state['norm.weight'], np.float32),
          'bias': np.asarray(state['norm.bias'], np.float32)}
  return {'encoder': jax.tree.map(jnp.asarray, encoder), 'encoder_norm': jax.tree.map(jnp.asarray, norm)}


# --- optimizer and state -------------------------------------------------------------------------

def make_optimizer(train_config: ml_collections.ConfigDict, trainable: Any, total_steps: int):
  """AdamW, poly decay `lr (1 - t/T)^power`, two groups: encoder (low LR) and the rest; weight decay on
  matrices only (biases, norms, 1-D parameters exempt), as UniMatch's optimiser groups.

  Returns (optimizer, {'encoder': schedule, 'head': schedule}); masks and labels are trees of `trainable`.
  """
  schedules = {name: train_state.poly_schedule(rate, train_config.poly_power, total_steps)
               for name, rate in (('encoder', train_config.encoder_learning_rate),
                                  ('head', train_config.learning_rate))}
  mask = train_state.decay_mask(trainable, train_config.get('weight_decay_on', 'matrices'))
  groups = {name: train_state.adamw(train_config, schedule, mask) for name, schedule in schedules.items()}
  labels = {key: jax.tree.map(lambda _, k=key: 'encoder' if k in ENCODER_COLLECTIONS else 'head', value)
            for key, value in trainable.items()}
  return optax.multi_transform(groups, labels), schedules


def empty_extra(num_classes: int, embed_dim: int, batch_stats: dict) -> dict:
  """The extra state: BatchNorm running statistics and the (empty) image prototype bank."""
  return {'batch_stats': batch_stats, 'bank': PrototypeBank.empty(num_classes, embed_dim)}


# --- the step ------------------------------------------------------------------------------------

def _down(x: jax.Array, stride: int) -> jax.Array:
  """Nearest downsampling of `[B, H, W]` by an integer stride (`F.interpolate(mode='nearest')`)."""
  return x[:, ::stride, ::stride]


def supervised_loss(logits: jax.Array, labels: jax.Array,
                    loss_config: ml_collections.ConfigDict) -> jax.Array:
  """`w_ce CE + w_dice Dice` over non-ignored pixels."""
  return (loss_config.sup_ce_weight * losses.cross_entropy(logits, labels)
          + loss_config.sup_dice_weight * losses.dice_loss(logits, labels, loss_config.dice_smooth))


def prototype_contrast(embed_x: jax.Array, strong_embeds: tuple, prototypes: jax.Array, labels: jax.Array,
                       valid: jax.Array, strong_targets: tuple, stride: int,
                       loss_config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(L^lab, L^unl) of one prototype set `[C, E]` (the image bank or the text prototypes).

  L^lab: InfoNCE of the labelled embeddings `[Bl, h, w, E]` against their labels `[Bl, h, w]` (already at the
  embedding resolution, h = H / stride) over the `valid` pixels, normalised by their count. L^unl: the mean
  over the two strong views of InfoNCE of their embeddings `[Bu, h, w, E]` against the mixed pseudo-labels;
  `strong_targets` holds one `(pseudo-label, confidence, ignore)` of `[Bu, H, W]` per view, taken every
  `stride` pixels; confident pixels count, normalised by the non-padded ones (UniMatch's normaliser).
  """
  tau, temperature = loss_config.conf_threshold, loss_config.temperature
  lab = losses.prototype_infonce(embed_x, prototypes, labels, valid, jnp.sum(valid), temperature)
  unl = 0.0
  for embed, (pseudo, confidence, ignore) in zip(strong_embeds, strong_targets):
    kept = _down(ignore, stride) != losses.IGNORE
    weights = (_down(confidence, stride) >= tau) & kept
    unl = unl + 0.5 * losses.prototype_infonce(embed, prototypes, _down(pseudo, stride), weights,
                                                jnp.sum(kept), temperature)
  return lab, unl


def composite_loss(terms: dict, loss_config: ml_collections.ConfigDict) -> jax.Array:
  """The semi-supervised objective from its terms (the step's metrics of the same names):
  `(w_x L_x + w_fp L_fp + w_s (L_s1 + L_s2)) / 2 + lambda_img (L_img^lab + L_img^unl)
  + lambda_txt (L_txt^lab + L_txt^unl)`, the prototype terms where present (variant 'mpamatch')."""
  loss = (loss_config.weight_x * terms['loss_x'] + loss_config.weight_fp * terms['loss_fp']
          + loss_config.weight_s * (terms['loss_s1'] + terms['loss_s2'])) / 2.0
  for name, weight in (('img', loss_config.lambda_img), ('txt', loss_config.lambda_txt)):
    if f'loss_{name}_lab' in terms:
      loss = loss + weight * (terms[f'loss_{name}_lab'] + terms[f'loss_{name}_unl'])
  return loss


def mixed_targets(boxes: jax.Array, own: tuple, partner: tuple) -> tuple:
  """UniMatch's CutMix targets: (pseudo-label, confidence, ignore) of the sample itself outside its box,
  those of the pasted partner (eval-mode prediction, its padding map) inside. All `[B, H, W]`."""
  return tuple(augment.cutmix(boxes, mine, theirs) for mine, theirs in zip(own, partner))


def train_step_fn(model: MPAMatchModel, config: ml_collections.ConfigDict, prompt_ids: np.ndarray,
                  optimizer, schedules: dict) -> Callable:
  """The pure `(state, batch, rng) -> (state, metrics)`.

  batch: 'x' `[Bl, W, W, 3]` uint8, 'y' `[Bl, W, W]` uint8 class ids (255 = ignore), and unless the variant
  is 'supervised', 'u' `[Bu, W, W, 3]` uint8 and 'u_ignore' `[Bu, W, W]` uint8 (255 = padding, else 0).
  """
  data, loss_config = config.data, config.loss
  variant = loss_config.variant
  if variant not in VARIANTS:
    raise ValueError(f'config.loss.variant must be one of {VARIANTS}, got {variant!r}')
  size, tau = data.image_size, loss_config.conf_threshold
  num_classes, stride = model.config.num_classes, model.config.embed_stride
  prompt_ids = jnp.asarray(prompt_ids)
  use_prototypes = variant == 'mpamatch'
  strong_views_update_bn_stats = config.train.strong_views_update_bn_stats
  norm = lambda images: augment.normalize(images, data.mean, data.std)

  def apply(params, batch_stats, images, train, fp=False, embeddings=False, rng=None):
    variables = {'params': params, 'batch_stats': batch_stats}
    kwargs = dict(method=MPAMatchModel.segment, rngs={'dropout': rng} if rng is not None else None)
    if train:
      (logits, embed), updates = model.apply(variables, images, True, fp, embeddings, mutable=['batch_stats'],
                                             **kwargs)
      return logits, embed, updates['batch_stats']
    logits, embed = model.apply(variables, images, False, fp, embeddings, **kwargs)
    return logits, embed, batch_stats

  def finish(state, loss_fn, metrics_extra=None):
    (loss, (batch_stats, bank, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   lr_head=schedules['head'](state.step), lr_encoder=schedules['encoder'](state.step))
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state,
                         extra={'batch_stats': batch_stats, 'bank': bank}), metrics

  def supervised_step(state, batch, rng):
    x, y = augment.weak_view(rng, batch['x'], batch['y'], size, data.weak)
    x = norm(x)

    def loss_fn(trainable):
      logits, _, batch_stats = apply({**state.frozen, **trainable}, state.extra['batch_stats'], x, True)
      loss = supervised_loss(logits, y, loss_config)
      return loss, (batch_stats, state.extra['bank'], {'loss_x': loss})

    return finish(state, loss_fn)

  def semi_step(state, batch, rng):
    keys = jax.random.split(rng, 5)
    x, y = augment.weak_view(keys[0], batch['x'], batch['y'], size, data.weak)
    u_w, ignore = augment.weak_view(keys[1], batch['u'], batch['u_ignore'], size, data.weak)
    labelled = x.shape[0]
    # Both strong views (and both box sets) in one batched call: independent per sample, half the program.
    u_s1, u_s2 = jnp.split(norm(augment.strong_view(keys[2], jnp.concatenate([u_w, u_w]), data.strong)), 2)
    x, u_w = norm(x), norm(u_w)
    box1, box2 = jnp.split(augment.cutmix_boxes(keys[3], 2 * u_w.shape[0], size, data.strong.cutmix_prob,
                                                data.strong.cutmix_area, data.strong.cutmix_ratio), 2)
    u_s1 = augment.cutmix(box1, u_s1, augment.partner(u_s1))
    u_s2 = augment.cutmix(box2, u_s2, augment.partner(u_s2))

    ignore_mix = augment.partner(ignore)

    def loss_fn(trainable):
      params = {**state.frozen, **trainable}
      running_stats = state.extra['batch_stats']
      features = model.apply({'params': params}, jnp.concatenate([x, u_w]), method=MPAMatchModel.encode)
      # The partner's pseudo-label: UniMatch's eval-mode, no-gradient prediction on u_w (its `model.eval()`
      # mix pass). The ViT has no BatchNorm or dropout, so its eval-mode pass on u_w equals the train-mode
      # one just made: only the decoder (BatchNorm running statistics) runs again, on the weak view's
      # features; one ViT-L pass of 8 images less per step (BUILD_NOTES "Speed", bitwise the same step).
      frozen_view = jax.lax.stop_gradient(({'params': params, 'batch_stats': running_stats},
                                           features[labelled:]))
      mix_logits, _ = model.apply(frozen_view[0], frozen_view[1], False, False, method=MPAMatchModel.decode)
      y_mix, conf_mix, _ = losses.confidence_mask(jax.nn.softmax(augment.partner(mix_logits), axis=-1), tau)
      y_mix, conf_mix = jax.lax.stop_gradient((y_mix, conf_mix))
      (logits, embed), updates = model.apply(
          {'params': params, 'batch_stats': running_stats}, features, True, True, use_prototypes,
          method=MPAMatchModel.segment_features, mutable=['batch_stats'], rngs={'dropout': keys[4]})
      batch_stats = updates['batch_stats']
      pred_x, pred_u_w = logits[:labelled], logits[labelled:labelled + u_w.shape[0]]
      pred_fp = logits[2 * labelled + u_w.shape[0]:]
      # The strong views are normalised with their own batch statistics; whether those also enter the
      # running averages used at evaluation is `config.train.strong_views_update_bn_stats` (see its comment).
      strong_logits, strong_embed, strong_stats = apply(params, batch_stats, jnp.concatenate([u_s1, u_s2]),
                                                        True, embeddings=use_prototypes)
      if strong_views_update_bn_stats:
        batch_stats = strong_stats
      pred_s1, pred_s2 = jnp.split(strong_logits, 2)

      y_w, conf_w, confident = losses.confidence_mask(jax.lax.stop_gradient(jax.nn.softmax(pred_u_w)), tau)
      y1, conf1, ignore1 = mixed_targets(box1, (y_w, conf_w, ignore), (y_mix, conf_mix, ignore_mix))
      y2, conf2, ignore2 = mixed_targets(box2, (y_w, conf_w, ignore), (y_mix, conf_mix, ignore_mix))
      loss_x = supervised_loss(pred_x, y, loss_config)
      loss_s1 = losses.masked_cross_entropy(pred_s1, y1, conf1, ignore1, tau)
      loss_s2 = losses.masked_cross_entropy(pred_s2, y2, conf2, ignore2, tau)
      loss_fp = losses.masked_cross_entropy(pred_fp, y_w, conf_w, ignore, tau)
      counted = ignore != losses.IGNORE
      metrics = {'loss_x': loss_x, 'loss_s1': loss_s1, 'loss_s2': loss_s2, 'loss_fp': loss_fp,
                 'mask_ratio': jnp.sum(confident & counted) / jnp.maximum(jnp.sum(counted), 1)}
      bank = state.extra['bank']
      if use_prototypes:
        embed_x, embed_w = embed[:labelled], embed[labelled:labelled + u_w.shape[0]]
        embed_s1, embed_s2 = jnp.split(strong_embed, 2)
        y_e = _down(y, stride)
        valid_e = (y_e != losses.IGNORE).astype(jnp.float32)
        pseudo_e = (_down(confident, stride) & _down(counted, stride)).astype(jnp.float32)
        sums_x, counts_x = class_sums(jax.lax.stop_gradient(embed_x), y_e, valid_e, num_classes)
        sums_u, counts_u = class_sums(jax.lax.stop_gradient(embed_w), _down(y_w, stride), pseudo_e,
                                      num_classes)
        bank = ema_update(state.extra['bank'], sums_x + sums_u, counts_x + counts_u,
                          loss_config.prototype_momentum)
        text_prototypes = model.apply({'params': params}, prompt_ids, method=MPAMatchModel.text_prototypes)
        strong_targets = ((y1, conf1, ignore1), (y2, conf2, ignore2))
        for name, prototypes in (('img', bank.prototypes), ('txt', text_prototypes)):
          metrics[f'loss_{name}_lab'], metrics[f'loss_{name}_unl'] = prototype_contrast(
              embed_x, (embed_s1, embed_s2), prototypes, y_e, valid_e, strong_targets, stride, loss_config)
      return composite_loss(metrics, loss_config), (batch_stats, bank, metrics)

    return finish(state, loss_fn)

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    if variant == 'supervised':
      return supervised_step(state, batch, rng)
    return semi_step(state, batch, rng)

  return train_step


def make_scores_fn(model: MPAMatchModel, config: ml_collections.ConfigDict) -> Callable:
  """Pure `(params, extra, statics, windows uint8 [N, S, S, 3], labels) -> softmax [N, S, S, C]` (the
  segmentation head, BatchNorm running statistics; labels are not used)."""
  data = config.data

  def scores_fn(params, extra, statics, windows, labels):
    del statics, labels
    images = augment.normalize(windows.astype(jnp.float32) / 255.0, data.mean, data.std)
    logits, _ = model.apply({'params': params, 'batch_stats': extra['batch_stats']}, images, False, False,
                            False, method=MPAMatchModel.segment)
    return jax.nn.softmax(logits, axis=-1)

  return scores_fn
