"""MPAMatch on a (data 2, fsdp 4) mesh of 8 simulated devices equals the 1-device run (subprocess:
tests/mpamatch/mpamatch_sharding_check.py); every MPAMatch parameter has logical axis names."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from protoseg_jax import sharding
from protoseg_jax.methods.mpamatch import config as mpamatch_config
from protoseg_jax.methods.mpamatch.method import MPAMatchMethod

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def test_every_parameter_of_the_full_segmenter_has_logical_axes():
  config = mpamatch_config.get_config()
  config.tokenizer.kind = 'bytes'  # no tokenizer file needed for shapes
  config.model.text.vocab_size = 32007
  method = MPAMatchMethod(config)
  params, _ = method.abstract_variables(jax.random.key(0))
  # raises, naming them, if any parameter is unclassified
  axes = sharding.param_logical_axes(params, method.param_axes())
  assert axes['decoder']['conv_more']['conv']['kernel'] == (None, None, 'conv_in', 'conv_out')
  assert axes['encoder']['blocks_23']['attn']['qkv']['kernel'] == ('embed', 'qkv')
  mesh = sharding.abstract_mesh((1, 8, 1))
  shardings = sharding.param_shardings(params, mesh, config.sharding.logical_rules, method.param_axes(),
                                       log=False)
  assert tuple(shardings['encoder']['blocks_0']['mlp']['fc1']['kernel'].spec) == ('fsdp',)


@pytest.fixture(scope='module')
def eight_devices():
  environ = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, os.path.join(HERE, 'mpamatch_sharding_check.py')],
                          capture_output=True, text=True, cwd=REPO, env=environ, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  line = next(line for line in result.stdout.splitlines() if line.startswith('RESULT '))
  return json.loads(line[len('RESULT '):])


@pytest.mark.slow
def test_two_sharded_steps_equal_the_one_device_run(eight_devices):
  result = eight_devices
  assert result['mesh'] == {'data': 2, 'fsdp': 4, 'tensor': 1}
  np.testing.assert_allclose(result['sharded_losses'], result['single_losses'], rtol=1e-5)
  assert result['max_update'] > 1e-3                      # the parameters really moved ...
  assert result['max_param_diff'] <= 1e-5                 # ... identically on both layouts
  assert result['max_batch_stats_diff'] <= 1e-5           # BatchNorm over the global batch
  assert result['max_bank_diff'] <= 1e-5                  # prototype sums over the global batch
  assert result['max_probs_diff'] <= 1e-5                 # sliding-window head


@pytest.mark.slow
def test_decoder_kernel_and_its_adam_moment_are_split_over_fsdp(eight_devices):
  # conv [3, 3, 16 in, 8 out]: inputs over fsdp (4) -> [3, 3, 4, 8] per device; the Adam moment inside
  # optax.multi_transform follows its parameter (matched by path), single device keeps everything whole
  assert eight_devices['layout'] == {'kernel': [[None, None, 'fsdp'], [3, 3, 4, 8]],
                                     'adam_mu': [[None, None, 'fsdp'], [3, 3, 4, 8]]}
  assert eight_devices['single_layout']['adam_mu'] == [[], [3, 3, 16, 8]]
