"""Device meshes, logical-axis sharding rules, and sharded placement of the train state and batches.

One config runs on 1 GPU, an 8-chip TPU VM or a multi-host pod slice; only `config.mesh` changes.

* The mesh has three axes, `('data', 'fsdp', 'tensor')` (`config.mesh`, -1 = the devices that remain).
  The batch is split over `('data', 'fsdp')`; `fsdp` also splits parameters (ZeRO-3 style); `tensor`
  splits attention heads, MLP hidden units and convolution output channels (Megatron style).
* Every parameter gets *logical* axis names by path pattern (`TOWER_PARAM_AXES` for the shared towers plus
  the method's `param_axes()`), and
  `config.sharding.logical_rules` maps logical names to mesh axes (MaxText / T5X style). Parameters stay
  plain dicts: the names live here, not in boxed parameters.
* A dimension is only split if the mesh axes divide it; otherwise it is replicated (logged once per
  parameter), so odd test sizes still run. Mesh axes of size 1 are dropped from the specs.
* Activations are constrained through `with_logical_constraint` (used by the models), a no-op unless a
  step is traced inside `activation_sharding(mesh, rules)`.

Shapes in this module are global (the whole batch / the whole parameter), per-device shapes are named so.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import math
import os
import re
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

AnyMesh = Mesh | AbstractMesh
Rules = Sequence[tuple[str, Any]]

# Logical names of the shared towers' parameters (ViT trunk, text tower, prompt learner, norms anywhere), by
# path ('/'-joined) pattern; each method adds its own table (`Method.param_axes()`), searched first. The
# first match wins and its entry must have the parameter's rank. Layouts: Dense kernels `[in, out]`, Conv
# kernels `[kh, kw, in, out]`. Names used: embed (transformer width), qkv (fused q|k|v output, 3*width),
# heads (attention output, heads*head_dim), mlp (MLP hidden), vocab, position, joint (text embedding, CLIP
# space), feature (prototype space F), prototypes, classes, context, conv_in / conv_out (conv channels),
# vector (1-D scales and biases that stay replicated). `None` = a dimension never split.
TOWER_PARAM_AXES: tuple[tuple[str, tuple], ...] = (
    # norms and layer scales anywhere (LayerNorm, GroupNorm, BatchNorm: scale, bias; LayerScale: gamma)
    (r'(^|/)[^/]*(norm|ln_)[^/]*/(scale|bias)$', ('vector',)),
    (r'(^|/)bn/(scale|bias)$', ('vector',)),
    (r'(^|/)ls\d+/gamma$', ('vector',)),
    # transformer blocks: ViT (timm names) and text tower (open_clip names)
    (r'(^|/)attn/(qkv|in_proj)/kernel$', ('embed', 'qkv')),
    (r'(^|/)attn/(qkv|in_proj)/bias$', ('qkv',)),
    (r'(^|/)attn/(proj|out_proj)/kernel$', ('heads', 'embed')),
    (r'(^|/)attn/(proj|out_proj)/bias$', ('vector',)),
    (r'(^|/)(mlp/fc1|c_fc)/kernel$', ('embed', 'mlp')),
    (r'(^|/)(mlp/fc1|c_fc)/bias$', ('mlp',)),
    (r'(^|/)(mlp/fc2|c_proj)/kernel$', ('mlp', 'embed')),
    (r'(^|/)(mlp/fc2|c_proj)/bias$', ('vector',)),
    # ViT stem
    (r'(^|/)patch_embed/kernel$', (None, None, None, 'embed')),
    (r'(^|/)patch_embed/bias$', ('vector',)),
    (r'(^|/)pos_embed$', (None, 'position', 'embed')),
    (r'(^|/)cls_token$', (None, None, 'embed')),
    # text tower ends and the prompt learner
    (r'(^|/)token_embedding/embedding$', ('vocab', 'embed')),
    (r'(^|/)positional_embedding$', ('position', 'embed')),
    (r'(^|/)text_projection$', ('embed', 'joint')),
    (r'(^|/)prompt_learner/ctx$', ('classes', 'context', 'embed')),
)
AxesTable = Sequence[tuple[str, tuple]]


def default_rules() -> tuple[tuple[str, Any], ...]:
  """The shared rules table (`config.sharding.logical_rules`), for callers without a config."""
  from protoseg_jax import config_base  # pylint: disable=g-import-not-at-top
  return check_rules(config_base.default_logical_rules())


_ACTIVATION_SHARDING: contextvars.ContextVar = contextvars.ContextVar('protoseg_activation_sharding',
                                                                      default=None)


# --- mesh ------------------------------------------------------------------------------------------------

def mesh_shape(mesh_config: Mapping[str, int], device_count: int) -> dict[str, int]:
  """`config.mesh` (`{'data': -1, 'fsdp': 1, 'tensor': 1}`) -> axis sizes whose product is `device_count`."""
  values = dict(mesh_config.items())
  unknown = sorted(set(values) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'unknown config.mesh axis(es) {unknown}; the mesh axes are {list(MESH_AXES)}')
  sizes = {axis: int(values.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1 or any(size == 0 or size < -1 for size in sizes.values()):
    raise ValueError(f'config.mesh={sizes}: sizes must be positive, with at most one -1 (= the devices '
                     f'that remain)')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if device_count % fixed:
      raise ValueError(f'config.mesh={sizes}: {device_count} devices are not divisible by the fixed axes '
                       f'(product {fixed})')
    sizes[free[0]] = device_count // fixed
  if math.prod(sizes.values()) != device_count:
    raise ValueError(f'config.mesh={sizes} needs {math.prod(sizes.values())} devices but there are '
                     f'{device_count}; set config.mesh so that the product of the axis sizes matches '
                     f'(one axis may be -1)')
  return sizes


def make_mesh(mesh_config: Mapping[str, int], devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A `('data', 'fsdp', 'tensor')` mesh over `devices` (default: all devices of all processes).

  Axes are `Auto` (the compiler propagates shardings between the constraints we set).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def abstract_mesh(sizes: Sequence[int]) -> AbstractMesh:
  """A device-free mesh of the given `(data, fsdp, tensor)` sizes, for shape arithmetic (memory tables)."""
  return AbstractMesh(tuple(int(s) for s in sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _axis_sizes(mesh: AnyMesh) -> dict[str, int]:
  return dict(mesh.shape)


def replicated(mesh: AnyMesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# --- rules -----------------------------------------------------------------------------------------------

def check_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
  """Validates a logical rules table and returns it as a tuple of `(name, None | axis | (axes...))`."""
  checked = []
  for entry in rules:
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
      raise ValueError(f'config.sharding.logical_rules: entry {entry!r} is not (logical_name, mesh_axes)')
    name, axes = entry
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    bad = [axis for axis in names if axis not in MESH_AXES]
    if bad:
      raise ValueError(f'config.sharding.logical_rules: {name!r} -> {axes!r} names unknown mesh axes {bad}; '
                       f'the mesh axes are {list(MESH_AXES)}')
    checked.append((name, None if axes is None else axes if isinstance(axes, str) else tuple(axes)))
  return tuple(checked)


def logical_to_spec(logical_axes: Sequence[Optional[str]], shape: Sequence[int], mesh: AnyMesh,
                    rules: Rules) -> tuple[PartitionSpec, list[str]]:
  """Logical names of an array's dimensions -> (PartitionSpec on `mesh`, notes on replicated fallbacks).

  Rules are applied in order: `(name, axes)` assigns `axes` to the dimension called `name` if that
  dimension is still unassigned, none of `axes` is used by another dimension, and the product of their
  sizes divides the dimension. Size-1 mesh axes are dropped. A rule refused for divisibility leaves a note.
  """
  if len(logical_axes) != len(shape):
    raise ValueError(f'{len(logical_axes)} logical axes {tuple(logical_axes)} for an array of shape '
                     f'{tuple(shape)}')
  sizes = _axis_sizes(mesh)
  assigned: list[Any] = [None] * len(shape)
  used: set[str] = set()
  notes = []
  for name, axes in rules:
    if name not in logical_axes or axes is None:
      continue
    dim = list(logical_axes).index(name)
    wanted = (axes,) if isinstance(axes, str) else tuple(axes)
    wanted = tuple(axis for axis in wanted if sizes.get(axis, 1) > 1)
    if assigned[dim] is not None or not wanted or used & set(wanted):
      continue
    ways = math.prod(sizes[axis] for axis in wanted)
    if shape[dim] % ways:
      notes.append(f'{name} ({shape[dim]}) not divisible by {"x".join(wanted)} ({ways}): replicated')
      continue
    assigned[dim] = wanted[0] if len(wanted) == 1 else wanted
    used.update(wanted)
  while assigned and assigned[-1] is None:
    assigned.pop()
  return PartitionSpec(*assigned), notes


def path_name(path) -> str:
  """A pytree key path as 'a/b/0' (the form `TOWER_PARAM_AXES` patterns match)."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator='/')


