"""Command line of every method: `python -m protoseg_jax.main --config=CONFIG.py --workdir=DIR --mode=MODE`.

Config values are overridden with `--config.train.batch_size=8`-style flags; `config.method` picks the
method package (`protoseg_jax.registry`).
  train    trains, validating at the config's cadence; resumable checkpoints and the best (by
           config.eval.select_metric) in DIR/checkpoints; rerunning the same command resumes.
  eval     evaluates a checkpoint (`--checkpoint=best|last|STEP`) on `--split` (default
           config.data.test_split); prints the metrics table and writes DIR/eval_<split>.json.
  predict  writes palette masks and colour overlays for `--input` (a folder, glob or file; default
           config.predict.input_dir), images of any size.
  export   writes PyTorch-loadable files (`--out`, default DIR/export).
  slides   whole slides (`--input=SLIDE|FOLDER|GLOB`): DIR/slides/<stem>/{mask.tif, overlay.png,
           <stem>.geojson, summary.json} and DIR/slides/summary.csv (protoseg_jax/slides).
  query    free-text queries (`--text=PHRASE`, repeatable; `--input=TILES|SLIDES`): cosine maps of each phrase
           over the pixel features, heatmap overlays, a sheet comparing the phrases and query.json in
           DIR/query (`--out`); slides get thumbnail-resolution heatmaps (protoseg_jax/explaining.py).
  prototypes  the prototype page of `--split` (default train): DIR/prototypes/index.html with each
           prototype's best patches and how often it wins on config.data.eval_split (`--out`).

Exit codes (`protoseg_jax.errors`): 0 done; 2 bad input (one line naming the file, key or step); 3 the loss
became NaN/Inf; 4 a batch job finished but some inputs failed; 75 stopped by SIGTERM / SIGINT after saving
(rerun the same command to resume).
"""

from __future__ import annotations

import dataclasses
import json
import logging as py_logging
import os
import sys
from typing import Optional

from absl import app, flags, logging
from ml_collections import config_flags

from protoseg_jax import errors, logs

MODES = ('train', 'eval', 'predict', 'export', 'slides', 'query', 'prototypes')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file with get_config().',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and outputs.')
_MODE = flags.DEFINE_enum('mode', 'train', MODES, 'What to run.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'best',
                                  'Checkpoint for eval/predict/export: best, last, or a kept step number.')
_TEXT = flags.DEFINE_multi_string('text', None, '--mode=query: a phrase to look for (repeat the flag for '
                                  'several), e.g. --text="tumor necrosis" --text="comedo necrosis".')
_OUT = flags.DEFINE_string('out', None, 'Output folder (--mode=export: default DIR/export; --mode=predict: '
                           'default config.predict.output_dir or DIR/predictions).')
_SPLIT = flags.DEFINE_string('split', None, 'Split for --mode=eval (default: config.data.test_split) and '
                             '--mode=prototypes (default: train).')
_INPUT = flags.DEFINE_string('input', None, 'Images for --mode=predict, slides for --mode=slides, tiles or '
                             'slides for --mode=query: a folder, a glob or a file.')
_CRF = flags.DEFINE_boolean('crf', None, '--mode=eval: refine masks with the dense CRF (--nocrf: never); '
                            'default config.eval.crf.')


@dataclasses.dataclass(frozen=True)
class Options:
  """The mode flags (`--checkpoint`, `--split`, `--input`, `--out`, `--crf`, `--text`), so modes run without
  absl too."""

  checkpoint: str = 'best'
  split: Optional[str] = None
  input: Optional[str] = None
  out: Optional[str] = None
  crf: Optional[bool] = None
  texts: tuple[str, ...] = ()

  @classmethod
  def from_flags(cls) -> 'Options':
    return cls(checkpoint=_CHECKPOINT.value, split=_SPLIT.value, input=_INPUT.value, out=_OUT.value,
               crf=_CRF.value, texts=tuple(_TEXT.value or ()))


def _set_up_logging(workdir: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top

  log_name = 'log' if jax.process_count() == 1 else f'log.process{jax.process_index()}'
  logging.get_absl_handler().use_absl_log_file(log_name, workdir)
  logging.set_stderrthreshold('info')
  py_logging.getLogger('absl').setLevel(py_logging.INFO)


def _check_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f'--workdir={workdir} is a file, not a folder')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise errors.UserError(f'--workdir={workdir}: cannot create it ({error.strerror})') from None


