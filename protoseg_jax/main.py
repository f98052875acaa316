"""Command line: `python -m protoseg_jax.main --config=configs/bcss.py --workdir=DIR --mode=train|eval|predict`.

Config values are overridden with `--config.train.batch_size=8`-style flags.
  train    trains, validating every epoch; resumable checkpoints and the best (by val mIoU) in DIR/checkpoints;
           rerunning the same command resumes from the newest complete checkpoint.
  eval     evaluates a checkpoint (`--checkpoint=best|last`) on `--split` (default config.data.test_split);
           prints the metrics table and writes DIR/eval_<split>.json.
  predict  writes palette masks and colour overlays for every tile of `config.predict.input_dir`.
  export   writes PyTorch safetensors named as the reference `ClsNetwork` and a timm trunk (`--out`).

`config.method = 'mpamatch'` configs (configs/glas_semi.py, configs/mpamatch_demo.py) run the same modes for
MPAMatch (protoseg_jax/mpamatch/cli.py): validation every `eval_every_steps`, best by val mDice, export with
TransUNet / timm names.
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
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'export'], 'What to run.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'best', 'Checkpoint for eval/predict/export: best or last.')
_OUT = flags.DEFINE_string('out', None, 'Output folder for --mode=export (default: DIR/export).')
_SPLIT = flags.DEFINE_string('split', None, 'Split for --mode=eval (default: config.data.test_split).')
flags.mark_flags_as_required(['config', 'workdir'])


class UserError(Exception):
  """An error in the user's input; printed as one line, without a traceback."""


def _trained_params(config, workdir: str, model, tokenizer, prompt_ids) -> dict:
  from protoseg_jax import trainer

  return trainer.trained_params(config, workdir, _CHECKPOINT.value, model, tokenizer, prompt_ids)[0]


def run_eval(config, workdir: str) -> dict:
  from protoseg_jax import metrics as metrics_lib, runtime, train
  from protoseg_jax.data import pipeline

  split = _SPLIT.value or config.data.test_split
  model, tokenizer, prompt_ids = runtime.model_and_prompts(config)
  params = _trained_params(config, workdir, model, tokenizer, prompt_ids)
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
  params = _trained_params(config, workdir, model, tokenizer, prompt_ids)
  output_dir = config.predict.output_dir or os.path.join(workdir, 'predictions')
  count = predict.predict_folder(config, model, params, prompt_ids, config.predict.input_dir, output_dir)
  print(f'wrote {count} masks and overlays to {output_dir}')
  return output_dir


def run_export(config, workdir: str) -> dict:
  from protoseg_jax import export, runtime

  model, tokenizer, prompt_ids = runtime.model_and_prompts(config)
  params = _trained_params(config, workdir, model, tokenizer, prompt_ids)
  paths = export.export(config, params, _OUT.value or os.path.join(workdir, 'export'))
  for kind, path in paths.items():
    print(f'{kind:>6}: {path}')
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config, workdir = _CONFIG.value, _WORKDIR.value
  from protoseg_jax import checkpoints, sharding
  from protoseg_jax.data import bcss

  if 'sharding' in config:
    sharding.initialize_distributed(config)  # before any other JAX call
  import jax

  os.makedirs(workdir, exist_ok=True)
  log_name = 'log' if jax.process_count() == 1 else f'log.process{jax.process_index()}'
  logging.get_absl_handler().use_absl_log_file(log_name, workdir)
  logging.set_stderrthreshold('info')
  py_logging.getLogger('absl').setLevel(py_logging.INFO)
  logging.get_absl_handler().addFilter(_quiet_library_info)

  try:
    method = config.get('method', 'dualprotoseg')
    if _MODE.value == 'train' and sharding.is_primary():
      with open(os.path.join(workdir, 'config.json'), 'w') as handle:
        handle.write(config.to_json_best_effort(indent=2))
    if method == 'mpamatch':
      from protoseg_jax.mpamatch import cli as mpamatch_cli

      mpamatch_cli.run(_MODE.value, config, workdir, checkpoint=_CHECKPOINT.value, split=_SPLIT.value,
                       out=_OUT.value)
    elif method != 'dualprotoseg':
      raise UserError(f"config.method must be 'dualprotoseg' or 'mpamatch', got {method!r}")
    elif _MODE.value == 'train':
      from protoseg_jax import metrics as metrics_lib, trainer

      result = trainer.train_and_evaluate(config, workdir)
      if 'stopped_at_step' in result:
        print(f'stopped at step {result["stopped_at_step"]}; rerun the same command to resume')
      else:
        print(f'final {config.data.eval_split} metrics:')
        print(metrics_lib.format_metrics_table(result))
    elif _MODE.value == 'eval':
      run_eval(config, workdir)
    elif _MODE.value == 'export':
      run_export(config, workdir)
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


def _quiet_library_info(record: py_logging.LogRecord) -> bool:
  """Drops Orbax's per-save INFO chatter from the console and log file (warnings and errors stay)."""
  return record.levelno >= py_logging.WARNING or '/orbax/' not in record.pathname


def _is_config_error(error: ValueError) -> bool:
  return 'config' in str(error)


if __name__ == '__main__':
  app.run(main)