def param_logical_axes(params: Any, method_axes: AxesTable = ()) -> Any:
  """Tree of parameters (arrays or ShapeDtypeStructs) -> same tree of logical-name tuples.

  Patterns: `method_axes` (the method's `param_axes()`) first, then `TOWER_PARAM_AXES`. Raises ValueError
  naming every parameter no pattern classifies, or whose rank differs from its pattern, so a new parameter
  cannot silently stay unsharded.
  """
  compiled = [(re.compile(pattern), axes) for pattern, axes in tuple(method_axes) + TOWER_PARAM_AXES]
  problems = []

  def classify(path, leaf):
    name = path_name(path)
    for pattern, axes in compiled:
      if pattern.search(name):
        if len(axes) != np.ndim(leaf):
          problems.append(f'{name} has shape {tuple(np.shape(leaf))} but its pattern {pattern.pattern!r} '
                          f'names {len(axes)} axes {axes}')
        return axes
    problems.append(f'{name} (shape {tuple(np.shape(leaf))}) matches no pattern')
    return None

  axes = jax.tree_util.tree_map_with_path(classify, params)
  if problems:
    raise ValueError('parameters without logical axis names (add them to the method\'s param_axes()): '
                     + '; '.join(problems))
  return axes


def param_shardings(params: Any, mesh: AnyMesh, rules: Rules, method_axes: AxesTable = (),
                    log: bool = True) -> Any:
  """Tree of parameters -> same tree of `NamedSharding` (logical axes resolved by `rules` on `mesh`)."""
  rules = check_rules(rules)
  logical = param_logical_axes(params, method_axes)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  logical_leaves = treedef.flatten_up_to(logical)
  shardings = []
  for (path, leaf), axes in zip(flat, logical_leaves):
    spec, notes = logical_to_spec(axes, np.shape(leaf), mesh, rules)
    if notes and log:
      logging.info('sharding %s: %s', path_name(path), '; '.join(notes))
    shardings.append(NamedSharding(mesh, spec))
  return jax.tree_util.tree_unflatten(treedef, shardings)


