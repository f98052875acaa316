"""Dense CRF refinement of the test pass, as the reference's `validate_test` (`utils/crf.py: DenseCRF`).

Per tile: `DenseCRF2D(W, H, K)`, unary `unary_from_softmax(probs)` (= -log of the probabilities clipped to
[1e-5, 1], float32), `addPairwiseGaussian(sxy=15, compat=30)`, `addPairwiseBilateral(sxy=10, srgb=20,
rgbim=image, compat=50)`, 5 mean-field iterations, argmax over the classes. Classes whose probability is 0
at every pixel are left out of the CRF (and can then never win), as the reference does.

The image the reference gives the bilateral term is its de-normalised input tensor,
`clamp((x * std + mean) * 255, 0, 255).byte()` (truncation, not rounding) of the albumentations-normalised
tile, in the channel order the model is fed (BGR for the published config). `reference_image` rebuilds it
from the uint8 tile: about 45 % of its values are one below the tile's (on a random tile). The channel
order does not change the result (the bilateral kernel weighs the three channels alike).

pydensecrf holds the GIL for the whole inference (its Cython wrapper has no `nogil`; measured: two threads
run no faster than one), so `CrfPool` runs refinements in worker processes. pydensecrf is the optional
extra `crf` (package `pydensecrf2`, built from its sdist); it is imported only when a CRF is asked for.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
from typing import Iterator, Optional, Sequence

import numpy as np

from protoseg_jax.errors import ConfigError

MISSING_EXTRA = 'dense CRF needs pydensecrf: pip install -e ".[crf]" (config.eval.crf)'


@dataclasses.dataclass(frozen=True)
class CrfParams:
  """Dense CRF settings; the defaults are the reference's (`utils/crf.py: DenseCRF.__init__`)."""

  gauss_sxy: float = 15.0
  gauss_compat: float = 30.0
  bilateral_sxy: float = 10.0
  bilateral_srgb: float = 20.0
  bilateral_compat: float = 50.0
  iterations: int = 5
  unary_clip: float = 1e-5   # `pydensecrf.utils.unary_from_softmax`'s default clip


def _pydensecrf():
  """`(densecrf, utils)` modules of pydensecrf, or `ConfigError` naming the extra."""
  try:
    import pydensecrf.densecrf as densecrf  # pylint: disable=import-outside-toplevel
    import pydensecrf.utils as utils  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ConfigError(MISSING_EXTRA) from error
  return densecrf, utils


def check_available() -> None:
  """Raises `ConfigError` (one line, naming the extra) when pydensecrf cannot be imported."""
  _pydensecrf()


