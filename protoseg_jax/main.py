"""Command line: `python -m protoseg_jax.main --config=configs/bcss.py --workdir=DIR --mode=train|eval|predict`.

Config values are overridden with `--config.train.batch_size=8`-style flags.
  train    trains, validating every epoch; checkpoints `last` and `best` (by val mIoU) in DIR/checkpoints.
  eval     evaluates a checkpoint (`--checkpoint=best|last`) on `--split` (default config.data.test_split);
           prints the metrics table and writes DIR/eval_<split>.json.
  predict  writes palette masks and colour overlays for every tile of `config.predict.input_dir`.
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file with get_config().',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and outputs.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict'], 'What to run.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'best', 'Checkpoint name for eval/predict.')
_SPLIT = flags.DEFINE_string('split', None, 'Split for --mode=eval (default: config.data.test_split).')
flags.mark_flags_as_required(['config', 'workdir'])


class UserError(Exception):
  """An error in the user's input; printed as one line, without a traceback."""


def _load_trained_params(config, workdir: str, model, tokenizer, prompt_ids):
  import jax

  from protoseg_jax import builders, checkpoints, runtime

  params = runtime.initial_params(config, model, tokenizer, prompt_ids,
                                  jax.random.split(jax.random.key(config.seed))[0])
  trainable, frozen = builders.split_params(params)
  manager = checkpoints.ParamsCheckpoints(os.path.join(workdir, 'checkpoints'))
  if not manager.exists(_CHECKPOINT.value):
    raise UserError(f'no checkpoint {_CHECKPOINT.value!r} under {manager.directory}: train first '
                    f'(--mode=train with the same --workdir)')
  trainable, meta = manager.restore(_CHECKPOINT.value, trainable)
  fingerprint = runtime.frozen_fingerprint(params)
  saved = meta.get('frozen_fingerprint')
  if saved is not None and abs(saved - fingerprint) > 1e-6 * max(abs(saved), 1.0):
    raise UserError(f'checkpoint {_CHECKPOINT.value!r} was trained with different frozen towers '
                    f'(config.seed or config.backbone differ from the training run)')
  logging.info('restored checkpoint %r (step %s, val mIoU %s)', _CHECKPOINT.value, meta.get('step'),
               meta.get('mIoU'))
  return {**frozen, **trainable}


def run_eval(config, workdir: str) -> dict:
  from protoseg_jax import metrics as metrics_lib, runtime, train
  from protoseg_jax.data import pipeline

  split = _SPLIT.value or config.data.test_split
  model, tokenizer, prompt_ids = runtime.model_and_prompts(config)
  params = _load_trained_params(config, workdir, model, tokenizer, prompt_ids)
  root = pipeline.resolve_root(config.data, workdir)
  eval_set = pipeline.load_eval_set(root, split, model.config.num_classes, config.data.image_size,
                                    config.data.decode_threads)
  bank_fn, confusion_fn = train.make_eval_fns(model, config, prompt_ids)
  result = train.evaluate(params, eval_set, bank_fn, confusion_fn, config)
  result.update(split=split, checkpoint=_CHECKPOINT.value, tiles=len(eval_set.names))
  print(f'{split} ({len(eval_set.names)} tiles, checkpoint {_CHECKPOINT.value}):')
  print(metrics_lib.format_metrics_table(result))
  with open(os.path.join(workdir, f'eval_{split}.json'), 'w') as handle:
    json.dump(result, handle, indent=2)
  return result


def run_predict(config, workdir: str) -> str:
  from protoseg_jax import predict, runtime

  model, tokenizer, prompt_ids = runtime.model_and_prompts(config)
  params = _load_trained_params(config, workdir, model, tokenizer, prompt_ids)
  output_dir = config.predict.output_dir or os.path.join(workdir, 'predictions')
  count = predict.predict_folder(config, model, params, prompt_ids, config.predict.input_dir, output_dir)
  print(f'wrote {count} masks and overlays to {output_dir}')
  return output_dir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config, workdir = _CONFIG.value, _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  logging.get_absl_handler().use_absl_log_file('log', workdir)
  logging.set_stderrthreshold('info')
  py_logging.getLogger('absl').setLevel(py_logging.INFO)

  from protoseg_jax import checkpoints
  from protoseg_jax.data import bcss

  try:
    method = config.get('method', 'dualprotoseg')
    if method == 'mpamatch':
      from protoseg_jax.mpamatch import cli as mpamatch_cli

      mpamatch_cli.run(_MODE.value, config, workdir, checkpoint=_CHECKPOINT.value, split=_SPLIT.value)
    elif method != 'dualprotoseg':
      raise UserError(f"config.method must be 'dualprotoseg' or 'mpamatch', got {method!r}")
    elif _MODE.value == 'train':
      from protoseg_jax import metrics as metrics_lib, trainer

      with open(os.path.join(workdir, 'config.json'), 'w') as handle:
        handle.write(config.to_json_best_effort(indent=2))
      result = trainer.train_and_evaluate(config, workdir)
      print(f'final {config.data.eval_split} metrics:')
      print(metrics_lib.format_metrics_table(result))
    elif _MODE.value == 'eval':
      run_eval(config, workdir)
    else:
      run_predict(config, workdir)
  except (UserError, bcss.DatasetError, checkpoints.CheckpointError, FileNotFoundError,
          NotImplementedError, ValueError) as error:
    # Input problems are reported as one clear line; programming errors keep their traceback.
    if not isinstance(error, (UserError, bcss.DatasetError, checkpoints.CheckpointError,
                              FileNotFoundError, NotImplementedError)) and not _is_config_error(error):
      raise
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)


def _is_config_error(error: ValueError) -> bool:
  return 'config' in str(error)


if __name__ == '__main__':
  app.run(main)