def logical_shardings(logical: Any, abstract: Any, mesh: AnyMesh, rules: Rules) -> Any:
  """A tree of logical-name tuples (one per leaf of `abstract`) -> the tree of `NamedSharding`s."""
  rules = check_rules(rules)
  flat, treedef = jax.tree_util.tree_flatten(abstract)
  logical_leaves = treedef.flatten_up_to(logical)
  return jax.tree_util.tree_unflatten(treedef, [
      NamedSharding(mesh, logical_to_spec(axes, np.shape(leaf), mesh, rules)[0])
      for leaf, axes in zip(flat, logical_leaves)])


def train_state_shardings(abstract_state: Any, optimizer: Any, mesh: AnyMesh, rules: Rules,
                          method_axes: AxesTable = (), extra_logical: Any = None) -> Any:
  """`TrainState` (arrays or `jax.eval_shape` structs) -> the same `TrainState` of `NamedSharding`s.

  Parameters follow the rules; optimizer moments follow their parameters (`optimizer_state_shardings`);
  the extra state follows `extra_logical` (default: replicated); step and counters are replicated.
  """
  params = {**abstract_state.frozen, **abstract_state.trainable}
  shardings = param_shardings(params, mesh, rules, method_axes)
  trainable = {key: shardings[key] for key in abstract_state.trainable}
  frozen = {key: shardings[key] for key in abstract_state.frozen}
  if extra_logical is None:
    extra = jax.tree.map(lambda _: replicated(mesh), abstract_state.extra)
  else:
    extra = logical_shardings(extra_logical, abstract_state.extra, mesh, rules)
  return abstract_state.replace(
      step=replicated(mesh), trainable=trainable, frozen=frozen, extra=extra,
      nonfinite_step=replicated(mesh),
      opt_state=optimizer_state_shardings(optimizer, abstract_state.opt_state, trainable, mesh))


