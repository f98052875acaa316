"""Array ops against PyTorch and float64 NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from protoseg_jax import ops


@pytest.mark.parametrize('in_hw, out_hw', [((14, 14), (224, 224)), ((28, 28), (14, 14)), ((7, 6), (5, 9)),
                                           ((16, 16), (16, 16))])
@pytest.mark.parametrize('align_corners', [False, True])
def test_resize_bilinear_matches_torch(in_hw, out_hw, align_corners):
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
  expected = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw,
                                             mode='bilinear', align_corners=align_corners)
  expected = expected.permute(0, 2, 3, 1).numpy()
  out = np.asarray(ops.resize_bilinear(jnp.asarray(x), out_hw, align_corners))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_merge_prototypes_mean_and_soft_max():
  x = np.random.default_rng(1).normal(size=(3, 2 * 5))  # 2 classes x 5 prototypes
  groups = x.reshape(3, 2, 5)
  np.testing.assert_allclose(np.asarray(ops.merge_prototypes(jnp.asarray(x), 2, 'mean')), groups.mean(-1),
                             rtol=1e-6)
  soft = np.exp(groups) / np.exp(groups).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(ops.merge_prototypes(jnp.asarray(x), 2, 'max')),
                             (soft * groups).sum(-1), rtol=1e-5)
  with pytest.raises(ValueError, match='unknown prototype merge'):
    ops.merge_prototypes(jnp.asarray(x), 2, 'median')


def test_interleave_and_normalize():
  a, b = jnp.array([[1.0, 0.0], [2.0, 0.0]]), jnp.array([[0.0, 3.0], [0.0, 4.0]])
  np.testing.assert_array_equal(np.asarray(ops.interleave(a, b)), [[1, 0], [0, 3], [2, 0], [0, 4]])
  x = np.random.default_rng(2).normal(size=(4, 6))
  np.testing.assert_allclose(np.asarray(ops.l2_normalize(jnp.asarray(x))),
                             x / np.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(ops.l2_normalize(jnp.zeros((1, 3)))), np.zeros((1, 3)))
