"""Trivial baselines on a val/test split, scored with the same metrics as the model.

  python -m protoseg_jax.baseline --config=configs/demo.py --workdir=/tmp/protoseg_demo --split=val

`first_present`: every pixel gets the first tissue class present in the tile's ground-truth label (the
same label the CAM gating uses), or background if none is present. Any segmentation method given the
image-level label should beat it.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from protoseg_jax import logs, metrics as metrics_lib
from protoseg_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file with get_config().',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir (the synthetic set lives under it).')
_SPLIT = flags.DEFINE_string('split', 'val', 'Split to score.')
flags.mark_flags_as_required(['config', 'workdir'])


def first_present_masks(labels: np.ndarray, height: int, width: int) -> np.ndarray:
  """`[N, C]` labels -> `[N, H, W]` masks filled with the first present class (C if none)."""
  num_classes = labels.shape[1]
  first = np.where(labels.any(axis=1), np.argmax(labels > 0, axis=1), num_classes)
  return np.broadcast_to(first[:, None, None], (len(labels), height, width))


def score(config, eval_set: pipeline.EvalSet, masks: np.ndarray) -> dict:
  num_values = len(config.data.class_names) + 1
  index = eval_set.masks.astype(np.int64).reshape(-1) * num_values + masks.astype(np.int64).reshape(-1)
  confusion = np.bincount(index, minlength=num_values ** 2).reshape(num_values, num_values)
  names = list(config.data.class_names) + [config.data.background_name]
  return metrics_lib.segmentation_metrics(confusion, names,
                                          len(config.data.class_names), config.eval.ignore_background)


def main(argv):
  del argv
  config = _CONFIG.value
  root = pipeline.resolve_root(config.data, _WORKDIR.value)
  eval_set = pipeline.load_eval_set(root, _SPLIT.value, len(config.data.class_names), config.data.image_size,
                                    config.data.decode_threads)
  height, width = eval_set.masks.shape[1:]
  result = score(config, eval_set, first_present_masks(eval_set.labels, height, width))
  print(f'first-present-class baseline, {_SPLIT.value} ({len(eval_set.names)} tiles):')
  print(metrics_lib.format_metrics_table(result))


if __name__ == '__main__':
  logs.quiet_library_info()
  app.run(main)