def optimizer_state_shardings(optimizer: Any, opt_state: Any, param_shardings_tree: Any,
                              mesh: AnyMesh) -> Any:
  """Shardings of an optax state: every copy of the parameter tree inside it (Adam moments, also inside
  `multi_transform` / masked states) follows the parameters' shardings, the rest (counts) is replicated.

  Uses `optax.tree_utils.tree_map_params`, which needs the optimizer's masks and labels as trees (not
  callables). Leaves a mask leaves out (`optax.MaskedNode`) stay as they are.
  """
  import optax  # pylint: disable=g-import-not-at-top

  def follow(leaf, leaf_sharding):
    return leaf if isinstance(leaf, optax.MaskedNode) else leaf_sharding

  return optax.tree_utils.tree_map_params(
      optimizer, follow, opt_state, param_shardings_tree,
      transform_non_params=lambda _: replicated(mesh), is_leaf=lambda v: isinstance(v, optax.MaskedNode))


# --- batches ---------------------------------------------------------------------------------------------

def data_parallel_size(mesh: AnyMesh) -> int:
  sizes = _axis_sizes(mesh)
  return math.prod(sizes[axis] for axis in BATCH_AXES)


def batch_sharding(mesh: AnyMesh) -> NamedSharding:
  """Leading (batch) dimension split over `('data', 'fsdp')`, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_global_batch(global_batch: int, mesh: AnyMesh, config_key: str = 'config.train.batch_size') -> None:
  """A clear error when the global batch cannot be split evenly over the data-parallel devices."""
  ways = data_parallel_size(mesh)
  if global_batch % ways:
    sizes = _axis_sizes(mesh)
    raise ValueError(f'{config_key}={global_batch} is not divisible by the data-parallel size {ways} '
                     f'(config.mesh data={sizes["data"]} x fsdp={sizes["fsdp"]}); use a multiple of {ways}')


def process_batch_rows(global_batch: int, mesh: Mesh) -> slice:
  """Rows `[start, stop)` of the global batch that this process must load (contiguous by construction of
  the mesh); processes that are replicas along the batch axes get the same rows."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  starts = [index[0].start or 0 for index in index_map.values()]
  stops = [global_batch if index[0].stop is None else index[0].stop for index in index_map.values()]
  start, stop = min(starts), max(stops)
  rows_per_device = global_batch // data_parallel_size(mesh)
  if (stop - start) != rows_per_device * len(set(starts)):
    raise ValueError(f'this process\'s batch rows are not contiguous under the mesh {dict(mesh.shape)}')
  return slice(start, stop)


def shard_host_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                     global_batch: Optional[int] = None, *, host_rows: bool = False) -> dict:
  """Host arrays -> global `jax.Array`s with the batch dimension split over `('data', 'fsdp')`.

  `host_batch` holds either this process's rows (`process_batch_rows`; then pass `global_batch`, or
  `host_rows=True` for global rows = local rows x process count, per key) or the whole batch, identical on
  every process (`global_batch` None or equal to its length).
  """
  sharding = batch_sharding(mesh)
  result = {}
  for key, value in host_batch.items():
    value = np.asarray(value)
    if host_rows:
      rows = value.shape[0] * jax.process_count()
    else:
      rows = value.shape[0] if global_batch is None else global_batch
    check_global_batch(rows, mesh)
    result[key] = jax.make_array_from_process_local_data(sharding, value, (rows,) + value.shape[1:])
  return result


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order, as NumPy (the whole array on one host)."""
  if array.is_fully_addressable:
    return np.asarray(jax.device_get(array))
  shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  seen, parts = set(), []
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:  # replicas along other mesh axes hold the same rows
      seen.add(start)
      parts.append(np.asarray(shard.data))
  return np.concatenate(parts)


def sum_across_processes(value: np.ndarray) -> np.ndarray:
  """Sum of a host array over all processes (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(np.asarray(value))).sum(axis=0)


def place_tree(tree: Any, shardings: Any) -> Any:
  """Host values (the same on every process) -> global arrays with `shardings`; works multi-host."""
  def place(value, sharding):
    value = np.asarray(jax.device_get(value))
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(place, tree, shardings)


