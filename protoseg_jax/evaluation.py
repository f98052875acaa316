"""Evaluation of any method on the mesh: confusion matrices over a split, then the method's metrics.

Two paths, chosen by the split:
* tiles: every image is one model tile and its mask has the tile's size (BCSS-WSSS) -> batches of
  `config.eval.batch_size` tiles split over the data-parallel devices (each host feeds its own share of the
  split), argmax and per-image confusion matrices computed on the device; only `[B, K, K]` counts return.
* windows: images of other sizes (GlaS, EBHI resized, KPI) -> sliding windows (`inference.stitched_scores`,
  stride `config.eval.stride`), batches identical on every host and split over the devices, stitched on the
  host, resized to the mask and scored there.
With a dense CRF (`crf_pool`), the tile path returns the scores to the host, where the CRF runs on worker
processes while the device computes the next batches.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from protoseg_jax import inference, sharding
from protoseg_jax.method import EvalSet, Method


def _per_image_confusion(target: jax.Array, pred: jax.Array, valid: jax.Array, num_values: int) -> jax.Array:
  """`[B, H, W]` ground truth and prediction -> `[B, K, K]` int32 counts (invalid rows and values outside
  0..K-1, e.g. 255 = not scored, left out)."""
  batch = target.shape[0]
  target = target.astype(jnp.int32).reshape(batch, -1)
  pred = pred.astype(jnp.int32).reshape(batch, -1)
  keep = (target >= 0) & (target < num_values) & (pred >= 0) & (pred < num_values) & valid[:, None]
  rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
  index = jnp.where(keep, (rows * num_values + target) * num_values + pred, 0)
  counts = jnp.bincount(index.reshape(-1), weights=keep.reshape(-1).astype(jnp.int32),
                        length=batch * num_values * num_values)
  return counts.reshape(batch, num_values, num_values).astype(jnp.int32)


def host_confusion(mask: np.ndarray, pred: np.ndarray, num_values: int) -> np.ndarray:
  """`[K, K]` int64 counts of one image on the host (values outside 0..K-1 left out)."""
  mask, pred = mask.astype(np.int64).ravel(), pred.astype(np.int64).ravel()
  keep = (mask >= 0) & (mask < num_values) & (pred >= 0) & (pred < num_values)
  return np.bincount(mask[keep] * num_values + pred[keep], minlength=num_values ** 2).reshape(num_values,
                                                                                              num_values)


def is_tile_set(eval_set: EvalSet, tile: int) -> bool:
  return all(image.shape[:2] == (tile, tile) and mask.shape == (tile, tile)
             for image, mask in zip(eval_set.images, eval_set.masks))


class Evaluator:
  """Jitted statics, scores and confusion functions of a method on a mesh, reused across evaluations.

  `param_shardings` / `extra_shardings`: the layouts of the params and extra state passed in (e.g.
  `{**shardings.frozen, **shardings.trainable}` and `shardings.extra` of the train state).
  """

  def __init__(self, method: Method, config: ml_collections.ConfigDict, mesh, param_shardings: Any,
               extra_shardings: Any, context: str = 'eval'):
    self.method, self.config, self.mesh = method, config, mesh
    self.param_shardings, self.extra_shardings = param_shardings, extra_shardings
    self.batch_size = config.eval.batch_size
    sharding.check_global_batch(self.batch_size, mesh, 'config.eval.batch_size')
    self.tile = config.data.image_size
    self.stride = config.eval.get('stride', 0) or self.tile
    self.num_values = len(method.value_names)
    rules = config.sharding.logical_rules
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    scores_fn = method.scores_fn(context)
    self._statics = sharding.jit_sharded(method.inference_statics, mesh, rules,
                                         in_shardings=(param_shardings, extra_shardings),
                                         out_shardings=replicated)
    in_shardings = (param_shardings, extra_shardings, replicated, batch, batch)
    self._scores = sharding.jit_sharded(scores_fn, mesh, rules, in_shardings=in_shardings,
                                        out_shardings=replicated)
    self._local_scores = sharding.jit_sharded(scores_fn, mesh, rules, in_shardings=in_shardings,
                                              out_shardings=batch)
    num_values = self.num_values

    def confusion(params, extra, statics, images, labels, masks, valid):
      pred = jnp.argmax(scores_fn(params, extra, statics, images, labels), axis=-1)
      return _per_image_confusion(masks, pred, valid, num_values)

    self._confusion = sharding.jit_sharded(confusion, mesh, rules,
                                           in_shardings=in_shardings + (batch, batch),
                                           out_shardings=replicated)

  # --- the two paths ---------------------------------------------------------------------------------
  def _tile_batches(self, eval_set: EvalSet):
    """Fixed-size host batches `(images, labels, masks, valid, indices)` of this host's examples; every host
    yields as many (padding rows have valid = False)."""
    process_count = jax.process_count() if eval_set.per_host else 1
    host_batch = self.batch_size // process_count
    per_host = -(-eval_set.num_examples // process_count)
    num_batches = -(-per_host // host_batch) if per_host else 0
    count = len(eval_set.images)
    size, classes = self.tile, eval_set.labels.shape[1]
    for start in range(0, num_batches * host_batch, host_batch):
      index = np.arange(start, start + host_batch)
      valid = index < count
      images = np.zeros((host_batch, size, size, 3), np.uint8)
      masks = np.zeros((host_batch, size, size), np.uint8)
      labels = np.zeros((host_batch, classes), np.int32)
      for row in np.flatnonzero(valid):
        images[row], masks[row], labels[row] = eval_set.images[index[row]], eval_set.masks[index[row]], \
            eval_set.labels[index[row]]
      yield images, labels, masks, valid, index

  def _place(self, host_arrays: dict, per_host: bool) -> dict:
    return sharding.shard_host_batch(host_arrays, self.mesh, self.batch_size if per_host else None)

  def jit_batch_fn(self, fn, shared: int = 0, batch: int = 1, out_shardings=None):
    """`fn(params, extra, statics, *shared_args, *batch_args)` jitted on the mesh as `scores_fn` is: params
    and extra in their layouts, statics and the `shared` arguments replicated, the `batch` arguments split
    over the data-parallel devices (place them with `place`); the output replicated unless `out_shardings`."""
    replicated = sharding.replicated(self.mesh)
    in_shardings = ((self.param_shardings, self.extra_shardings, replicated) + (replicated,) * shared
                    + (sharding.batch_sharding(self.mesh),) * batch)
    return sharding.jit_sharded(fn, self.mesh, self.config.sharding.logical_rules, in_shardings=in_shardings,
                                out_shardings=replicated if out_shardings is None else out_shardings)

  def place(self, host_arrays: dict) -> dict:
    """Whole host batches (identical on every host) -> global arrays split over the data-parallel devices."""
    return self._place(host_arrays, per_host=False)

  def _tile_confusions(self, params, extra, statics, eval_set: EvalSet) -> np.ndarray:
    per_image = []
    for images, labels, masks, valid, _ in self._tile_batches(eval_set):
      batch = self._place({'images': images, 'labels': labels, 'masks': masks, 'valid': valid},
                          eval_set.per_host)
      # Dispatch stays asynchronous: nothing is read back until the loop ends.
      per_image.append(self._confusion(params, extra, statics, batch['images'], batch['labels'],
                                       batch['masks'], batch['valid']))
    if not per_image:
      return np.zeros((0, self.num_values, self.num_values), np.int64)
    return np.concatenate([np.asarray(jax.device_get(c), np.int64) for c in per_image])

  def _tile_confusions_crf(self, params, extra, statics, eval_set: EvalSet, crf_pool) -> np.ndarray:
    """Scores to the host, the CRF on worker processes (`crf.CrfPool`) overlapped with the next batches
    on the device; per-image confusions of this host's examples, in order."""
    per_image: list[np.ndarray] = []
    masks_in_flight: list[np.ndarray] = []
    previous = None

    def collect(batches) -> None:
      for refined in batches:
        masks = masks_in_flight.pop(0)
        per_image.extend(host_confusion(mask, pred, self.num_values) for mask, pred in zip(masks, refined))

    def hand_over(item) -> None:
      scores, images, masks, valid = item
      probs = self.method.scores_to_probs(sharding.local_rows(scores))[valid]
      masks_in_flight.append(masks[valid])
      crf_pool.submit(np.stack([self.method.crf_image(tile) for tile in images[valid]]) if valid.any()
                      else images[:0], probs)

    for images, labels, masks, valid, _ in self._tile_batches(eval_set):
      batch = self._place({'images': images, 'labels': labels}, eval_set.per_host)
      scores = self._local_scores(params, extra, statics, batch['images'], batch['labels'])
      if previous is not None:  # read the previous batch back while this one runs on the device
        hand_over(previous)
        collect(crf_pool.ready())
      previous = (scores, images, masks, valid)
    if previous is not None:
      hand_over(previous)
    collect(crf_pool.drain())
    return np.stack(per_image) if per_image else np.zeros((0, self.num_values, self.num_values), np.int64)

  def statics(self, params, extra) -> Any:
    """The method's per-evaluation statics (e.g. a prototype bank), replicated on the mesh."""
    return self._statics(params, extra)

  def scores_call(self, params, extra, statics):
    """`(windows uint8 [B, S, S, 3], labels [B, C]) -> scores [B, S, S, K]` NumPy, B = config.eval.batch_size;
    the same windows on every host, split over the devices (see `inference.stitched_scores`)."""
    def scores_call(windows, labels):
      batch = self._place({'images': windows, 'labels': labels}, per_host=False)
      scores = self._scores(params, extra, statics, batch['images'], batch['labels'])
      return np.asarray(jax.device_get(scores))
    return scores_call

  def _window_confusions(self, params, extra, statics, eval_set: EvalSet) -> np.ndarray:
    scores_call = self.scores_call(params, extra, statics)
    per_image = [None] * len(eval_set.images)
    for index, scores in inference.stitched_scores(scores_call, eval_set.images, eval_set.labels, self.tile,
                                                   self.stride, self.batch_size):
      mask = eval_set.masks[index]
      pred = np.argmax(inference.resize_scores(scores, mask.shape), axis=-1)
      per_image[index] = host_confusion(mask, pred, self.num_values)
    return np.stack(per_image) if per_image else np.zeros((0, self.num_values, self.num_values), np.int64)

  # --- public ---------------------------------------------------------------------------------------
  def confusions(self, params, extra, eval_set: EvalSet, crf_pool=None) -> np.ndarray:
    """`[N, K, K]` int64 per-image confusion matrices of this host's examples (tile path) or of all."""
    statics = self._statics(params, extra)
    if is_tile_set(eval_set, self.tile):
      if crf_pool is not None:
        return self._tile_confusions_crf(params, extra, statics, eval_set, crf_pool)
      return self._tile_confusions(params, extra, statics, eval_set)
    if crf_pool is not None:
      raise ValueError('config.eval.crf works on tile sets only (this split has images of other sizes)')
    return self._window_confusions(params, extra, statics, eval_set)

  def evaluate(self, params, extra, eval_set: EvalSet, crf_pool=None) -> dict:
    """The method's metrics over the whole split (all hosts' shares summed; every host gets the result)."""
    start = time.perf_counter()
    per_image = self.confusions(params, extra, eval_set, crf_pool)
    confusion = per_image.sum(axis=0) if len(per_image) else np.zeros((self.num_values,) * 2, np.int64)
    if crf_pool is not None and eval_set.per_host and jax.process_count() > 1:
      # The CRF path scores each host's own rows; the other paths' counts come back replicated (global).
      confusion = sharding.sum_across_processes(confusion)
    result = self.method.summarize(confusion, per_image)
    result.setdefault('confusion_matrix', np.asarray(confusion).tolist())
    result['examples'] = int(eval_set.num_examples)
    logging.info('evaluated %d examples in %.1f s', eval_set.num_examples, time.perf_counter() - start)
    return result

