"""Array ops against PyTorch and float64 NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from protoseg_jax import ops

RESIZE_CASES = [((14, 14), (224, 224)), ((28, 28), (14, 14)), ((7, 7), (5, 5)), ((224, 224), (224, 224)),
                ((7, 6), (5, 9)), ((4, 4), (1, 1))]


@pytest.mark.parametrize('in_hw, out_hw', RESIZE_CASES)
@pytest.mark.parametrize('align_corners', [False, True])
def test_resize_bilinear_matches_torch(in_hw, out_hw, align_corners):
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(0).normal(size=(2, *in_hw, 3)).astype(np.float32)
  expected = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw,
                                             mode='bilinear', align_corners=align_corners)
  expected = expected.permute(0, 2, 3, 1).numpy()
  out = np.asarray(ops.resize_bilinear(jnp.asarray(x), out_hw, align_corners))
  assert out.shape == expected.shape
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('in_size, out_size', [(14, 224), (28, 14), (7, 5), (5, 5), (1, 3)])
@pytest.mark.parametrize('align_corners', [False, True])
def test_bilinear_matrix_rows_are_convex_weights(in_size, out_size, align_corners):
  weights = ops.bilinear_matrix(in_size, out_size, align_corners)
  assert weights.shape == (out_size, in_size)
  assert (weights >= 0).all()
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_resize_bilinear_keeps_leading_axes():
  x = jnp.ones((2, 3, 7, 7, 4))
  assert ops.resize_bilinear(x, (5, 9)).shape == (2, 3, 5, 9, 4)


def test_merge_prototypes_mean_and_soft_max():
  x = np.random.default_rng(1).normal(size=(3, 4, 2 * 5))  # [..., 2 classes x 5 prototypes], class-major
  groups = x.reshape(3, 4, 2, 5)
  np.testing.assert_allclose(np.asarray(ops.merge_prototypes(jnp.asarray(x, jnp.float32), 2, 'mean')),
                             groups.mean(-1), rtol=1e-5, atol=1e-6)
  soft = np.exp(groups - groups.max(-1, keepdims=True))
  soft /= soft.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(ops.merge_prototypes(jnp.asarray(x, jnp.float32), 2, 'max')),
                             (soft * groups).sum(-1), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='unknown prototype merge'):
    ops.merge_prototypes(jnp.asarray(x), 2, 'median')


def test_interleave_order():
  a = jnp.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
  b = jnp.array([[0.0, -1.0], [0.0, -2.0], [0.0, -3.0]])
  np.testing.assert_array_equal(np.asarray(ops.interleave(a, b)),
                                [[1, 0], [0, -1], [2, 0], [0, -2], [3, 0], [0, -3]])


def test_l2_normalize_matches_numpy():
  x = np.random.default_rng(2).normal(size=(4, 6))
  np.testing.assert_allclose(np.asarray(ops.l2_normalize(jnp.asarray(x, jnp.float32))),
                             x / np.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(ops.l2_normalize(jnp.asarray(x, jnp.float32), axis=0)),
                             x / np.linalg.norm(x, axis=0, keepdims=True), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(ops.l2_normalize(jnp.zeros((1, 3)))), np.zeros((1, 3)))
  assert ops.l2_normalize(jnp.ones((2, 3), jnp.bfloat16)).dtype == jnp.bfloat16
