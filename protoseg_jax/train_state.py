"""The train state of every method: creation on a mesh, AdamW + poly schedules, and the NaN/Inf guard.

`TrainState` itself is defined in `protoseg_jax.method` (methods' train steps read and write it).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from protoseg_jax import config_base, sharding
from protoseg_jax.errors import ConfigError
from protoseg_jax.method import Method, StepFn, TrainState

DECAY_ON = ('all', 'matrices')


def decay_mask(params: Any, decay_on: str) -> Any:
  """Weight-decay mask tree: 'all' decays every tensor; 'matrices' only those with ndim >= 2 (no biases,
  norms, 0-D / 1-D parameters)."""
  if decay_on not in DECAY_ON:
    raise ConfigError(f'config.train.weight_decay_on must be one of {DECAY_ON}, got {decay_on!r}')
  return jax.tree.map(lambda leaf: decay_on == 'all' or len(leaf.shape) >= 2, params)


def poly_schedule(learning_rate: float, power: float, total_steps: int) -> optax.Schedule:
  """`lr * (1 - t / T)^power`, no warm-up."""
  return optax.polynomial_schedule(learning_rate, 0.0, power, max(total_steps, 1))


def adamw(train_config: ml_collections.ConfigDict, schedule: optax.Schedule,
          mask: Any) -> optax.GradientTransformation:
  """AdamW with `config.train.{adam_b1, adam_b2, adam_eps, weight_decay}` and a decay mask tree."""
  return optax.adamw(schedule, b1=train_config.adam_b1, b2=train_config.adam_b2, eps=train_config.adam_eps,
                     weight_decay=train_config.weight_decay, mask=mask)


def store_frozen_kernels(frozen: Any, dtype) -> Any:
  """The frozen towers' Dense / Conv `kernel` leaves in `dtype` (norms, tables, positions stay f32).

  With bf16 compute, layers cast their kernels to bf16 on every call anyway: storing the frozen ones in
  bf16 once gives bitwise the same outputs, about half the towers' memory and no per-step casting traffic.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return frozen

  def cast(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    is_kernel = name.endswith('kernel') and jnp.issubdtype(leaf.dtype, jnp.floating)
    return leaf.astype(dtype) if is_kernel else leaf

  return jax.tree_util.tree_map_with_path(cast, frozen)


def create_train_state(params: dict, extra: Any, optimizer: optax.GradientTransformation,
                       method: Method) -> TrainState:
  """The state at step 0; frozen kernels stored in the compute dtype (`store_frozen_kernels`)."""
  trainable, frozen = method.split_params(params)
  frozen = store_frozen_kernels(frozen, config_base.compute_dtype(method.config.train.compute_dtype))
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen, extra=extra,
                    opt_state=optimizer.init(trainable), nonfinite_step=jnp.full((), -1, jnp.int32))


def state_shardings(abstract_state: TrainState, optimizer: optax.GradientTransformation, method: Method,
                    mesh, rules) -> TrainState:
  """The state's tree of `NamedSharding`s on `mesh` (parameters by the logical-axis tables and `rules`)."""
  return sharding.train_state_shardings(abstract_state, optimizer, mesh, rules, method.param_axes(),
                                        method.extra_axes(abstract_state.extra))


def abstract_train_state(method: Method, optimizer: optax.GradientTransformation,
                         rng: Optional[jax.Array] = None) -> TrainState:
  """Shapes of the state, nothing computed (memory tables, restore targets, compile-only bench)."""
  rng = jax.random.key(0) if rng is None else rng

  def build(key):
    params, extra = method.random_variables(key)
    return create_train_state(params, extra, optimizer, method)

  return jax.eval_shape(build, rng)


def create_sharded_train_state(params: dict, extra: Any, optimizer: optax.GradientTransformation,
                               method: Method, mesh, rules) -> tuple[TrainState, TrainState]:
  """-> (state laid out on `mesh`, its tree of `NamedSharding`s).

  `params` / `extra` are host or single-device values, identical on every process; they are placed shard
  by shard and the optimizer state is created directly sharded (never whole on one device).
  """
  create = lambda p, e: create_train_state(p, e, optimizer, method)
  shardings = state_shardings(jax.eval_shape(create, params, extra), optimizer, method, mesh, rules)
  placed = sharding.place_tree(params, {**shardings.frozen, **shardings.trainable})
  placed_extra = sharding.place_tree(extra, shardings.extra)
  state = jax.jit(create, out_shardings=shardings)(placed, placed_extra)
  return state, shardings


def guard_nonfinite(step_fn: StepFn) -> StepFn:
  """Wraps a train step so that the first step whose loss (or gradient norm, when reported) is NaN/Inf is
  recorded in `state.nonfinite_step` (-1: none so far).

  One scalar per step, read by the training loop at its host syncs (log windows, validations, saves): the
  loop then stops before anything of the bad step or later is saved. The step's own computation is left
  exactly as the method wrote it (selecting the old state with `where` over every leaf would change XLA's
  fusions, hence the last bits of the numbers, and cost a read and write of the whole state per step).
  """

  def guarded(state: TrainState, batch, rng):
    new_state, metrics = step_fn(state, batch, rng)
    finite = jnp.isfinite(metrics['loss'])
    if 'grad_norm' in metrics:
      finite &= jnp.isfinite(metrics['grad_norm'])
    first_bad = jnp.where((~finite) & (state.nonfinite_step < 0), state.step, state.nonfinite_step)
    return new_state.replace(nonfinite_step=first_bad.astype(jnp.int32)), metrics

  return guarded


def jit_train_step(method: Method, optimizer: optax.GradientTransformation, schedules: dict, mesh,
                   shardings: TrainState, rules) -> Callable:
  """The method's step, guarded, jitted on `mesh`: state by `shardings` (donated), batch split over the
  data-parallel axes, rng and metrics replicated."""
  return sharding.jit_train_step(guard_nonfinite(method.train_step_fn(optimizer, schedules)), mesh,
                                 shardings, rules)
