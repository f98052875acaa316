"""`python -m protoseg_jax.bench`: the compiled train step's FLOPs equal a hand count; the report runs for both
methods on tiny configs (compile-only and timed), with its columns filled. No speed is asserted."""

import math
import os

import jax
import pytest

import tiny_config
from conftest import HERE
from protoseg_jax import bench, costs, registry
from protoseg_jax.methods.dualprotoseg import bench as dualprotoseg_bench

REPO = os.path.dirname(HERE)


def matmul_heavy_config():
  """Small enough to compile in seconds, wide enough that matmuls dominate XLA's count."""
  config = tiny_config.get_config()
  config.data.image_size = 64
  config.model.vit.update(patch_size=16, width=384, depth=2, num_heads=6, pos_embed_grid=4, taps=(0, 0, 1, 1))
  config.model.update(refiner_width=256, refiner_blocks=2, feature_dim=128, pyramid_channels=(32, 32, 16, 16),
                      pyramid_upsample=(1, 2, 4, 16))
  config.model.text.update(width=256, depth=1, context_length=40)
  config.train.batch_size = 4
  return config


def test_train_step_flops_equal_the_hand_count():
  config = matmul_heavy_config()
  workload = registry.build(config).bench_workloads(['train'])[0]
  hand = dualprotoseg_bench.analytic_train_flops(config)['total'] * config.train.batch_size
  matmuls = costs.matmul_flops(workload.fn, *workload.abstract_args).flops
  compiled = costs.compiled_cost(workload.fn, *workload.abstract_args).flops
  assert matmuls == pytest.approx(hand, rel=0.005)   # the analytic jaxpr count: every dot and conv
  assert compiled == pytest.approx(hand, rel=0.05)   # XLA's own count adds the elementwise work


def test_dualprotoseg_report_compile_only_and_timed(tmp_path):
  config = tiny_config.get_config()
  compiled = bench.run(config, ['train', 'inference', 'tta'], compile_only=True)
  assert [row['workload'] for row in compiled] == ['DualProtoSeg train', 'DualProtoSeg inference (1 pass)',
                                                   'DualProtoSeg eval scores (6 TTA passes)']
  for row in compiled:
    assert row['gflop_per_image'] > 0 and row['peak_gib'] > 0 and row['matmul_gflop_per_image'] > 0
    assert 'images_per_s' not in row
  # The TTA program runs the single pass six times.
  assert compiled[2]['matmul_gflop_per_image'] == pytest.approx(6 * compiled[1]['matmul_gflop_per_image'],
                                                                rel=0.02)
  timed = bench.run(config, ['train', 'pipeline'], steps=1, peak_tflops=1.0, workdir=str(tmp_path))
  assert timed[0]['images_per_s'] > 0 and math.isfinite(timed[0]['mfu']) and timed[0]['mfu'] > 0
  assert timed[1]['workload'] == 'input pipeline (host)' and timed[1]['images_per_s'] > 0
  assert 0.0 <= timed[1]['input_wait_fraction'] <= 1.0
  table = bench.format_table(timed, costs.peak_tflops(override=1.0))
  assert 'GFLOP/img' in table and 'DualProtoSeg train' in table


def test_timed_inputs_match_the_compiled_signature():
  # Train and eval batches differ, so a row that timed one batch and counted another would show here.
  config = tiny_config.get_config()
  config.train.batch_size, config.eval.batch_size = 2, 3
  for workload in registry.build(config).bench_workloads(['train', 'inference', 'tta']):
    real = jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), workload.make_args())
    abstract = jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), workload.abstract_args)
    assert real == abstract, workload.name
    assert 'train' in workload.name or jax.tree.leaves(workload.abstract_args)[-1].shape[0] == workload.images
  train = registry.build(config).bench_workloads(['train'])[0]
  assert train.images == 2 and train.abstract_args[1]['images'].shape[0] == 2


def test_mpamatch_report_and_unknown_peak_is_nan():
  config = registry.get('mpamatch').default_config()
  config.data.update(image_size=32, train_window=48)
  config.tokenizer.kind = 'bytes'
  config.model.vit.update(patch_size=8, width=32, depth=1, num_heads=2, pos_embed_grid=4, layer_scale_init=None,
                          taps=(0,))
  config.model.update(bottleneck_channels=16, decoder_channels=(8, 8, 8), embed_level=1, embed_hidden=8,
                      embed_dim=8)
  config.model.text.update(vocab_size=259, context_table=32, context_length=32, width=16, depth=1, num_heads=2,
                           embed_dim=8)
  config.train.update(labelled_batch_size=2, unlabelled_batch_size=2)
  config.eval.batch_size = 2
  rows = bench.run(config, ['train', 'inference'], steps=1)
  assert rows[0]['workload'].startswith('MPAMatch train (mpamatch, 2 + 2)') and rows[0]['batch'] == 4
  assert rows[1]['images_per_s'] > 0
  assert all(math.isnan(row['mfu']) for row in rows)  # a CPU has no entry in the peak table


def test_unknown_row_is_named():
  with pytest.raises(ValueError, match=r"--what: unknown rows \['gpu'\]"):
    bench.run(tiny_config.get_config(), ['gpu'])
