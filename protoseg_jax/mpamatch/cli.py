"""`protoseg_jax.main` modes for `config.method == 'mpamatch'`: train, eval, predict, export."""

from __future__ import annotations

import json
import os
from typing import Optional

import ml_collections

from protoseg_jax import metrics as metrics_lib, sharding
from protoseg_jax.mpamatch import data as data_lib, infer, trainer

MODES = ('train', 'eval', 'predict', 'export')


def run_train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  result = trainer.train_and_evaluate(config, workdir)
  if 'stopped_at_step' in result:
    print(f'stopped at step {result["stopped_at_step"]}; rerun the same command to resume')
    return result
  print(f'final {config.data.eval_split} metrics ({config.loss.variant}, step {result.get("step")}):')
  print(metrics_lib.format_metrics_table(result))
  print(f'mIoU (all classes) {100 * result["mIoU_all"]:.2f}' + (
      f'   image-wise Dice {100 * result["image_Dice"]:.2f}' if 'image_Dice' in result else ''))
  return result


def run_eval(config: ml_collections.ConfigDict, workdir: str, checkpoint: str, split: Optional[str]) -> dict:
  split = split or config.data.test_split
  _, probs_fn, meta = trainer.restore(config, workdir, checkpoint)
  splits, split_dict, _ = trainer.setup_data(config, workdir)
  images = infer.load_eval_images(data_lib.eval_pairs(splits, split_dict, split), config.data)
  result = infer.evaluate(probs_fn, images, config)
  result.update(split=split, checkpoint=checkpoint, step=meta.get('step'))
  print(f'{split} ({len(images)} images, checkpoint {checkpoint}, step {meta.get("step")}):')
  print(metrics_lib.format_metrics_table(result))
  print(f'mIoU (all classes) {100 * result["mIoU_all"]:.2f}')
  if sharding.is_primary():
    with open(os.path.join(workdir, f'eval_{split}.json'), 'w') as handle:
      json.dump(result, handle, indent=2)
  return result


def run_predict(config: ml_collections.ConfigDict, workdir: str, checkpoint: str) -> str:
  _, probs_fn, _ = trainer.restore(config, workdir, checkpoint)
  output_dir = config.predict.output_dir or os.path.join(workdir, 'predictions')
  count = infer.predict_folder(probs_fn, config, config.predict.input_dir, output_dir,
                               write=sharding.is_primary())
  print(f'wrote {count} masks and overlays to {output_dir}')
  return output_dir


def run_export(config: ml_collections.ConfigDict, workdir: str, checkpoint: str, out: Optional[str]) -> dict:
  from protoseg_jax.mpamatch import export

  model, params, batch_stats, meta, _, _ = trainer.restore_weights(config, workdir, checkpoint)
  params, batch_stats = sharding.host_copy(params), sharding.host_copy(batch_stats)
  if not sharding.is_primary():
    return {}
  paths = export.export(config, params, batch_stats, model.config, out or os.path.join(workdir, 'export'))
  print(f'exported checkpoint {checkpoint} (step {meta.get("step")}):')
  for kind, path in paths.items():
    print(f'{kind:>6}: {path}')
  return paths


def run(mode: str, config: ml_collections.ConfigDict, workdir: str, checkpoint: str = 'best',
        split: Optional[str] = None, out: Optional[str] = None):
  """Entry point called by `protoseg_jax.main` (errors are reported there as one line)."""
  if mode == 'train':
    return run_train(config, workdir)
  if mode == 'eval':
    return run_eval(config, workdir, checkpoint, split)
  if mode == 'predict':
    return run_predict(config, workdir, checkpoint)
  if mode == 'export':
    return run_export(config, workdir, checkpoint, out)
  raise ValueError(f'unknown mode {mode!r}: expected one of {MODES}')
