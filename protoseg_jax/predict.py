"""Masks for images of any size (`--mode=predict`): palette PNGs in the dataset's palette and colour overlays.

  python -m protoseg_jax.main --config=... --workdir=RUN --mode=predict --input=FOLDER|GLOB|FILE

Each image goes through the method's `scores_fn('predict')` in tiles of `config.data.image_size`
(sliding windows every `config.eval.stride` pixels, 0 = one tile apart, stitched by the mean), batched
across images to `config.eval.batch_size` and split over the mesh; every process computes, the primary
alone writes `<out>/masks/<stem>.png` and `<out>/overlays/<stem>.png`. Images are read on host threads
ahead of the device. (`config.predict.prototype_map`'s maps are written after these by the mode, with
`protoseg_jax.explaining.write_prototype_maps`.)
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from protoseg_jax import inference, prefetch
from protoseg_jax.data import images as images_lib
from protoseg_jax.errors import DatasetError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.bmp')


def expand_inputs(spec: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
  """A file, a folder (its images, sorted) or a glob -> the image paths; `DatasetError` naming `spec`."""
  if not spec:
    raise DatasetError('no input: pass --input=FOLDER|GLOB|FILE (or set config.predict.input_dir)')
  if os.path.isdir(spec):
    paths = sorted(p for p in glob.glob(os.path.join(spec, '*'))
                   if os.path.splitext(p)[1].lower() in extensions)
    if not paths:
      raise DatasetError(f'no images ({", ".join(e.lstrip(".") for e in extensions)}) in {spec}')
    return paths
  if os.path.isfile(spec):
    return [spec]
  paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
  if not paths:
    raise DatasetError(f'input not found: {spec} (no file, folder or glob match)')
  return paths


def write_outputs(output_dir: str, stem: str, image: np.ndarray, mask: np.ndarray, palette: np.ndarray,
                  alpha: float) -> None:
  images_lib.write_palette_png(os.path.join(output_dir, 'masks', stem + '.png'), mask, palette)
  Image.fromarray(images_lib.overlay(image, mask, palette, alpha=alpha)).save(
      os.path.join(output_dir, 'overlays', stem + '.png'))


def predict_paths(method, config, evaluator, params, extra, paths: Sequence[str], output_dir: str,
                  write: bool = True) -> int:
  """Writes a mask and an overlay per image (with `write`: the primary process); returns the count."""
  palette = method.palette
  if len(palette) != len(method.value_names):
    raise DatasetError(f'config.data.palette has {len(palette)} colours for {len(method.value_names)} values '
                       f'({", ".join(method.value_names)})')
  if write:
    os.makedirs(os.path.join(output_dir, 'masks'), exist_ok=True)
    os.makedirs(os.path.join(output_dir, 'overlays'), exist_ok=True)
  tile = config.data.image_size
  stride = config.eval.get('stride', 0) or tile
  labels = np.stack([method.image_labels(path) for path in paths])
  statics = evaluator.statics(params, extra)
  kept: dict[int, np.ndarray] = {}

  def load(path: str) -> np.ndarray:
    return images_lib.read_image(path)

  def images() -> Iterator[np.ndarray]:
    for index, image in enumerate(prefetch.prefetched(load, paths, config.data.get('decode_threads', 4))):
      kept[index] = image
      yield image

  scores_call = evaluator.scores_call(params, extra, statics)
  for index, scores in inference.stitched_scores(scores_call, images(), labels, tile, stride,
                                                 config.eval.batch_size):
    image = kept.pop(index)
    mask = np.argmax(scores, axis=-1).astype(np.uint8)
    if write:
      stem = os.path.splitext(os.path.basename(paths[index]))[0]
      write_outputs(output_dir, stem, image, mask, palette, config.predict.overlay_alpha)
  logging.info('predicted %d images', len(paths))
  return len(paths)