def host_copy(tree: Any) -> Any:
  """Global arrays -> NumPy values of the whole arrays on every process (e.g. to checkpoint or export).

  Sharded leaves that span other processes are all-gathered: in a multi-host run every process must call
  this (it is a collective), in the same order.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def fetch(leaf):
    if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable or leaf.is_fully_replicated:
      return np.asarray(jax.device_get(leaf))
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))

  return jax.tree.map(fetch, tree)


# --- activations -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Within this context, `with_logical_constraint` constrains activations on `mesh` by `rules`.

  Enter it around the *tracing* of a step (the jitted functions of this module do).
  """
  token = _ACTIVATION_SHARDING.set((mesh, check_rules(rules)))
  try:
    yield
  finally:
    _ACTIVATION_SHARDING.reset(token)


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[Optional[str]]) -> jax.Array:
  """Sharding constraint by logical names (one per dimension of `x`); a no-op outside
  `activation_sharding` (single-device code and tests are unaffected)."""
  context = _ACTIVATION_SHARDING.get()
  if context is None:
    return x
  mesh, rules = context
  spec, _ = logical_to_spec(logical_axes, x.shape, mesh, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def jit_sharded(fn: Callable, mesh: Mesh, rules: Rules, in_shardings: Any, out_shardings: Any,
                donate_argnums: tuple[int, ...] = ()) -> Callable:
  """`jax.jit(fn)` with explicit in/out shardings, traced with activation constraints on `mesh` (`rules`
  None = `default_rules()`)."""
  rules = default_rules() if rules is None else check_rules(rules)

  def traced(*args):
    with activation_sharding(mesh, rules):
      return fn(*args)

  return jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                 donate_argnums=donate_argnums)


def jit_train_step(step_fn: Callable, mesh: Mesh, state_shardings: Any, rules: Rules) -> Callable:
  """`(state, batch, rng) -> (state, metrics)` jitted: state by `state_shardings` (donated), batch split
  over `('data', 'fsdp')`, rng and metrics replicated."""
  return jit_sharded(step_fn, mesh, rules,
                     in_shardings=(state_shardings, batch_sharding(mesh), replicated(mesh)),
                     out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,))


# --- multi-host ------------------------------------------------------------------------------------------

_MULTI_PROCESS_ENV = ('JAX_COORDINATOR_ADDRESS', 'MEGASCALE_COORDINATOR_ADDRESS')
_PROCESS_COUNT_ENV = ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'JAX_NUM_PROCESSES')


def _environment_is_multi_process(environ: Mapping[str, str]) -> bool:
  if any(environ.get(name) for name in _MULTI_PROCESS_ENV):
    return True
  if any(environ.get(name, '1').isdigit() and int(environ.get(name, '1')) > 1 for name in _PROCESS_COUNT_ENV):
    return True
  hosts = environ.get('TPU_WORKER_HOSTNAMES') or environ.get('TPU_PROCESS_ADDRESSES') or ''
  return len([host for host in hosts.split(',') if host]) > 1


def initialize_distributed(config: ml_collections.ConfigDict,
                           environ: Optional[Mapping[str, str]] = None) -> bool:
  """Calls `jax.distributed.initialize()` when `config.sharding.distributed` asks for it; idempotent.

  'auto' initialises when the environment names several processes (a coordinator address, SLURM / Open
  MPI with more than one task, several TPU worker hosts); 'on' always (the TPU launch scripts pass it:
  Cloud TPU VMs announce their workers through the metadata server, which JAX queries itself); 'off'
  never. `config.sharding.coordinator_address` / `num_processes` / `process_id`, when set, are passed
  through (multi-node GPU without a scheduler). Must run before any other JAX call. Returns whether JAX
  runs distributed.
  """
  sharding = config.sharding
  mode = str(sharding.distributed)
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f"config.sharding.distributed must be 'auto', 'on' or 'off', got {mode!r}")
  if jax.distributed.is_initialized():
    return True
  environ = os.environ if environ is None else environ
  if mode == 'off' or (mode == 'auto' and not _environment_is_multi_process(environ)):
    return False
  kwargs = {}
  if sharding.coordinator_address:
    kwargs['coordinator_address'] = sharding.coordinator_address
  if sharding.num_processes > 0:
    kwargs['num_processes'] = sharding.num_processes
  if sharding.process_id >= 0:
    kwargs['process_id'] = sharding.process_id
  jax.distributed.initialize(**kwargs)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """True on the one process that writes logs, metric files and other single-writer outputs."""
  return jax.process_index() == 0


