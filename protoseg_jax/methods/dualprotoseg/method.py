"""DualProtoSeg behind the core's `Method` interface: model, prompts, parameters, data, scores, metrics,
export.

Shapes: B batch, S tile size, C tissue classes, M prompts per class, P = 2·C·M prototypes, K = C + 1 mask
values (background last).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from protoseg_jax import config_base, metrics as metrics_lib, ops, tokenizer as tokenizer_lib
from protoseg_jax.convert import pretrained
from protoseg_jax.data import bcss, grain_pipeline, input_pipeline, tile_sets
from protoseg_jax.errors import ConfigError, DatasetError
from protoseg_jax.method import EvalSet, ImageSource, Method, TrainData, Workload, check_context
from protoseg_jax.methods.dualprotoseg import export as export_lib, train
from protoseg_jax.methods.dualprotoseg.model import DualProtoSeg, DualProtoSegConfig
from protoseg_jax.models import text as text_lib
from protoseg_jax.models.text import TextConfig
from protoseg_jax.models.vit import VitConfig

# Logical axis names of the heads (the towers' are `sharding.TOWER_PARAM_AXES`).
HEAD_PARAM_AXES: tuple[tuple[str, tuple], ...] = (
    (r'^(shared_decoder|feature_pyramid_\d+)/[^/]+/kernel$', (None, None, 'conv_in', 'conv_out')),
    (r'^(shared_decoder|feature_pyramid_\d+)/[^/]+/bias$', ('conv_out',)),
    (r'^text_proj/kernel$', ('joint', 'feature')),
    (r'^text_proj/bias$', ('vector',)),
    (r'^proto_projections_\d+/kernel$', ('feature', 'conv_out')),
    (r'^learnable_image_prototypes$', ('prototypes', 'feature')),
    (r'^logit_scale\d+$', ()),
)


def model_config(config: ml_collections.ConfigDict) -> DualProtoSegConfig:
  model = config.model
  vit = config_base.dataclass_from_config(VitConfig, model.vit, 'config.model.vit')
  text = config_base.dataclass_from_config(TextConfig, model.text, 'config.model.text')
  rest = {key: value for key, value in model.items() if key not in ('vit', 'text')}
  num_classes = len(config.data.class_names)
  phrases = config.prompts.phrases
  if len(phrases) != num_classes or any(len(p) != model.prompts_per_class for p in phrases):
    raise ConfigError(f'config.prompts.phrases must hold {num_classes} classes x '
                      f'{model.prompts_per_class} phrases (config.model.prompts_per_class), got '
                      f'{[len(p) for p in phrases]}')
  return config_base.dataclass_from_config(DualProtoSegConfig, rest, 'config.model', vit=vit, text=text,
                                           num_classes=num_classes)


def prompt_token_ids(config: ml_collections.ConfigDict, tokenizer) -> np.ndarray:
  """`[C*M, L]` int32 prompt ids, class-major, with `n_ctx` placeholder slots after BOS."""
  phrases = [phrase for class_phrases in config.prompts.phrases for phrase in class_phrases]
  return text_lib.prompt_token_ids(tokenizer, phrases, config.model.n_ctx, config.model.text.context_length)


def set_prompt_context(config: ml_collections.ConfigDict, model: DualProtoSeg, params: dict,
                       tokenizer) -> dict:
  """Sets the prompt context `[C, n_ctx, D]` as the reference does: the token embeddings of
  `config.prompts.context_init` (from the current text tower's table) plus per-class N(0, std) noise."""
  init_ids = [tokenizer.bos_id] + tokenizer.encode(config.prompts.context_init) + [tokenizer.eos_id]
  table = np.asarray(params['text_encoder']['token_embedding']['embedding'])
  context = text_lib.initial_context(table, init_ids, model.config.num_classes, model.config.n_ctx,
                                     config.prompts.context_init_std,
                                     np.random.default_rng(config.seed))
  return {**params, 'prompt_learner': {**params['prompt_learner'], 'ctx': jnp.asarray(context)}}


class DualProtoSegMethod(Method):
  """DualProtoSeg (weakly supervised, image-level labels); the network: `methods/dualprotoseg/model.py`."""

  name = 'dualprotoseg'
  frozen_collections = ('trunk', 'text_encoder')

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    from protoseg_jax.methods.dualprotoseg import config as config_lib  # pylint: disable=g-import-not-at-top
    return config_lib.get_config()

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.model_config = model_config(config)
    self.model = DualProtoSeg(self.model_config, config_base.compute_dtype(config.train.compute_dtype))
    self.tokenizer = tokenizer_lib.for_backbone(config.tokenizer, config.backbone)
    text_lib.check_tokenizer_fits(self.tokenizer, config.model.text.vocab_size)
    self.prompt_ids = prompt_token_ids(config, self.tokenizer)

  # --- labels and values ---------------------------------------------------------------------------
  @property
  def value_names(self) -> list[str]:
    return list(self.config.data.class_names) + [self.config.data.background_name]

  @property
  def background_value(self) -> int:
    return len(self.config.data.class_names)

  # --- model ---------------------------------------------------------------------------------------
  def param_axes(self):
    return HEAD_PARAM_AXES

  def random_variables(self, rng: jax.Array) -> tuple[dict, dict]:
    size = self.config.data.image_size
    params_key, dropout_key = jax.random.split(rng)
    variables = self.model.init({'params': params_key, 'dropout': dropout_key},
                                jnp.zeros((1, size, size, 3), jnp.float32), jnp.asarray(self.prompt_ids))
    return dict(variables['params']), {}

  def init_variables(self, rng: jax.Array) -> tuple[dict, dict]:
    """Random heads + frozen towers from `config.backbone` ('none' = random towers drawn from the seed).

    Files are read first, so a bad path fails before anything compiles; imported towers replace the random
    ones before the prompt context is drawn from the token table (the pretrained embeddings of
    `config.prompts.context_init`, as the reference).
    """
    towers = pretrained.load_towers(self.config.backbone, self.model_config.vit, self.model_config.text)
    params, extra = jax.jit(self.random_variables)(rng)
    for name, tower in towers.items():
      pretrained.check_same_structure(name, params[name], tower)
      params[name] = jax.tree.map(jnp.asarray, pretrained.as_float32(tower))
    return set_prompt_context(self.config, self.model, params, self.tokenizer), extra

  def optimizer(self, trainable, total_steps: int):
    optimizer, schedule = train.make_optimizer(self.config.train, trainable, total_steps)
    return optimizer, {'learning_rate': schedule}

  def train_step_fn(self, optimizer, schedules):
    return train.train_step_fn(self.model, self.config, self.prompt_ids, optimizer,
                               schedules['learning_rate'])

  # --- data ----------------------------------------------------------------------------------------
  @functools.cached_property
  def _roots(self) -> dict:
    return {}

  def _root(self, workdir: str) -> str:
    if workdir not in self._roots:
      self._roots[workdir] = tile_sets.resolve_root(self.config.data, workdir)
    return self._roots[workdir]

  def train_data(self, workdir: str, process_index: int, process_count: int) -> TrainData:
    data, batch_size = self.config.data, self.config.train.batch_size
    source, decode, count = tile_sets.train_source(data, self._root(workdir))
    last_batch = data.get('last_partial_batch', 'drop')
    steps_per_epoch = input_pipeline.steps_per_epoch(count, batch_size, last_batch)
    if steps_per_epoch == 0:
      raise DatasetError(f'the training split has {count} tiles, fewer than one batch of {batch_size} '
                         '(config.train.batch_size)')
    augment_on = data.get('augment_on', 'device')
    if augment_on not in ('device', 'host'):
      raise ConfigError(f"config.data.augment_on must be 'device' or 'host', got {augment_on!r}")
    host_transform = grain_pipeline.HostAugment.from_config(data) if augment_on == 'host' else None

    def build(start_step: int):
      return input_pipeline.element_batches(
          source, decode, seed=self.config.seed, global_batch=batch_size, last_batch=last_batch,
          process_index=process_index, process_count=process_count, options=data.grain,
          start_step=start_step, host_transform=host_transform, transform_seed=self.config.seed)

    return TrainData(num_examples=count, steps_per_epoch=steps_per_epoch, images_per_step=batch_size,
                     host_rows=True,
                     make_iterator=lambda state: input_pipeline.TrainIterator(build, data.grain.worker_count,
                                                                              state))

  def eval_set(self, workdir: str, split: str, process_index: int, process_count: int) -> EvalSet:
    return tile_sets.eval_tiles(self.config.data, self._root(workdir), split, self.model_config.num_classes,
                                process_index, process_count)

  # --- inference -----------------------------------------------------------------------------------
  def inference_statics(self, params: dict, extra: Any) -> jax.Array:
    """The prototype bank `[P, F]`: the text tower runs once per evaluation, not per batch."""
    del extra
    return self.model.apply({'params': params}, jnp.asarray(self.prompt_ids), method=DualProtoSeg.text_bank)

  def scores_fn(self, context: str):
    check_context(context)
    if context == 'eval':
      gating, threshold = 'none', 0.5    # evaluation labels always come from the masks
    else:
      block = self.config.predict if context == 'predict' else self.config.slides
      gating, threshold = block.gating, block.gating_threshold
    return train.make_scores_fn(self.model, self.config, gating, threshold)

  def scores_to_probs(self, scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, np.float32)
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)

  def crf_image(self, tile: np.ndarray) -> np.ndarray:
    """The reference's CRF image: its normalised input de-normalised and truncated to uint8, in the model's
    channel order (`crf.reference_image`)."""
    from protoseg_jax import crf  # pylint: disable=g-import-not-at-top
    data = self.config.data
    ordered = tile[..., ::-1] if data.get('channel_order', 'rgb') == 'bgr' else tile
    return crf.reference_image(np.ascontiguousarray(ordered), data.mean, data.std)

  def image_labels(self, path: str) -> np.ndarray:
    """The label in the file name (`...[1101].png`) when it has one, else unknown (-1)."""
    try:
      return bcss.parse_label(os.path.basename(path), self.num_label_classes)
    except DatasetError:
      return np.full((self.num_label_classes,), -1, np.int32)

  def summarize(self, confusion: np.ndarray, per_image: np.ndarray) -> dict:
    del per_image
    eval_config = self.config.eval
    result = metrics_lib.segmentation_metrics(
        confusion, self.value_names, num_tissue_classes=len(self.config.data.class_names),
        ignore_background=eval_config.ignore_background, mean_mode=eval_config.get('metric_means', 'nanmean'))
    result['confusion_matrix'] = np.asarray(confusion).tolist()
    return result

  # --- explanations (protoseg_jax/explaining.py) ----------------------------------------------------
  def query_tokenizer(self):
    """A free prompt is `[BOS, ctx x n_ctx, phrase, EOS]`, as a class prompt."""
    return self.tokenizer, text_lib.phrase_token_budget(self.config.model.n_ctx,
                                                        self.config.model.text.context_length)

  def phrase_token_ids(self, prompts: Sequence[str]) -> np.ndarray:
    return text_lib.prompt_token_ids(self.tokenizer, prompts, self.config.model.n_ctx,
                                     self.config.model.text.context_length)

  def _level(self, block: str) -> int:
    """0-based pyramid level of `config.<block>.level` (1-based), checked."""
    level, levels = int(self.config[block].level), len(self.model_config.pyramid_channels)
    if not 1 <= level <= levels:
      raise ConfigError(f'config.{block}.level={level} is not a pyramid level (1..{levels})')
    return level - 1

  def query_level_name(self) -> str:
    level = self._level('query')
    return f'pyramid level {level + 1} ({self.model_config.pyramid_channels[level]} channels)'

  def context_token_ids(self) -> np.ndarray:
    """`[n_ctx]` ids whose token embeddings are the initial context (`text_lib.initial_context`'s rule)."""
    n_ctx = self.config.model.n_ctx
    ids = [self.tokenizer.bos_id] + self.tokenizer.encode(self.config.prompts.context_init) + [
        self.tokenizer.eos_id]
    ids = (ids + [ids[-1]] * (n_ctx + 2))[:max(len(ids), n_ctx + 2)]
    return np.asarray(ids[1:n_ctx + 1], np.int32)

  def query_context_fn(self):
    """`params -> [n_ctx, D]`, the context of free phrases by `config.query.context`: 'init' = the token
    embeddings of `config.prompts.context_init` without the per-class noise (the prompt reads
    "<context_init> <phrase>"), 'mean' = the mean of the learned class contexts, a class name = its learned
    context. Refuses anything else (one line)."""
    choice, names = str(self.config.query.context), list(self.config.data.class_names)
    if choice == 'init':
      ids = self.context_token_ids()
      return lambda params: params['text_encoder']['token_embedding']['embedding'][ids]
    if choice == 'mean':
      return lambda params: jnp.mean(params['prompt_learner']['ctx'], axis=0)
    if choice in names:
      index = names.index(choice)
      return lambda params: params['prompt_learner']['ctx'][index]
    raise ConfigError(f"config.query.context={choice!r} must be 'init', 'mean' or a class name "
                      f'({", ".join(names)})')

  def query_fn(self):
    from protoseg_jax.explain import query as query_lib  # pylint: disable=g-import-not-at-top
    level, context_of = self._level('query'), self.query_context_fn()
    model, data = self.model, self.config.data

    def query_fn(params, extra, statics, phrase_ids, images):
      del extra, statics
      variables = {'params': params}
      phrases = model.apply(variables, phrase_ids, context_of(params), level,
                            method=DualProtoSeg.phrase_prototypes)
      features = model.apply(variables, train.model_input(images, data), level,
                             method=DualProtoSeg.level_features)
      return query_lib.similarity_maps(features, phrases)

    return query_fn

  def prototype_infos(self) -> list:
    from protoseg_jax.explain import colors, prototype_map  # pylint: disable=g-import-not-at-top
    num_classes, per_class = self.model_config.num_classes, self.model_config.prompts_per_class
    palette = colors.prototype_palette(num_classes, 2 * per_class, self.palette[:num_classes])
    phrases = [list(class_phrases) for class_phrases in self.config.prompts.phrases]
    return prototype_map.describe_prototypes(list(self.config.data.class_names),
                                             prototype_map.interleaved_kinds(per_class), phrases, palette)

  def patch_similarities_fn(self):
    """Cosine of the level-`config.explain.level` pixel features with that level's projected bank `[P]`."""
    from protoseg_jax.explain import query as query_lib  # pylint: disable=g-import-not-at-top
    level, model, data = self._level('explain'), self.model, self.config.data

    def patch_fn(params, extra, bank, images):
      del extra
      variables = {'params': params}
      features = model.apply(variables, train.model_input(images, data), level,
                             method=DualProtoSeg.level_features)
      prototypes = model.apply(variables, bank, method=DualProtoSeg.level_prototypes)[level]
      return query_lib.similarity_maps(features, prototypes)

    return patch_fn

  def prototype_map_fn(self, context: str):
    """The mask of `scores_fn(context)` (TTA, gating) and, per pixel of a tissue class c, the arg-max over c's
    2M prototypes of the un-augmented level-`config.eval.cam_level` CAM resized to the tile (bilinear,
    align_corners=True as the CAM post-processing)."""
    from protoseg_jax.explain import prototype_map  # pylint: disable=g-import-not-at-top
    scores_fn, level = self.scores_fn(context), self.config.eval.cam_level - 1
    model, data = self.model, self.config.data
    num_classes, group = self.model_config.num_classes, 2 * self.model_config.prompts_per_class

    def map_fn(params, extra, bank, images, labels):
      predicted = jnp.argmax(scores_fn(params, extra, bank, images, labels), axis=-1)
      variables = {'params': params}
      features = model.apply(variables, train.model_input(images, data), level,
                             method=DualProtoSeg.level_features)
      cams = model.apply(variables, features, bank, level, method=DualProtoSeg.level_cam)
      cams = ops.resize_bilinear(cams, tuple(images.shape[1:3]), align_corners=True)
      return prototype_map.prototype_map(cams, predicted, num_classes, group)

    return map_fn

  def explain_images(self, workdir: str, split: str) -> ImageSource:
    """'train': the training tiles with their image-level labels, read on demand; other splits: the eval
    split (labels from the masks)."""
    if split != 'train':
      return super().explain_images(workdir, split)
    root = self._root(workdir)
    source, decode, count = tile_sets.train_source(self.config.data, root)
    if tile_sets.uses_records(self.config.data):
      names = [f'train #{index}' for index in range(count)]
    else:
      tiles = bcss.list_train_tiles(root, self.model_config.num_classes)
      names = [os.path.basename(path) for path, _ in tiles]

    def read(index: int):
      element = decode(source[index])
      return np.asarray(element['images'], np.uint8), np.asarray(element['labels'], np.int32)

    return ImageSource(names, read)

  # --- export and bench ----------------------------------------------------------------------------
  def initial_text_features(self, params: dict) -> np.ndarray:
    """Text features of the prompts with the initial context (the reference's construction-time buffers)."""
    initial = set_prompt_context(self.config, self.model, params, self.tokenizer)
    features = jax.jit(lambda p: self.model.apply({'params': p}, jnp.asarray(self.prompt_ids),
                                                  method=DualProtoSeg.text_features))(initial)
    return np.asarray(features, np.float32)

  def export(self, params: dict, extra: Any, out_dir: str) -> dict[str, str]:
    from protoseg_jax.convert import torch_files  # pylint: disable=g-import-not-at-top
    del extra
    backbone = self.config.backbone
    original = None
    if backbone.source == 'conch':
      original = torch_files.load_state_dict(backbone.path, backbone.get('checkpoint_key', ''))
    return export_lib.write(self.config, self.model_config, params, self.initial_text_features(params),
                            out_dir, original)

  def bench_workloads(self, what: Sequence[str], batch_size: Optional[int] = None) -> list[Workload]:
    from protoseg_jax.methods.dualprotoseg import bench  # pylint: disable=g-import-not-at-top
    return bench.workloads(self, what, batch_size)
