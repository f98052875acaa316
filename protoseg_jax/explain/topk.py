"""The k best patches of every prototype over a split, in one streamed pass with the state on the device.

Definition (what `update` ranks):
* One candidate per (tile, prototype): the maximum similarity over the tile's positions and where it is
  (ties -> the lowest flat position `y * w + x`). A prototype's k best patches therefore come from k
  different tiles (no near-duplicate neighbours of one hot spot).
* Ranking by similarity, descending; equal similarities -> the lower tile index first. The result is the
  same whatever the batch order or the batch size.
* Rows with `valid = False` (batch padding) never enter. Tile indices must be unique over the pass.
* Positions may be excluded by setting their similarity to -inf (e.g. pixels outside the prototype's class);
  a tile whose positions are all -inf for a prototype is no candidate for it.
* While fewer than k candidates have been seen, the remaining slots hold fillers: similarity -inf,
  tile/y/x -1.
A NaN maximum also makes no candidate (similarities are expected finite or -inf).

`count_wins` is the other per-prototype statistic of the page: how many eval pixels each prototype wins in
the prototype map.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FILLER = -1


class TopKState(NamedTuple):
  """Running top-k, all `[P, k]`, each row sorted best first."""

  values: jax.Array   # float32 similarity (-inf filler)
  tiles: jax.Array    # int32 tile index (-1 filler)
  ys: jax.Array       # int32 row in the feature map (-1 filler)
  xs: jax.Array       # int32 column in the feature map (-1 filler)


def init_state(num_prototypes: int, k: int) -> TopKState:
  """An empty state: P rows of k fillers."""
  if k < 1:
    raise ValueError(f'k must be >= 1, got {k}')
  # Three separate index buffers (not one shared), so that the state can be donated to a jitted update.
  fills = [jnp.full((num_prototypes, k), FILLER, jnp.int32) for _ in range(3)]
  return TopKState(jnp.full((num_prototypes, k), -jnp.inf, jnp.float32), *fills)


@jax.jit
def update(state: TopKState, sims: jax.Array, tile_ids: jax.Array, valid: jax.Array) -> TopKState:
  """Merges one batch into the running top-k (jit; one trace per batch shape).

  Args:
    state: the running `TopKState` (P rows, k columns).
    sims: `[B, h, w, P]` similarity (cosine, or a CAM: any per-prototype monotone score) of every position.
    tile_ids: `[B]` int32 global tile index of each row (unique over the pass, >= 0 for valid rows).
    valid: `[B]` bool; False for padding rows.

  Returns:
    The new state.
  """
  batch, height, width, num_prototypes = sims.shape
  k = state.values.shape[1]
  flat = sims.astype(jnp.float32).reshape(batch, height * width, num_prototypes)
  position = jnp.argmax(flat, axis=1).astype(jnp.int32)                       # [B, P], first max
  best = jnp.max(flat, axis=1)                                                # [B, P]
  valid = valid.astype(bool)[:, None] & (best > -jnp.inf)                     # [B, P]
  values = jnp.where(valid, best, -jnp.inf).T                                 # [P, B]
  tiles = jnp.where(valid, tile_ids.astype(jnp.int32)[:, None], FILLER).T
  ys = jnp.where(valid, position // width, FILLER).T
  xs = jnp.where(valid, position % width, FILLER).T
  # Non-candidates are now exact fillers (-inf, -1), which sort after every finite similarity. A
  # lexicographic sort on (-similarity, tile) makes the order a function of the candidates only, not of
  # their arrival order (`lax.top_k` alone would break ties by position in the concatenation).
  payload = tuple(jnp.concatenate([old, new], axis=1)
                  for old, new in zip(state, (values, tiles, ys, xs)))          # 4 x [P, k + B]
  ordered = jax.lax.sort((-payload[0], payload[1]) + payload, dimension=1, num_keys=2)
  return TopKState(*(part[:, :k] for part in ordered[2:]))


def finalize(state: TopKState) -> dict[str, np.ndarray]:
  """Host copies: `values` `[P, k]` float32, `tiles`, `ys`, `xs` `[P, k]` int32 (fillers -inf / -1)."""
  return {name: np.asarray(jax.device_get(part)) for name, part in zip(TopKState._fields, state)}


def needed_tiles(result: dict[str, np.ndarray]) -> np.ndarray:
  """Sorted unique tile indices referenced by a finalized top-k (to read each tile once for the crops)."""
  tiles = np.asarray(result['tiles'])
  return np.unique(tiles[tiles >= 0])


@functools.partial(jax.jit, static_argnames=('num_prototypes',))
def count_wins(proto_map: jax.Array, valid: jax.Array, num_prototypes: int) -> jax.Array:
  """Pixel count of each prototype in a batch of prototype maps (jit).

  Args:
    proto_map: `[B, H, W]` int (`prototype_map` output; negative = background, not counted).
    valid: `[B]` bool; padding rows are not counted.
    num_prototypes: static P.

  Returns:
    `[P]` int32 counts for this batch (accumulate over batches on the host in int64).
  """
  values = proto_map.astype(jnp.int32)
  keep = valid.astype(bool)[:, None, None] & (values >= 0) & (values < num_prototypes)
  values = jnp.where(keep, values, num_prototypes)
  return jnp.bincount(values.reshape(-1), length=num_prototypes + 1)[:num_prototypes].astype(jnp.int32)
