"""CAM -> mask rules on a hand-made CAM, and the whole TTA pipeline against float64 NumPy."""

import jax.numpy as jnp
import numpy as np

from protoseg_jax import cam


def test_hand_made_cam():
  maps = jnp.array([[[[2.0, 0.0], [-1.0, 3.0], [0.5, 1.0]]]])  # [B=1, H=1, W=3, C=2]
  gated = cam.postprocess_pass(maps, jnp.array([[1, 1]]), (1, 3))
  np.testing.assert_allclose(np.asarray(gated)[0, 0], [[1, 0], [0, 1], [0.25, 1 / 3]], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(cam.maps_to_mask(gated))[0, 0], [0, 1, 1])
  # Without class 1 in the label, the pixel where only class 1 was active becomes background (2).
  gated = cam.postprocess_pass(maps, jnp.array([[1, 0]]), (1, 3))
  np.testing.assert_array_equal(np.asarray(cam.maps_to_mask(gated))[0, 0], [0, 2, 0])


def np_resize_align_corners(x, out_h, out_w):
  b, h, w, c = x.shape
  out = np.zeros((b, out_h, out_w, c))
  for i in range(out_h):
    sy = i * (h - 1) / (out_h - 1)
    y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); ly = sy - y0
    for j in range(out_w):
      sx = j * (w - 1) / (out_w - 1)
      x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); lx = sx - x0
      out[:, i, j] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                      + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
  return out


def test_tta_pipeline_matches_numpy():
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(3, 3))
  images = rng.normal(size=(2, 8, 8, 3))
  labels = np.array([[1, 0, 1], [1, 1, 1]])

  def class_map_np(x):  # per-pixel linear map then 2x2 average pool: not flip-invariant on random input
    y = x @ weights
    return y.reshape(y.shape[0], 4, 2, 4, 2, 3).mean(axis=(2, 4))

  def class_map_fn(x):
    return (x @ jnp.asarray(weights, jnp.float32)).reshape(x.shape[0], 4, 2, 4, 2, 3).mean(axis=(2, 4))

  maps = cam.tta_class_maps(class_map_fn, jnp.asarray(images, jnp.float32), jnp.asarray(labels), (8, 8))

  passes = []
  for factor in (0.9, 1.0, 1.1):
    for flip in (False, True):
      x = images[:, :, ::-1] * factor if flip else images * factor
      m = class_map_np(x)
      m = m[:, :, ::-1] if flip else m
      m = np.maximum(m, 0)
      m = (m - m.min(axis=(1, 2), keepdims=True)) / (m.max(axis=(1, 2), keepdims=True)
                                                    - m.min(axis=(1, 2), keepdims=True) + 1e-6)
      passes.append(np_resize_align_corners(m * labels[:, None, None], 8, 8))
  expected = np.mean(passes, axis=0)
  np.testing.assert_allclose(np.asarray(maps), expected, rtol=1e-4, atol=1e-5)
  background = (1 - expected.max(-1, keepdims=True)) ** 10
  expected_mask = np.argmax(np.concatenate([expected, background], -1), -1)
  np.testing.assert_array_equal(np.asarray(cam.maps_to_mask(maps)), expected_mask)
