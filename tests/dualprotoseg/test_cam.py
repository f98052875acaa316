"""CAM -> mask rules on a hand-made CAM, and the whole TTA pipeline against a float64 NumPy version."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protoseg_jax.methods.dualprotoseg import cam

# [B=1, h=2, w=3, C=2]. After ReLU and min-max (max 4 for class 0, 3 for class 1):
#   class 0: [[1, .5, 0], [0, 0, 0]]      class 1: [[0, 1/3, 1], [0, 0, .1]]
HAND_CAM = np.stack([np.array([[4.0, 2.0, 0.0], [0.0, -1.0, 0.0]]),
                     np.array([[0.0, 1.0, 3.0], [-2.0, 0.0, 0.3]])], axis=-1)[None]


def test_postprocess_pass_on_hand_made_cam():
  gated = np.asarray(cam.postprocess_pass(jnp.asarray(HAND_CAM), jnp.array([[1, 1]]), (2, 3)))
  np.testing.assert_allclose(gated[0, ..., 0], [[1, 0.5, 0], [0, 0, 0]], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(gated[0, ..., 1], [[0, 1 / 3, 1], [0, 0, 0.1]], rtol=1e-5, atol=1e-7)
  # An absent class is zeroed by the label.
  gated = np.asarray(cam.postprocess_pass(jnp.asarray(HAND_CAM), jnp.array([[1, 0]]), (2, 3)))
  np.testing.assert_array_equal(gated[0, ..., 1], np.zeros((2, 3)))


@pytest.mark.parametrize('labels, expected', [
    # (1,2): maps (0, .1) -> background .9**10 = .35 wins where all maps are low; (0,1): .5**10 loses to .5.
    ([1, 1], [[0, 0, 1], [2, 2, 2]]),
    # Class 1 absent: where only class 1 was active the pixel becomes background.
    ([1, 0], [[0, 0, 2], [2, 2, 2]]),
    # Class 0 absent: (0,0) has no active class left -> background; (0,1): 1/3 beats (2/3)**10 = .017.
    ([0, 1], [[2, 1, 1], [2, 2, 2]]),
])
def test_mask_rules_on_hand_made_cam(labels, expected):
  gated = cam.postprocess_pass(jnp.asarray(HAND_CAM), jnp.array([labels]), (2, 3))
  mask = cam.maps_to_mask(gated)
  assert mask.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(mask)[0], expected)
  np.testing.assert_array_equal(np.asarray(jnp.argmax(cam.maps_to_probs(gated), -1))[0], expected)


def test_background_power_changes_the_decision():
  maps = jnp.full((1, 1, 1, 2), 0.2)  # background (0.8)**p: beats 0.2 for p=1, loses for p=10
  assert int(cam.maps_to_mask(maps, background_power=1.0)[0, 0, 0]) == 2
  assert int(cam.maps_to_mask(maps, background_power=10.0)[0, 0, 0]) == 0


# ---------------------------------------------------------------- float64 NumPy reference of the pipeline


def np_resize_align_corners(x, out_h, out_w):
  """`[B, h, w, C]` -> `[B, out_h, out_w, C]`, bilinear with align_corners=True, pixel by pixel."""
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


def np_pipeline(class_map_np, images, labels, out_hw, factors, hflip, undo_flip=True, power=10.0):
  """The reference: per (flip, factor) pass forward, get_seg_label, de-augment; mean; background; argmax."""
  passes = []
  for flip in ((False, True) if hflip else (False,)):
    for factor in factors:
      x = images[:, :, ::-1] * factor if flip else images * factor
      m = np.maximum(class_map_np(x), 0)
      low, high = m.min(axis=(1, 2), keepdims=True), m.max(axis=(1, 2), keepdims=True)
      m = (m - low) / (high - low + 1e-6) * labels[:, None, None, :]
      m = np_resize_align_corners(m, *out_hw)
      passes.append(m[:, :, ::-1] if flip and undo_flip else m)
  maps = np.mean(passes, axis=0)
  background = (1 - maps.max(-1, keepdims=True)) ** power
  scores = np.concatenate([maps, background], -1)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return maps, np.argmax(probs, -1)


WEIGHTS = np.random.default_rng(0).normal(size=(3, 3))


def class_map_np(x):
  """Per-pixel linear map, then 2x2 average pool: `[N, 8, 8, 3]` -> `[N, 4, 4, 3]`; not flip invariant."""
  y = x @ WEIGHTS + 0.1 * np.arange(x.shape[2])[None, None, :, None]  # a column ramp breaks flip symmetry
  return y.reshape(y.shape[0], 4, 2, 4, 2, 3).mean(axis=(2, 4))


def class_map_fn(x):
  ramp = 0.1 * jnp.arange(x.shape[2], dtype=jnp.float32)[None, None, :, None]
  y = x @ jnp.asarray(WEIGHTS, jnp.float32) + ramp
  return y.reshape(y.shape[0], 4, 2, 4, 2, 3).mean(axis=(2, 4))


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 8, 8, 3))
  labels = np.array([[1, 0, 1], [1, 1, 1]])
  return images, labels


@pytest.mark.parametrize('passes_in_one_call', [True, False])
def test_tta_pipeline_matches_numpy(inputs, passes_in_one_call):
  images, labels = inputs
  factors = (0.9, 1.0, 1.1)
  expected_maps, expected_mask = np_pipeline(class_map_np, images, labels, (8, 8), factors, hflip=True)

  @jax.jit
  def run(images, labels):
    maps = cam.tta_class_maps(class_map_fn, images, labels, (8, 8), intensity_factors=factors, hflip=True,
                              passes_in_one_call=passes_in_one_call)
    return maps, cam.maps_to_mask(maps)

  maps, mask = run(jnp.asarray(images, jnp.float32), jnp.asarray(labels))
  np.testing.assert_allclose(np.asarray(maps), expected_maps, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(mask), expected_mask)
  composed = cam.cams_to_mask(class_map_fn, jnp.asarray(images, jnp.float32), jnp.asarray(labels),
                              intensity_factors=factors, passes_in_one_call=passes_in_one_call)
  np.testing.assert_array_equal(np.asarray(composed), expected_mask)

  # The comparison is sensitive to the flip handling: forgetting to un-flip changes the maps a lot.
  wrong_maps, _ = np_pipeline(class_map_np, images, labels, (8, 8), factors, hflip=True, undo_flip=False)
  assert np.abs(wrong_maps - expected_maps).max() > 1e-2


def test_tta_without_flip_and_single_factor_is_one_pass(inputs):
  images, labels = inputs
  images32, labels = jnp.asarray(images, jnp.float32), jnp.asarray(labels)
  maps = cam.tta_class_maps(class_map_fn, images32, labels, (8, 8), intensity_factors=(1.0,), hflip=False)
  np.testing.assert_allclose(np.asarray(maps),
                             np.asarray(cam.postprocess_pass(class_map_fn(images32), labels, (8, 8))),
                             rtol=1e-6, atol=1e-7)
  expected_maps, _ = np_pipeline(class_map_np, images, np.asarray(labels), (8, 8), (0.8, 1.2), hflip=False)
  for one_call in (True, False):
    maps = cam.tta_class_maps(class_map_fn, images32, labels, (8, 8), intensity_factors=(0.8, 1.2),
                              hflip=False, passes_in_one_call=one_call)
    np.testing.assert_allclose(np.asarray(maps), expected_maps, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the method's scores (the eval mask path)


def test_scores_fn_argmax_is_the_cam_mask_pipeline():
  """`train.make_scores_fn` (what the core's evaluation / predict argmax) against the mask pipeline composed
  from its parts: model input, level-`cam_level` merged CAMs, TTA + gating (`cams_to_mask`); unknown labels
  (-1) with gating 'none' are 'every class may be present'."""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from protoseg_jax import augment  # pylint: disable=g-import-not-at-top
  from protoseg_jax.methods.dualprotoseg import train  # pylint: disable=g-import-not-at-top
  from protoseg_jax.methods.dualprotoseg import method as method_lib  # pylint: disable=g-import-not-at-top
  from protoseg_jax.methods.dualprotoseg.model import DualProtoSeg  # pylint: disable=g-import-not-at-top

  config = tiny_config()
  method = method_lib.DualProtoSegMethod(config)
  model, eval_config, data = method.model, config.eval, config.data
  params, extra = method.init_variables(jax.random.key(0))
  bank = method.inference_statics(params, extra)
  tiles = jnp.asarray(np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), np.uint8))
  labels = jnp.asarray([[1, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 1]])

  @jax.jit
  def composed(labels):
    images = augment.to_model_input(tiles, data.mean, data.std, data.channel_order)
    class_map_fn = lambda x: model.apply({'params': params}, x, bank, eval_config.cam_level - 1,
                                         eval_config.merge, method=DualProtoSeg.class_maps)
    return cam.cams_to_mask(class_map_fn, images, labels,
                            intensity_factors=tuple(eval_config.intensity_factors), hflip=eval_config.hflip,
                            background_power=eval_config.background_power,
                            passes_in_one_call=eval_config.tta_in_one_batch)

  scores_fn = jax.jit(train.make_scores_fn(model, config))
  scores = np.asarray(scores_fn(params, extra, bank, tiles, labels))
  assert scores.shape == (3, 32, 32, 5)
  expected = np.asarray(composed(labels))
  assert len(np.unique(expected)) > 1
  np.testing.assert_array_equal(scores.argmax(-1), expected)
  unknown = np.asarray(scores_fn(params, extra, bank, tiles, jnp.full((3, 4), -1)))
  np.testing.assert_array_equal(unknown.argmax(-1), np.asarray(composed(jnp.ones((3, 4), jnp.int32))))
