"""The config schema every method shares, and the checks that turn a bad config into one line.

A method's default config (`protoseg_jax/methods/<name>/config.py: get_config()`) starts from
`base_config(name)` — training length and cadence, checkpoints, mesh, sharding rules, evaluation / predict
/ slides / query outputs, logging — and adds its own blocks (data, model, loss, ...). Experiment files in
`configs/` start from a method's default config and change what differs. The method's default config is
also the schema: `check_config` refuses keys it does not have, naming them.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import ml_collections

from protoseg_jax.errors import ConfigError
from protoseg_jax.slides import config as slides_config

# Keys that may differ between a checkpointed run and its resumption without changing what is computed
# (paths, parallelism, logging, outputs); any other difference is refused unless
# config.checkpoint.allow_config_change is set. Prefix match on the dotted key.
RESUMABLE_CHANGES = (
    'data.root', 'data.decode_threads', 'data.prefetch_batches', 'data.grain.', 'data.cache_in_memory',
    'data.split_file', 'data.mpp', 'data.palette', 'backbone.path', 'backbone.text_path', 'tokenizer.path',
    'train.log_every_steps', 'train.max_steps', 'checkpoint.', 'mesh.', 'sharding.', 'logging.',
    'eval.batch_size', 'eval.crf', 'predict.', 'slides.', 'query.', 'explain.',
)


def default_logical_rules() -> tuple:
  """Logical axis name -> mesh axis (or axes, or None = replicated), in priority order (MaxText style).

  A rule applies to a dimension only if its mesh axes are still free in that array and divide the size
  (else that dimension is replicated, logged). Parameter names: `sharding.TOWER_PARAM_AXES` and each
  method's `param_axes()`.
  """
  return (
      # activations
      ('batch', ('data', 'fsdp')),
      ('act_heads', 'tensor'),
      ('act_mlp', 'tensor'),
      ('act_embed', None),
      ('act_channels', None),
      ('length', None),
      ('prompts', None),
      # parameters: tensor parallelism splits the wide side of each matrix / conv outputs ...
      ('qkv', 'tensor'),
      ('heads', 'tensor'),
      ('mlp', 'tensor'),
      ('conv_out', 'tensor'),
      # ... FSDP the model width, conv inputs and the prototype space
      ('embed', 'fsdp'),
      ('conv_in', 'fsdp'),
      ('feature', 'fsdp'),
      # fallback: a width not split otherwise (token / position tables, prompt context) goes over tensor
      ('embed', 'tensor'),
      ('vocab', None),
      ('position', None),
      ('joint', None),
      ('prototypes', None),
      ('classes', None),
      ('context', None),
      ('vector', None),
  )


def base_config(method: str) -> ml_collections.ConfigDict:
  """The blocks every method has, with their defaults; a method's `get_config()` adds the rest."""
  config = ml_collections.ConfigDict()
  config.method = method
  config.seed = 0

  # --- training length, cadence, precision (the method adds batch sizes and optimizer values) ------
  config.train = ml_collections.ConfigDict()
  config.train.epochs = 0                  # > 0: train this many epochs (methods with epochs)
  config.train.steps = 0                   # > 0: train this many steps (exactly one of epochs / steps)
  config.train.max_steps = -1              # > 0: stop after this many steps (smoke runs, benchmarks)
  config.train.eval_every_epochs = 0       # validate every N epochs ...
  config.train.eval_every_steps = 0        # ... or every N steps (0 and 0: only after the last step)
  config.train.log_every_steps = 50
  config.train.compute_dtype = 'auto'      # 'auto' = bfloat16 matmuls on GPU/TPU, float32 on CPU

  # --- checkpoints (protoseg_jax/checkpoints.py) ---------------------------------------------------
  # <workdir>/checkpoints/steps/<step>: train state + data iterator state, every `every_steps`, at each
  # validation and on preemption (SIGTERM / SIGINT); the last `keep` are kept.
  # <workdir>/checkpoints/best/<step>: the weights of the best `config.eval.select_metric`.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 1000
  config.checkpoint.keep = 3
  config.checkpoint.async_save = True      # write in the background while training continues
  config.checkpoint.resume = True          # False = refuse to start when the workdir holds checkpoints
  config.checkpoint.allow_config_change = False  # True = resume although run-defining keys changed

  # --- device mesh (protoseg_jax/sharding/) --------------------------------------------------------
  # Axis sizes; -1 = the devices that remain. The batch is split over data x fsdp; fsdp also splits the
  # parameters and optimizer state; tensor splits heads / MLP / conv output channels.
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1, 'tensor': 1})
  config.sharding = ml_collections.ConfigDict()
  config.sharding.logical_rules = default_logical_rules()
  # 'auto': jax.distributed.initialize() when the environment names several processes (coordinator
  # address, SLURM / Open MPI tasks, TPU worker list); 'on': always (multi-host TPU VMs); 'off': never.
  config.sharding.distributed = 'auto'
  config.sharding.coordinator_address = ''  # explicit multi-node set-up ('' = auto-detect)
  config.sharding.num_processes = -1
  config.sharding.process_id = -1

  # --- evaluation ----------------------------------------------------------------------------------
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 32              # tiles / windows per device call (global)
  config.eval.select_metric = 'mIoU'       # checkpoint 'best' maximises this validation figure
  config.eval.stride = 0                   # sliding-window stride for images larger than a tile (0 = tile)

  # --- predict (folders / globs of images of any size) ---------------------------------------------
  config.predict = ml_collections.ConfigDict()
  config.predict.input_dir = ''            # or --input=FOLDER|GLOB|FILE
  config.predict.output_dir = ''           # '' = <workdir>/predictions
  config.predict.overlay_alpha = 0.5
  # Also write <out>/prototype_maps/<stem>.png (palette index = the winning prototype of the pixel's predicted
  # class, 255 = background) + prototype_legend.{png,json}; images larger than a tile: windows pasted.
  config.predict.prototype_map = False

  # --- free-text queries (--mode=query --text=... --input=TILES|SLIDES; protoseg_jax/explaining.py) ------
  config.query = ml_collections.ConfigDict()
  config.query.template = ''               # e.g. 'a histopathology image of {}'; '' = the phrase as typed
  # Learned context in front of a free phrase: 'init' (the method's initial context), 'mean' (the mean of
  # the classes' learned contexts) or a class name (that class's learned context).
  config.query.context = 'init'
  config.query.level = 1                   # 1-based feature level (the method's config says which exist)
  config.query.threshold = 0.5             # query.json: fraction of tissue with cosine above this
  config.query.batch_size = 0              # tiles per device call (0 = config.eval.batch_size)
  config.query.input_kind = 'auto'         # 'auto' (whole-slide files by extension / tiled TIFF) | 'tiles'
  #                                          | 'slides'
  config.query.alpha = 0.6                 # heatmap opacity over the tissue
  config.query.output_dir = ''             # '' = <workdir>/query (or --out)

  # --- prototype explanations (--mode=prototypes; protoseg_jax/explaining.py) -----------------------
  config.explain = ml_collections.ConfigDict()
  config.explain.top_k = 6                 # best patches kept per prototype (at most one per tile)
  config.explain.level = 1                 # 1-based feature level of the patch similarity
  config.explain.crop_size = 64            # patch crop side in tile pixels (at most the tile)
  config.explain.display_size = 96         # on-page side of a crop in CSS pixels
  config.explain.wins = True               # count each prototype's wins over config.data.eval_split
  config.explain.output_dir = ''           # '' = <workdir>/prototypes (or --out)

  # --- whole slides (--mode=slides; protoseg_jax/slides/config.py documents every key) ----------------
  config.slides = slides_config.slides_config()

  # --- logging -------------------------------------------------------------------------------------
  config.logging = ml_collections.ConfigDict()
  config.logging.tensorboard = True        # <workdir>/tensorboard event files (next to the JSONL logs)
  return config


