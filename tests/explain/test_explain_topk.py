"""Streamed top-k patches and win counts (`protoseg_jax.explain.topk`) against a brute-force NumPy ranking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protoseg_jax.explain import topk


def _ranking(sims, tile_ids, k):
  """Whole split at once: per prototype, per tile the first maximum; sort by (-value, tile); first k."""
  num_tiles, height, width, num_prototypes = sims.shape
  out = {'values': np.full((num_prototypes, k), -np.inf, np.float32)}
  for name in ('tiles', 'ys', 'xs'):
    out[name] = np.full((num_prototypes, k), -1, np.int32)
  for p in range(num_prototypes):
    candidates = []
    for t in range(num_tiles):
      best, where = None, None
      for i in range(height):
        for j in range(width):
          if best is None or sims[t, i, j, p] > best:
            best, where = sims[t, i, j, p], (i, j)
      if best > -np.inf:                       # a tile whose positions are all -inf is no candidate
        candidates.append((-float(best), int(tile_ids[t]), where))
    candidates.sort(key=lambda c: (c[0], c[1]))
    for r, (negative, tile, (i, j)) in enumerate(candidates[:k]):
      out['values'][p, r], out['tiles'][p, r], out['ys'][p, r], out['xs'][p, r] = -negative, tile, i, j
  return out


def _stream(sims, tile_ids, k, batch, jitted=topk.update, seed=0):
  """Feeds the split in shuffled batches of `batch` rows, the last padded with garbage rows (valid=False)."""
  order = np.random.default_rng(seed).permutation(len(sims))
  state = topk.init_state(sims.shape[-1], k)
  for start in range(0, len(order), batch):
    rows = order[start:start + batch]
    pad = batch - len(rows)
    chunk = np.concatenate([sims[rows], np.full((pad, *sims.shape[1:]), 99.0, np.float32)])  # padding is huge
    ids = np.concatenate([tile_ids[rows], np.zeros(pad, np.int64)]).astype(np.int32)
    valid = np.arange(batch) < len(rows)
    state = jitted(state, jnp.asarray(chunk), jnp.asarray(ids), jnp.asarray(valid))
  return topk.finalize(state)


def _assert_equal(result, expected):
  for name in ('values', 'tiles', 'ys', 'xs'):
    np.testing.assert_array_equal(result[name], expected[name], err_msg=name)


@pytest.mark.parametrize('ties', [False, True])
def test_streamed_topk_equals_brute_force_ranking(ties):
  rng = np.random.default_rng(10 + ties)
  sims = rng.normal(size=(13, 4, 5, 6)).astype(np.float32)
  if ties:
    sims = rng.integers(0, 4, sims.shape).astype(np.float32)   # ties across tiles and positions
  tile_ids = rng.permutation(100)[:13]                         # arbitrary, not the arrival order
  expected = _ranking(sims, tile_ids, 4)
  for batch, seed in ((4, 0), (5, 1), (13, 2)):
    _assert_equal(_stream(sims, tile_ids, 4, batch, seed=seed), expected)


def test_k_larger_than_the_split_returns_fillers():
  rng = np.random.default_rng(3)
  sims = rng.normal(size=(3, 2, 2, 2)).astype(np.float32)
  result = _stream(sims, np.arange(3), k=5, batch=2)
  _assert_equal(result, _ranking(sims, np.arange(3), 5))
  assert np.isneginf(result['values'][:, 3:]).all()
  for name in ('tiles', 'ys', 'xs'):
    assert (result[name][:, 3:] == -1).all() and (result[name][:, :3] >= 0).all()
  assert topk.needed_tiles(result).tolist() == [0, 1, 2]


def test_one_candidate_per_tile_and_first_position_on_ties():
  sims = np.zeros((2, 2, 3, 1), np.float32)
  sims[0, 0, 1, 0] = sims[0, 1, 2, 0] = 5.0      # tile 0: two equal maxima -> flat position 1 = (0, 1)
  sims[1, 1, 0, 0] = 4.0                         # tile 1: one lower maximum
  result = _stream(sims, np.asarray([7, 3]), k=2, batch=2)
  np.testing.assert_array_equal(result['values'], [[5.0, 4.0]])
  np.testing.assert_array_equal(result['tiles'], [[7, 3]])     # tile 7 once, even though it holds two 5.0s
  np.testing.assert_array_equal(result['ys'], [[0, 1]])
  np.testing.assert_array_equal(result['xs'], [[1, 0]])


def test_equal_values_rank_lower_tile_first_whatever_the_order():
  sims = np.ones((3, 1, 1, 1), np.float32)
  for seed in range(4):
    result = _stream(sims, np.asarray([9, 2, 5]), k=2, batch=1, seed=seed)
    np.testing.assert_array_equal(result['tiles'], [[2, 5]])


def test_minus_inf_positions_are_excluded_and_all_minus_inf_tiles_never_enter():
  sims = np.zeros((3, 2, 2, 2), np.float32)
  sims[0, 0, 0] = [9.0, 9.0]                      # tile 0's best position, masked out for prototype 1 below
  sims[0, 1, 1] = [1.0, 2.0]
  sims[1] = -np.inf                               # tile 1: nothing left for either prototype
  sims[2, 1, 0] = [3.0, 3.0]
  sims[0, 0, 0, 1] = -np.inf
  result = _stream(sims, np.arange(3), k=3, batch=2)
  _assert_equal(result, {'values': np.asarray([[9, 3, -np.inf], [3, 2, -np.inf]], np.float32),
                         'tiles': np.asarray([[0, 2, -1], [2, 0, -1]]),
                         'ys': np.asarray([[0, 1, -1], [1, 1, -1]]),
                         'xs': np.asarray([[0, 0, -1], [0, 1, -1]])})


def test_update_traces_once_under_jit():
  traces = []

  def counted(state, sims, tile_ids, valid):
    traces.append(1)
    return topk.update(state, sims, tile_ids, valid)

  rng = np.random.default_rng(4)
  sims = rng.normal(size=(10, 3, 3, 4)).astype(np.float32)
  result = _stream(sims, np.arange(10), 3, batch=4, jitted=jax.jit(counted))
  assert len(traces) == 1
  _assert_equal(result, _ranking(sims, np.arange(10), 3))


def test_bf16_similarities_are_ranked_as_f32():
  rng = np.random.default_rng(5)
  sims = np.asarray(jnp.asarray(rng.normal(size=(6, 3, 3, 2)), jnp.bfloat16).astype(jnp.float32))
  state = topk.init_state(2, 3)
  state = topk.update(state, jnp.asarray(sims, jnp.bfloat16), jnp.arange(6, dtype=jnp.int32),
                      jnp.ones(6, bool))
  _assert_equal(topk.finalize(state), _ranking(sims, np.arange(6), 3))


def test_count_wins_is_the_histogram_of_valid_tissue_pixels():
  rng = np.random.default_rng(6)
  proto_map = rng.integers(-1, 8, (4, 5, 6)).astype(np.int32)
  valid = np.asarray([True, False, True, True])
  wins = np.asarray(topk.count_wins(jnp.asarray(proto_map), jnp.asarray(valid), 8))
  expected = np.zeros(8, np.int64)
  for b in range(4):
    for value in proto_map[b].ravel():
      if valid[b] and value >= 0:
        expected[value] += 1
  np.testing.assert_array_equal(wins, expected)
  assert wins.sum() == (proto_map[valid] >= 0).sum()