def _write_json(path: str, value: dict) -> None:
  from protoseg_jax import sharding  # pylint: disable=g-import-not-at-top
  if sharding.is_primary():
    temporary = path + '.tmp'
    with open(temporary, 'w') as handle:
      json.dump(value, handle, indent=2)
    os.replace(temporary, path)


def run_train(method, config, workdir: str, options: Options) -> int:
  from protoseg_jax import sharding, trainer  # pylint: disable=g-import-not-at-top

  if sharding.is_primary():
    with open(os.path.join(workdir, 'config.json'), 'w') as handle:
      handle.write(config.to_json_best_effort(indent=2))
  del options
  result = trainer.train_and_evaluate(method, config, workdir)
  if 'stopped_at_step' in result:
    print(f'stopped at step {result["stopped_at_step"]} ({result.get("signal")}); a checkpoint was saved: '
          'rerun the same command to resume')
    return errors.EXIT_PREEMPTED
  print(f'final {config.data.eval_split} metrics (step {result.get("step")}):')
  print(method.format_metrics(result))
  if result.get('best_step') is not None:
    score = result.get('best_score')
    print(f'best checkpoint: step {result["best_step"]} ({config.data.eval_split} {result["select_metric"]} '
          f'{100 * score:.2f}); eval / predict / export use it unless --checkpoint=last|STEP'
          if score is not None else f'best checkpoint: step {result["best_step"]}')
  return errors.EXIT_OK


def _restore(method, config, workdir: str, options: Options):
  from protoseg_jax import trainer  # pylint: disable=g-import-not-at-top
  return trainer.restore_weights(method, config, workdir, trainer.parse_checkpoint_choice(options.checkpoint))


def _evaluator(method, config, mesh, shardings, context: str):
  from protoseg_jax import evaluation  # pylint: disable=g-import-not-at-top
  return evaluation.Evaluator(method, config, mesh, {**shardings.frozen, **shardings.trainable},
                              shardings.extra, context)


def _crf_pool(config, split: str, flag: Optional[bool]):
  """The dense-CRF pool when `--crf` / `config.eval.crf` asks for it on this split, else None."""
  mode = config.eval.get('crf', 'off')
  wanted = flag if flag is not None else (mode == 'always' or (mode == 'test' and
                                                               split == config.data.test_split))
  if mode not in ('off', 'test', 'always'):
    raise errors.ConfigError(f"config.eval.crf must be 'off', 'test' or 'always', got {mode!r}")
  if not wanted:
    return None
  from protoseg_jax import crf  # pylint: disable=g-import-not-at-top
  return crf.CrfPool(workers=config.eval.get('crf_workers', 2))


def run_eval(method, config, workdir: str, options: Options) -> int:
  import jax  # pylint: disable=g-import-not-at-top

  split = options.split or config.data.test_split
  crf_pool = _crf_pool(config, split, options.crf)  # a missing extra fails before anything is restored
  params, extra, meta, mesh, shardings = _restore(method, config, workdir, options)
  eval_set = method.eval_set(workdir, split, jax.process_index(), jax.process_count())
  evaluator = _evaluator(method, config, mesh, shardings, 'eval')
  try:
    result = evaluator.evaluate(params, extra, eval_set, crf_pool)
  finally:
    if crf_pool is not None:
      crf_pool.close()
  result.update(split=split, checkpoint=options.checkpoint, step=meta.get('step'), crf=crf_pool is not None)
  print(f'{split} ({eval_set.num_examples} examples, checkpoint {options.checkpoint} = step '
        f'{meta.get("step")}{", dense CRF" if crf_pool is not None else ""}):')
  print(method.format_metrics(result))
  _write_json(os.path.join(workdir, f'eval_{split}.json'), result)
  return errors.EXIT_OK


def run_predict(method, config, workdir: str, options: Options) -> int:
  from protoseg_jax import predict, sharding  # pylint: disable=g-import-not-at-top

  paths = predict.expand_inputs(options.input or config.predict.input_dir)
  params, extra, _, mesh, shardings = _restore(method, config, workdir, options)
  output_dir = options.out or config.predict.output_dir or os.path.join(workdir, 'predictions')
  evaluator = _evaluator(method, config, mesh, shardings, 'predict')
  count = predict.predict_paths(method, config, evaluator, params, extra, paths, output_dir,
                                write=sharding.is_primary())
  if config.predict.get('prototype_map', False):
    from protoseg_jax import explaining  # pylint: disable=g-import-not-at-top
    explaining.write_prototype_maps(method, config, evaluator, params, extra, paths, output_dir,
                                    write=sharding.is_primary())
  print(f'wrote {count} masks and overlays to {output_dir}')
  return errors.EXIT_OK