def flatten(config: Any, prefix: str = '') -> dict[str, Any]:
  """`{'train.epochs': 20, ...}` of a ConfigDict / dict tree (tuples and lists kept as values)."""
  items = config.items() if hasattr(config, 'items') else []
  out = {}
  for key, value in items:
    name = f'{prefix}{key}'
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def check_config(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict) -> None:
  """Refuses keys the schema (the method's default config) does not have, and impossible lengths; each a
  one-line `ConfigError` naming the key."""
  have, known = flatten(config), flatten(schema)
  for key in sorted(have):
    if key not in known:
      close = _closest(key, known)
      raise ConfigError(f'unknown config key config.{key}'
                        + (f' (did you mean config.{close}?)' if close else ''))
  train = config.train
  epochs, steps = int(train.get('epochs', 0)), int(train.get('steps', 0))
  for key, value in (('train.epochs', epochs), ('train.steps', steps)):
    if value < 0:
      raise ConfigError(f'config.{key}={value} must be positive')
  if (epochs > 0) == (steps > 0):
    raise ConfigError(f'set exactly one of config.train.epochs ({epochs}) and config.train.steps ({steps}) '
                      'to a positive number')
  for key in ('train.log_every_steps', 'checkpoint.every_steps', 'checkpoint.keep', 'eval.batch_size'):
    value = have.get(key)
    if value is not None and int(value) <= 0:
      raise ConfigError(f'config.{key}={value} must be positive')


def _closest(key: str, known: Iterable[str]) -> str:
  import difflib  # pylint: disable=g-import-not-at-top
  matches = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
  return matches[0] if matches else ''


def run_defining_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """Dotted keys whose values differ between two flattened configs, except `RESUMABLE_CHANGES`."""
  changed = []
  for key in sorted(set(saved) | set(current)):
    if key.startswith(RESUMABLE_CHANGES) or key in RESUMABLE_CHANGES:
      continue
    old, new = _comparable(saved.get(key)), _comparable(current.get(key))
    if old != new:
      changed.append(f'config.{key}: {old!r} -> {new!r}')
  return changed


def _comparable(value: Any) -> Any:
  if isinstance(value, (list, tuple)):
    return tuple(_comparable(v) for v in value)
  return value


def to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The flattened config with JSON-safe values (tuples -> lists), for checkpoint meta."""
  def plain(value):
    if isinstance(value, (list, tuple)):
      return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
      return value
    return repr(value)
  return {key: plain(value) for key, value in flatten(config).items()}


def dataclass_from_config(cls, config: Any, where: str, **extra):
  """Builds the dataclass `cls` from a ConfigDict block, naming any key it does not have (`where.key`)."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  fields = {field.name for field in dataclasses.fields(cls)}
  values = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ConfigError(f'unknown config key(s) {", ".join(where + "." + key for key in unknown)}; '
                      f'known: {", ".join(sorted(fields))}')
  for key, value in values.items():
    if isinstance(value, list):
      values[key] = tuple(value)
  return cls(**values, **extra)


def compute_dtype(name: str):
  """`config.train.compute_dtype` -> a dtype: 'auto' = bfloat16 on GPU/TPU, float32 on CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  if name == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  if name in ('float32', 'bfloat16', 'float16'):
    return jnp.dtype(name)
  raise ConfigError(f"config.train.compute_dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
