"""`protoseg_jax.bench` runs both methods on tiny configs and fills every column (no timing is asserted)."""

import math

from protoseg_jax import bench
import tiny_config
from test_mpamatch_step import tiny_config as mpamatch_tiny_config


def check_rows(rows, names):
  assert [row['step'] for row in rows] == names
  for row in rows:
    assert row['images_per_s'] > 0 and row['seconds'] > 0
    assert row['gflop_per_image'] > 0  # XLA's cost analysis of the compiled step
  table = bench.format_table(rows)
  assert all(name in table for name in names) and 'img/s' in table


def test_dualprotoseg_bench_rows():
  config = tiny_config.get_config()
  rows = bench.run(config, steps=1, what=['train', 'inference'])
  check_rows(rows, ['train', 'inference (6 TTA passes)'])
  assert rows[0]['batch'] == config.train.batch_size


def test_mpamatch_bench_rows():
  config = mpamatch_tiny_config()
  rows = bench.run(config, steps=1, what=['train', 'inference'])
  check_rows(rows, ['train (mpamatch)', 'inference (windows)'])
  assert rows[0]['batch'] == 8 and not math.isnan(rows[0]['tflop_per_s'])