def run_export(method, config, workdir: str, options: Options) -> int:
  from protoseg_jax import exporting  # pylint: disable=g-import-not-at-top

  params, extra, meta, _, _ = _restore(method, config, workdir, options)
  paths = exporting.export(method, params, extra, options.out or os.path.join(workdir, 'export'))
  if paths:
    print(f'exported checkpoint {options.checkpoint} (step {meta.get("step")}):')
    for kind, path in paths.items():
      print(f'{kind:>6}: {path}')
  return errors.EXIT_OK


def run_slides(method, config, workdir: str, options: Options) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from protoseg_jax import evaluation, sharding, slides  # pylint: disable=g-import-not-at-top

  if not config.data.mpp > 0:
    raise errors.ConfigError(f'config.data.mpp={config.data.mpp}: the µm/px this model works at is not '
                             'known for this dataset; set --config.data.mpp (slides are read at that '
                             'resolution)')
  inputs = slides.expand_inputs(options.input or '')
  params, extra, meta, mesh, shardings = _restore(method, config, workdir, options)
  param_shardings, extra_shardings = {**shardings.frozen, **shardings.trainable}, shardings.extra
  if jax.process_count() > 1:
    # Processes work on different slides, so each runs the model on its own devices (a local mesh).
    mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}, jax.local_devices())
    local = sharding.replicated(mesh)
    params, extra = sharding.host_copy(params), sharding.host_copy(extra)
    param_shardings = jax.tree.map(lambda _: local, params)
    extra_shardings = jax.tree.map(lambda _: local, extra)
    params, extra = sharding.place_tree(params, param_shardings), sharding.place_tree(extra, extra_shardings)
  evaluator = evaluation.Evaluator(method, config, mesh, param_shardings, extra_shardings, 'slides')
  scores_call = evaluator.scores_call(params, extra, evaluator.statics(params, extra))
  unknown = np.full((config.eval.batch_size, method.num_label_classes), -1, np.int32)
  out_root = options.out or os.path.join(workdir, 'slides')
  report = slides.run_slides(
      inputs, lambda tiles: scores_call(tiles, unknown[:len(tiles)]), config_slides=config.slides,
      class_names=method.value_names, palette=method.palette, background_value=method.background_value,
      model_mpp=config.data.mpp, tile_size=config.data.image_size, batch_size=config.eval.batch_size,
      out_root=out_root, process_index=jax.process_index(), process_count=jax.process_count())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('protoseg_slides_done')
    if sharding.is_primary():
      slides.write_summary_csv(out_root)
  print(f'slides (checkpoint {options.checkpoint} = step {meta.get("step")}): {len(report.done)} done, '
        f'{len(report.skipped)} already complete, {len(report.failed)} failed -> {out_root}')
  for path, message in report.failed:
    print(f'failed: {path}: {message}', file=sys.stderr)
  return report.exit_code


def run_query(method, config, workdir: str, options: Options) -> int:
  from protoseg_jax import explaining, sharding  # pylint: disable=g-import-not-at-top

  request = explaining.prepare_query(method, config, options.texts)  # phrase errors before any restore
  images, slides = explaining.query_inputs(options.input or '', config.query.input_kind)
  params, extra, meta, mesh, shardings = _restore(method, config, workdir, options)
  out_dir = options.out or config.query.output_dir or os.path.join(workdir, 'query')
  evaluator = _evaluator(method, config, mesh, shardings, 'predict')
  summary = explaining.run_query(method, config, evaluator, params, extra, request, images, slides, out_dir,
                                 {'checkpoint': options.checkpoint, 'step': meta.get('step')},
                                 write=sharding.is_primary())
  print(f'query of {len(request.phrases)} phrase(s) (checkpoint {options.checkpoint} = step '
        f'{meta.get("step")}): {summary["images"]} image(s), {len(summary["slides"])} slide(s) -> {out_dir}')
  return errors.EXIT_OK