def reference_image(tile: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 `[H, W, 3]` tile -> the uint8 `[H, W, 3]` image the reference's CRF sees.

  The reference normalises with albumentations (`A.Normalize`: a float32 table per channel,
  `(v - mean * 255) * (1 / (std * 255))`) and de-normalises in torch float32 before the CRF:
  `clamp((x * std + mean) * 255, 0, 255)` truncated to uint8. Both are per-channel functions of the uint8
  value, so they are applied here as one 256-entry lookup table per channel. `mean` / `std` in the
  channel order of `tile` (the model's input order).
  """
  if tile.dtype != np.uint8 or tile.ndim != 3 or tile.shape[-1] != 3:
    raise ValueError(f'expected a uint8 [H, W, 3] tile, got {tile.dtype} {tile.shape}')
  mean32 = np.asarray(mean, np.float32)
  std32 = np.asarray(std, np.float32)
  values = np.arange(256, dtype=np.float32)[:, None]                      # [256, 1]
  normalized = (values - mean32 * np.float32(255.0)) * np.reciprocal(std32 * np.float32(255.0))
  restored = (normalized * std32 + mean32) * np.float32(255.0)           # [256, 3] float32
  table = np.clip(restored, 0.0, 255.0).astype(np.uint8)                  # truncation, as `.byte()`
  return np.stack([table[tile[..., channel], channel] for channel in range(3)], axis=-1)


def refine(image: np.ndarray, probs: np.ndarray, params: CrfParams = CrfParams()) -> np.ndarray:
  """Dense CRF on one tile.

  Args:
    image: uint8 `[H, W, 3]`, the pixels of the bilateral term (see `reference_image`).
    probs: float32 `[H, W, K]` class probabilities (the softmax over [maps, background]).
    params: CRF settings.

  Returns:
    uint8 `[H, W]`, argmax of the CRF marginals over the K classes.
  """
  densecrf, utils = _pydensecrf()
  height, width = probs.shape[:2]
  if image.shape != (height, width, 3):
    raise ValueError(f'image {image.shape} does not match probabilities {probs.shape} (need [H, W, 3])')
  channels_first = np.moveaxis(np.asarray(probs, np.float32), -1, 0)    # [K, H, W]
  kept = np.flatnonzero(channels_first.sum(axis=(1, 2)) > 0)
  if kept.size == 0:
    raise ValueError('all class probabilities are zero: nothing for the CRF to refine')
  crf = densecrf.DenseCRF2D(width, height, kept.size)
  unary = utils.unary_from_softmax(channels_first[kept], clip=params.unary_clip)
  crf.setUnaryEnergy(np.ascontiguousarray(unary))
  crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
  crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                           rgbim=np.ascontiguousarray(image, np.uint8), compat=params.bilateral_compat)
  marginals = np.zeros(channels_first.shape, np.float32)
  marginals[kept] = np.asarray(crf.inference(params.iterations)).reshape(kept.size, height, width)
  return np.argmax(marginals, axis=0).astype(np.uint8)


def refine_batch(images: np.ndarray, probs: np.ndarray, params: CrfParams = CrfParams()) -> np.ndarray:
  """`[B, H, W, 3]` uint8, `[B, H, W, K]` -> `[B, H, W]` uint8, one tile after the other."""
  masks = [refine(image, prob, params) for image, prob in zip(images, probs)]
  return np.stack(masks) if masks else np.zeros(probs.shape[:3], np.uint8)


class CrfPool:
  """Dense CRF on host worker processes, overlapped with device work; results in submission order.

  Usage: `submit(images, probs)` each batch as soon as its probabilities are on the host (returns at
  once unless `max_pending` batches are already in flight), take finished batches with `ready()` (never
  blocks) while the device works on the next one, and `drain()` at the end. Every tile is one task, so
  the workers share a batch. `workers=0` refines in the calling process at `submit` (no pool).

  Workers are started with `spawn` (the parent typically holds JAX threads, which `fork` must not copy);
  each imports NumPy, pydensecrf and this module (and, as `spawn` does, the parent's `__main__` module).
  Tasks ship one tile each (~1 MB of float32 probabilities for 224 x 224 x 5), small beside the CRF.
  """

  def __init__(self, workers: int = 2, params: CrfParams = CrfParams(), max_pending: Optional[int] = None):
    check_available()
    if workers < 0:
      raise ConfigError(f'config.eval.crf_workers is {workers}; expected 0 (in process) or more')
    self.params = params
    self.workers = workers
    self.max_pending = max_pending if max_pending is not None else max(2, 2 * workers)
    self._pending: collections.deque = collections.deque()   # per batch: list of futures, or a result
    self._closed = False
    self._executor = (concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context('spawn')) if workers else None)

  def submit(self, images: np.ndarray, probs: np.ndarray) -> None:
    """Queues one batch: uint8 `[B, H, W, 3]` images and float32 `[B, H, W, K]` probabilities."""
    images = np.asarray(images)
    probs = np.asarray(probs, np.float32)
    if images.shape[:3] != probs.shape[:3]:
      raise ValueError(f'images {images.shape} and probabilities {probs.shape} differ in [B, H, W]')
    if self._closed:
      raise RuntimeError('CrfPool.submit after close()')
    if self._executor is None:
      self._pending.append(refine_batch(images, probs, self.params))
      return
    if not len(probs):
      self._pending.append(tuple(probs.shape[:3]))
      return
    while True:   # back-pressure: at most `max_pending` batches being refined
      busy = [entry for entry in self._pending
              if isinstance(entry, list) and not all(future.done() for future in entry)]
      if len(busy) < self.max_pending:
        break
      concurrent.futures.wait(busy[0])
    self._pending.append([self._executor.submit(refine, image, prob, self.params)
                          for image, prob in zip(images, probs)])

  @staticmethod
  def _collect(entry) -> np.ndarray:
    if isinstance(entry, tuple):   # an empty batch: its (0, H, W) shape
      return np.zeros(entry, np.uint8)
    if isinstance(entry, np.ndarray):
      return entry
    return np.stack([future.result() for future in entry])

  def ready(self) -> Iterator[np.ndarray]:
    """Yields `[B, H, W]` uint8 masks of the finished batches at the head of the queue, in order."""
    while self._pending and (not isinstance(self._pending[0], list)
                             or all(future.done() for future in self._pending[0])):
      yield self._collect(self._pending.popleft())

  def drain(self) -> Iterator[np.ndarray]:
    """Yields the masks of every batch still queued, in submission order (blocking)."""
    while self._pending:
      yield self._collect(self._pending.popleft())

  def close(self) -> None:
    """Stops the workers; batches not yet collected are dropped."""
    self._closed = True
    self._pending.clear()
    if self._executor is not None:
      self._executor.shutdown(wait=True, cancel_futures=True)
      self._executor = None

  def __enter__(self) -> 'CrfPool':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
