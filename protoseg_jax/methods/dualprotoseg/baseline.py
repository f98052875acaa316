"""Trivial baseline on a val/test split, scored by the method's own metrics (the same table as `--mode=eval`).

  python -m protoseg_jax.methods.dualprotoseg.baseline --config=configs/demo.py --workdir=/tmp/protoseg_demo \
      --split=val

`first_present`: every pixel gets the first tissue class present in the tile's ground-truth label (the
same label the CAM gating uses), or background if none is present. Any segmentation method given the
image-level label should beat it.
"""

from __future__ import annotations

import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from protoseg_jax import errors, evaluation, logs, registry
from protoseg_jax.method import EvalSet, Method


def first_present_mask(label: np.ndarray, height: int, width: int) -> np.ndarray:
  """`[C]` image-level label (> 0 = present) -> `[H, W]` uint8 mask of the first present class (C if none)."""
  present = np.flatnonzero(np.asarray(label) > 0)
  value = present[0] if present.size else len(label)
  return np.full((height, width), value, np.uint8)


def first_present_metrics(method: Method, eval_set: EvalSet) -> dict:
  """The method's metrics of the first-present-class masks over `eval_set` (pixels of mask value 255 and
  other values outside the method's classes are not scored, as in evaluation)."""
  num_values = len(method.value_names)
  per_image = np.stack([
      evaluation.host_confusion(mask, first_present_mask(label, *np.shape(mask)), num_values)
      for mask, label in zip(eval_set.masks, eval_set.labels)])
  return method.summarize(per_image.sum(axis=0), per_image)


def _define_flags() -> dict:
  """The CLI's flags, defined only when run as a program (the module is also imported as a library)."""
  cli = {
      'config': config_flags.DEFINE_config_file('config', None, 'Config file with get_config().',
                                                lock_config=True),
      'workdir': flags.DEFINE_string('workdir', None, 'Workdir (a configured synthetic set lives under it).'),
      'split': flags.DEFINE_string('split', 'val', 'Split to score.'),
  }
  flags.mark_flags_as_required(['config', 'workdir'])
  return cli


def main(argv, cli: dict) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config, split = cli['config'].value, cli['split'].value
  try:
    method = registry.build(config)
    eval_set = method.eval_set(cli['workdir'].value, split, 0, 1)
    if not len(eval_set.masks):
      raise errors.DatasetError(f'split {split!r} has no tiles')
    if np.any(np.asarray(eval_set.labels) < 0):
      method_name = config.get('method', '')
      raise errors.DatasetError(f'split {split!r} of method {method_name!r} has no image-level labels: the '
                                'first-present-class baseline needs them')
    result = first_present_metrics(method, eval_set)
  except (errors.UserError, FileNotFoundError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)
  print(f'first-present-class baseline, {split} ({len(eval_set.names)} tiles):')
  print(method.format_metrics(result))


if __name__ == '__main__':
  logs.quiet_library_info()
  _CLI = _define_flags()
  app.run(lambda argv: main(argv, _CLI))