# --- reporting -------------------------------------------------------------------------------------------

def _leaf_device_bytes(leaf: Any, sharding: NamedSharding) -> int:
  shape = tuple(np.shape(leaf))
  per_device = sharding.shard_shape(shape) if shape else ()
  return int(math.prod(per_device)) * np.dtype(leaf.dtype).itemsize


def per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds for `tree` (arrays or ShapeDtypeStructs) under `shardings` (no allocation)."""
  leaves = jax.tree.leaves(tree)
  sharding_leaves = jax.tree.structure(tree).flatten_up_to(shardings)
  return sum(_leaf_device_bytes(leaf, sharding) for leaf, sharding in zip(leaves, sharding_leaves))


def _megabytes(count: int) -> str:
  return f'{count / 2 ** 20:,.2f} MiB'


def _spec_text(spec: PartitionSpec) -> str:
  return 'P(' + ', '.join(repr(p) if p is not None else 'None' for p in spec) + ')'


def describe(state: Any, shardings: Any, mesh: AnyMesh) -> str:
  """Start-up table: the mesh, each parameter group's sharding specs and per-device memory, and the
  per-device memory of the parameters (trainable, frozen) and of the optimizer state."""
  lines = [f'mesh {dict(mesh.shape)} ({math.prod(mesh.shape.values())} devices); batch split over '
           f'{BATCH_AXES} ({data_parallel_size(mesh)} ways)']
  lines.append(f'{"group":<28}{"kind":<10}{"params":>14}{"per device":>16}  specs (count)')
  for kind, tree, tree_shardings in (('trainable', state.trainable, shardings.trainable),
                                     ('frozen', state.frozen, shardings.frozen)):
    for group in sorted(tree):
      leaves = jax.tree.leaves(tree[group])
      group_shardings = jax.tree.structure(tree[group]).flatten_up_to(tree_shardings[group])
      specs = collections.Counter(_spec_text(s.spec) for s in group_shardings)
      count = sum(int(np.prod(np.shape(leaf))) for leaf in leaves)
      size = sum(_leaf_device_bytes(leaf, s) for leaf, s in zip(leaves, group_shardings))
      spec_text = ', '.join(f'{spec} x{n}' for spec, n in sorted(specs.items()))
      lines.append(f'{group:<28}{kind:<10}{count:>14,}{_megabytes(size):>16}  {spec_text}')
  trainable = per_device_bytes(state.trainable, shardings.trainable)
  frozen = per_device_bytes(state.frozen, shardings.frozen)
  optimizer = per_device_bytes(state.opt_state, shardings.opt_state)
  lines.append(f'per device: trainable params {_megabytes(trainable)}, frozen params {_megabytes(frozen)}, '
               f'optimizer state {_megabytes(optimizer)}, total {_megabytes(trainable + frozen + optimizer)}')
  return '\n'.join(lines)


def memory_table(abstract_state: Any, shardings_for: Callable[[AnyMesh], Any],
                 meshes: Sequence[Sequence[int]]) -> str:
  """Per-device bytes of params and optimizer state of `abstract_state` under each `(data, fsdp, tensor)`
  mesh shape (`shardings_for(mesh)` -> the state's shardings), by shard-shape arithmetic on device-free
  meshes (nothing is allocated)."""
  header = (f'{"mesh (data,fsdp,tensor)":<26}{"trainable":>14}{"frozen":>14}{"optimizer":>14}'
            f'{"total / device":>16}')
  lines = [header, '-' * len(header)]
  for sizes in meshes:
    shardings = shardings_for(abstract_mesh(sizes))
    values = [per_device_bytes(getattr(abstract_state, field), getattr(shardings, field))
              for field in ('trainable', 'frozen', 'opt_state')]
    lines.append(f'{str(tuple(sizes)):<26}' + ''.join(f'{_megabytes(v):>14}' for v in values)
                 + f'{_megabytes(sum(values)):>16}')
  return '\n'.join(lines)
