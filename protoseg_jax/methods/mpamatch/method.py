"""MPAMatch behind the core's `Method` interface: UNI TransUNet segmenter, UniMatch loop with image / text
prototype contrast, GlaS / EBHI-SEG / KPI / folder / synthetic data, sliding-window scores, TransUNet export.

Shapes: Bl / Bu labelled / unlabelled batch, W host window, S crop and model tile, C classes (background 0).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from protoseg_jax import metrics as metrics_lib, ops, tokenizer as tokenizer_lib
from protoseg_jax.data import input_pipeline, segmentation_sets as sets
from protoseg_jax.errors import ConfigError
from protoseg_jax.method import EvalSet, Method, TrainData, Workload, check_context
from protoseg_jax.methods.mpamatch import augment, data as data_lib, train
from protoseg_jax.methods.mpamatch.model import FROZEN_COLLECTIONS, MPAMatchModel
from protoseg_jax.models import text as text_lib

# Logical axis names of the segmenter's own parameters (the ViT's and text tower's are the core's).
SEGMENTER_PARAM_AXES: tuple[tuple[str, tuple], ...] = (
    (r'^(decoder|embed_head)/.+/kernel$', (None, None, 'conv_in', 'conv_out')),
    (r'^embed_head/.+/bias$', ('conv_out',)),
    (r'^seg_head/kernel$', (None, None, 'conv_in', 'classes')),
    (r'^seg_head/bias$', ('classes',)),
    (r'^text_adapter/kernel$', ('joint', None)),
    (r'^text_adapter/bias$', ('vector',)),
)


def summarize(confusion: np.ndarray, per_image: np.ndarray, class_names: Sequence[str]) -> dict:
  """Metrics from a `[C, C]` matrix whose class 0 is background.

  `mIoU` / `mDice` average the foreground classes (the foreground IoU / Dice for a binary set);
  `mIoU_all` averages every class including background (the usual semi-supervised segmentation mIoU);
  `image_Dice` (binary sets) is the mean foreground Dice over images, skipping images with no foreground in
  either mask or prediction.
  """
  names = list(class_names)
  order = list(range(1, len(names))) + [0]
  result = metrics_lib.segmentation_metrics(np.asarray(confusion)[np.ix_(order, order)],
                                            [names[i] for i in order], num_tissue_classes=len(names) - 1)
  iou = np.asarray([result[f'IoU/{name}'] for name in names])
  finite = iou[np.isfinite(iou)]
  result['mIoU_all'] = float(finite.mean()) if finite.size else math.nan
  if len(names) == 2:
    dice = []
    for counts in per_image:
      tp, fp, fn = counts[1, 1], counts[0, 1], counts[1, 0]
      if tp + fp + fn > 0:
        dice.append(2 * tp / (2 * tp + fp + fn))
    result['image_Dice'] = float(np.mean(dice)) if dice else math.nan
  result['confusion_matrix'] = np.asarray(confusion).tolist()
  return result


class MPAMatchMethod(Method):
  """MPAMatch (semi-supervised): see `protoseg_jax/methods/mpamatch/train.py` for the step."""

  name = 'mpamatch'
  frozen_collections = FROZEN_COLLECTIONS

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    from protoseg_jax.methods.mpamatch import config as config_lib  # pylint: disable=g-import-not-at-top
    return config_lib.get_config()

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    if config.loss.variant not in train.VARIANTS:
      raise ConfigError(f'config.loss.variant must be one of {train.VARIANTS}, got {config.loss.variant!r}')
    self.model, self.prompt_ids = train.build_model(config)
    self.variant = config.loss.variant

  # --- labels and values ---------------------------------------------------------------------------
  @property
  def value_names(self) -> list[str]:
    return list(self.config.data.class_names)

  @property
  def background_value(self) -> int:
    return 0

  # --- model ---------------------------------------------------------------------------------------
  def param_axes(self):
    return SEGMENTER_PARAM_AXES

  def _extra(self, batch_stats: dict) -> dict:
    return train.empty_extra(self.model.config.num_classes, self.model.config.embed_dim, batch_stats)

  def random_variables(self, rng: jax.Array):
    params, batch_stats = train.random_variables(self.config, self.model, self.prompt_ids, rng)
    return params, self._extra(batch_stats)

  def init_variables(self, rng: jax.Array):
    params, batch_stats = train.init_variables(self.config, self.model, self.prompt_ids, rng)
    return params, self._extra(batch_stats)

  def frozen_params(self, rng: jax.Array) -> dict:
    return train.frozen_params(self.config, self.model, self.prompt_ids, rng)

  def optimizer(self, trainable, total_steps: int):
    return train.make_optimizer(self.config.train, trainable, total_steps)

  def train_step_fn(self, optimizer, schedules):
    return train.train_step_fn(self.model, self.config, self.prompt_ids, optimizer, schedules)

  # --- data ----------------------------------------------------------------------------------------
  @functools.cached_property
  def _datasets(self) -> dict:
    return {}

  def _dataset(self, workdir: str):
    """-> (splits, split dict, split file) of the dataset, the split file written on first use."""
    if workdir not in self._datasets:
      data = self.config.data
      root = sets.resolve_root(data, workdir)
      splits = sets.list_dataset(data, root)
      path = sets.split_path(data, workdir)
      self._datasets[workdir] = (splits, sets.load_or_create_split(splits, data, path), path)
    return self._datasets[workdir]

  def train_data(self, workdir: str, process_index: int, process_count: int) -> TrainData:
    del process_index, process_count  # every host feeds the whole (identical) batch; the mesh splits it
    train_config, data = self.config.train, self.config.data
    splits, split, path = self._dataset(workdir)
    need_unlabelled = self.variant != 'supervised'
    batches = data_lib.load_train_batches(data, train_config, splits, split, self.config.seed,
                                          need_unlabelled)
    logging.info('split %s: %d labelled, %d unlabelled; variant %s', path, len(split['labelled']),
                 len(split['unlabelled']), self.variant)
    images = train_config.labelled_batch_size + (train_config.unlabelled_batch_size if need_unlabelled else 0)
    options = data.grain

    def build(start_step: int):
      return input_pipeline.step_batches(batches.batch, options, start_step)

    return TrainData(num_examples=len(split['labelled']) + len(split['unlabelled']), steps_per_epoch=None,
                     images_per_step=images, host_rows=False,
                     make_iterator=lambda state: input_pipeline.TrainIterator(build, options.worker_count,
                                                                              state))

  def eval_set(self, workdir: str, split: str, process_index: int, process_count: int) -> EvalSet:
    del process_index, process_count
    splits, split_dict, _ = self._dataset(workdir)
    return sets.load_eval_set(sets.eval_pairs(splits, split_dict, split), self.config.data,
                              self.config.data.decode_threads)

  # --- inference -----------------------------------------------------------------------------------
  def scores_fn(self, context: str):
    check_context(context)
    return train.make_scores_fn(self.model, self.config)

  def summarize(self, confusion: np.ndarray, per_image: np.ndarray) -> dict:
    return summarize(confusion, per_image, self.config.data.class_names)

  def format_metrics(self, metrics: dict) -> str:
    lines = [metrics_lib.format_metrics_table(metrics)]
    extras = [f'mIoU (all classes) {100 * metrics["mIoU_all"]:.2f}'] if 'mIoU_all' in metrics else []
    if 'image_Dice' in metrics:
      extras.append(f'image-wise Dice {100 * metrics["image_Dice"]:.2f}')
    return '\n'.join(lines + ['   '.join(extras)] if extras else lines)

  # --- explanations (protoseg_jax/explaining.py) ----------------------------------------------------
  # Prototypes: per class (background first) its text prototype (the class-name prompt) and its EMA image
  # prototype (`extra['bank']`), interleaved [T_0, I_0, T_1, I_1, ...]; one feature level, the embedding map.
  @functools.cached_property
  def tokenizer(self):
    return tokenizer_lib.build_tokenizer(self.config.tokenizer)

  def query_tokenizer(self):
    """A free prompt is `[BOS, ctx x n_ctx, phrase, EOS]`, as a class prompt."""
    return self.tokenizer, text_lib.phrase_token_budget(self.config.model.n_ctx,
                                                        self.config.model.text.context_length)

  def phrase_token_ids(self, prompts: Sequence[str]) -> np.ndarray:
    return text_lib.prompt_token_ids(self.tokenizer, prompts, self.config.model.n_ctx,
                                     self.config.model.text.context_length)

  def _check_level(self, block: str) -> None:
    if int(self.config[block].level) != 1:
      raise ConfigError(f'config.{block}.level={self.config[block].level}: MPAMatch has one feature level, '
                        'the embedding map (1)')

  def query_level_name(self) -> str:
    size = self.config.data.image_size // self.model.config.embed_stride
    return f'embedding map ({size} x {size} per tile)'

  def query_context_fn(self):
    """`params -> [n_ctx, D]` by `config.query.context`: 'mean' (default) = the mean of the learned class
    contexts, a class name = its context. 'init' is refused: MPAMatch's context starts random (CoOp)."""
    choice, names = str(self.config.query.context), list(self.config.data.class_names)
    if choice == 'mean':
      return lambda params: jnp.mean(params['prompt_learner']['ctx'], axis=0)
    if choice in names:
      index = names.index(choice)
      return lambda params: params['prompt_learner']['ctx'][index]
    raise ConfigError(f"config.query.context={choice!r} must be 'mean' or a class name ({', '.join(names)})"
                      + ("; MPAMatch's context starts random, it has no initial phrase" if choice == 'init'
                         else ''))

  def _embeddings(self, params, extra, images):
    """uint8 tiles -> unit pixel embeddings `[B, h, w, E]` (BatchNorm running statistics)."""
    data = self.config.data
    inputs = augment.normalize(images.astype(jnp.float32) / 255.0, data.mean, data.std)
    _, embeddings = self.model.apply({'params': params, 'batch_stats': extra['batch_stats']}, inputs, False,
                                     False, True, method=MPAMatchModel.segment)
    return embeddings

  def query_fn(self):
    from protoseg_jax.explain import query as query_lib  # pylint: disable=g-import-not-at-top
    self._check_level('query')
    context_of, model = self.query_context_fn(), self.model

    def query_fn(params, extra, statics, phrase_ids, images):
      del statics
      phrases = model.apply({'params': params}, phrase_ids, context_of(params),
                            method=MPAMatchModel.phrase_prototypes)
      return query_lib.similarity_maps(self._embeddings(params, extra, images), phrases)

    return query_fn

  def prototype_infos(self) -> list:
    from protoseg_jax.explain import colors, prototype_map  # pylint: disable=g-import-not-at-top
    names = list(self.config.data.class_names)
    palette = colors.prototype_palette(len(names), 2, self.palette[:len(names)])
    return prototype_map.describe_prototypes(names, ('text', 'image'), [[name] for name in names], palette)

  def _prototypes(self, params, extra) -> jax.Array:
    """`[2C, E]`: text and image prototype of each class, interleaved (unseen bank rows are zeros)."""
    text = self.model.apply({'params': params}, jnp.asarray(self.prompt_ids),
                            method=MPAMatchModel.text_prototypes)
    return ops.interleave(text, extra['bank'].prototypes.astype(jnp.float32))

  def patch_similarities_fn(self):
    from protoseg_jax.explain import query as query_lib  # pylint: disable=g-import-not-at-top
    self._check_level('explain')

    def patch_fn(params, extra, statics, images):
      del statics
      embeddings = self._embeddings(params, extra, images)
      return query_lib.similarity_maps(embeddings, self._prototypes(params, extra))

    return patch_fn

  def prototype_map_fn(self, context: str):
    """Per pixel of predicted class c: whichever of c's text / image prototype is closer to the pixel's
    embedding (cosine maps resized bilinearly, align_corners=True, to the tile)."""
    from protoseg_jax.explain import prototype_map, query as query_lib  # pylint: disable=g-import-not-at-top
    check_context(context)
    num_classes, data = len(self.config.data.class_names), self.config.data

    def map_fn(params, extra, statics, images, labels):
      del statics, labels
      inputs = augment.normalize(images.astype(jnp.float32) / 255.0, data.mean, data.std)
      logits, embeddings = self.model.apply({'params': params, 'batch_stats': extra['batch_stats']}, inputs,
                                            False, False, True, method=MPAMatchModel.segment)
      cams = query_lib.similarity_maps(embeddings, self._prototypes(params, extra),
                                       out_hw=tuple(images.shape[1:3]))
      return prototype_map.prototype_map(cams, jnp.argmax(logits, axis=-1), num_classes, 2)

    return map_fn

  # --- export and bench ----------------------------------------------------------------------------
  def export(self, params: dict, extra: Any, out_dir: str) -> dict[str, str]:
    from protoseg_jax.methods.mpamatch import export as export_lib  # pylint: disable=g-import-not-at-top
    return export_lib.export(self.config, params, extra['batch_stats'], self.model.config, out_dir)

  def bench_workloads(self, what: Sequence[str], batch_size: Optional[int] = None) -> list[Workload]:
    from protoseg_jax.methods.mpamatch import bench  # pylint: disable=g-import-not-at-top
    return bench.workloads(self, what, batch_size)