def run_prototypes(method, config, workdir: str, options: Options) -> int:
  from protoseg_jax import explaining, sharding  # pylint: disable=g-import-not-at-top

  method.prototype_infos()   # a method without prototypes fails before anything is restored
  split = options.split or 'train'
  params, extra, meta, mesh, shardings = _restore(method, config, workdir, options)
  out_dir = options.out or config.explain.output_dir or os.path.join(workdir, 'prototypes')
  evaluator = _evaluator(method, config, mesh, shardings, 'eval')
  path = explaining.run_prototypes(method, config, workdir, evaluator, params, extra, split, out_dir,
                                   {'checkpoint': options.checkpoint, 'step': meta.get('step')},
                                   write=sharding.is_primary())
  print(f'prototypes of {split} (checkpoint {options.checkpoint} = step {meta.get("step")}): {path}')
  return errors.EXIT_OK


RUNNERS = {'train': run_train, 'eval': run_eval, 'predict': run_predict, 'export': run_export,
           'slides': run_slides, 'query': run_query, 'prototypes': run_prototypes}


def run(config, workdir: str, mode: str, options: Options = Options()) -> int:
  """Builds the method and runs `mode`; returns the exit code (errors propagate)."""
  if config is None:
    raise errors.ConfigError('--config is required: a config file with get_config(), e.g. configs/demo.py')
  if mode not in RUNNERS:
    raise errors.ConfigError(f'--mode must be one of {", ".join(RUNNERS)}, got {mode!r}')
  from protoseg_jax import config_base, registry, sharding  # pylint: disable=g-import-not-at-top

  _check_workdir(workdir)
  method_class = registry.get(config.get('method', ''))
  config_base.check_config(config, method_class.default_config())
  if 'sharding' in config:
    sharding.initialize_distributed(config)  # before any other JAX call
  _set_up_logging(workdir)
  method = method_class(config)
  return RUNNERS[mode](method, config, workdir, options)


def _is_config_error(error: BaseException) -> bool:
  return isinstance(error, ValueError) and 'config.' in str(error)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    code = run(_CONFIG.value, _WORKDIR.value, _MODE.value, Options.from_flags())
  except errors.NonFiniteLossError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(errors.EXIT_NONFINITE)
  except (errors.UserError, FileNotFoundError, ValueError) as error:
    # Input problems are reported as one clear line; programming errors keep their traceback.
    if not isinstance(error, (errors.UserError, FileNotFoundError)) and not _is_config_error(error):
      raise
    print(f'error: {error}', file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)
  sys.exit(code)


def _config_file(argv) -> Optional[str]:
  for index, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and index + 1 < len(argv):
      return argv[index + 1]
  return None


def _unknown_override(argv) -> Optional[str]:
  """The first `--config.a.b=...` override naming no key of the config file's config, as a message."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  from protoseg_jax import config_base  # pylint: disable=g-import-not-at-top

  path = _config_file(argv)
  if not path:
    return None
  file_name, _, argument = path.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('_protoseg_user_config', file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(argument) if argument else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None
  known = config_base.flatten(config)
  for arg in argv:
    if arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if key not in known and not any(name.startswith(key + '.') for name in known):
        close = config_base._closest(key, known)  # pylint: disable=protected-access
        hint = f'; did you mean config.{close}?' if close else ''
        return f'unknown config key config.{key} (in {arg}){hint}'
  return None


def parse_flags(argv):
  """absl's flag parsing, with every problem (a missing config file, an unknown or mistyped override, a bad
  flag) reported as one line and exit code 2 instead of a traceback."""
  try:
    remaining = flags.FLAGS(argv)
  except flags.Error as error:
    message = _unknown_override(argv) or str(error).splitlines()[0]
    print(f'error: {message}', file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)
  except Exception as error:  # pylint: disable=broad-except  (ml_collections raises plain exceptions)
    message = _unknown_override(argv) or f'bad --config override: {str(error).splitlines()[0]}'
    print(f'error: {message}', file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)
  for name in ('config', 'workdir'):
    if flags.FLAGS[name].value is None and not flags.FLAGS[name].present:
      print(f'error: --{name} is required', file=sys.stderr)
      sys.exit(errors.EXIT_USER_ERROR)
  try:
    flags.FLAGS['config'].value  # pylint: disable=pointless-statement
    config = _CONFIG.value
    config.get('method')
  except OSError:
    print(f'error: --config={_config_file(argv)}: config file not found or not loadable (a Python file with '
          'get_config())', file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)
  return remaining


def entry_point():
  logs.quiet_library_info()  # before the flags: loading a config may already start JAX
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  entry_point()
