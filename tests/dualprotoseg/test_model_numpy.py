"""Refiner, pyramid, prototype bank, CAMs, scores and merges against a float64 NumPy re-computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protoseg_jax import ops
from protoseg_jax.methods.dualprotoseg.model import DualProtoSeg, DualProtoSegConfig
from protoseg_jax.models.text import TextConfig
from protoseg_jax.models.vit import VitConfig

NUM_CLASSES, PROMPTS, GRID, WIDTH = 2, 3, 4, 24


def tiny_config() -> DualProtoSegConfig:
  return DualProtoSegConfig(
      num_classes=NUM_CLASSES, prompts_per_class=PROMPTS, n_ctx=2,
      vit=VitConfig(patch_size=8, width=WIDTH, depth=2, num_heads=2, pos_embed_grid=GRID, taps=(0, 1, 1, 1)),
      text=TextConfig(vocab_size=40, context_table=12, context_length=12, width=16, depth=1, num_heads=2,
                      embed_dim=16),
      refiner_width=16, refiner_blocks=2, refiner_dropout=0.1, feature_dim=16, group_norm_groups=4,
      pyramid_channels=(8, 8, 4, 4), pyramid_upsample=(2, 3, 1, 5))


# ---------------------------------------------------------------------------------------------------
# float64 NumPy reference
def np_conv(x, kernel, bias=None):
  """NHWC, 'SAME' for odd kernels, kernel HWIO."""
  k = kernel.shape[0]
  pad = k // 2
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h, w = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for dy in range(k):
    for dx in range(k):
      out += np.einsum('bhwi,io->bhwo', xp[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
  return out if bias is None else out + bias


def np_group_norm(x, groups, scale, bias, eps=1e-5):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def np_silu(x):
  return x / (1 + np.exp(-x))


def np_normalize(x, axis=-1):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def np_resize_bilinear(x, out_h, out_w):
  """PyTorch align_corners=False bilinear by the textbook per-output-pixel formula."""
  b, h, w, c = x.shape
  out = np.zeros((b, out_h, out_w, c))
  for i in range(out_h):
    sy = max((i + 0.5) * h / out_h - 0.5, 0.0)
    y0 = min(int(np.floor(sy)), h - 1)
    y1 = min(y0 + 1, h - 1)
    ly = sy - y0
    for j in range(out_w):
      sx = max((j + 0.5) * w / out_w - 0.5, 0.0)
      x0 = min(int(np.floor(sx)), w - 1)
      x1 = min(x0 + 1, w - 1)
      lx = sx - x0
      out[:, i, j] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                      + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
  return out


def np_refiner(p, x, cfg):
  g = cfg.group_norm_groups
  gn = lambda y, name: np_group_norm(y, g, p[name]['scale'], p[name]['bias'])
  conv = lambda y, name: np_conv(y, p[name]['kernel'], p[name].get('bias'))
  x = np_silu(gn(conv(x, 'input_conv'), 'input_norm'))
  for i in range(cfg.refiner_blocks):
    y = np_silu(gn(conv(x, f'block{i}_conv1'), f'block{i}_norm1'))
    y = gn(conv(y, f'block{i}_conv2'), f'block{i}_norm2')
    x = np_silu(y + conv(x, f'block{i}_skip'))
  x = gn(conv(x, 'output_conv'), 'output_norm')
  return np_normalize(x)


def np_pyramid_level(p, x, cfg, upsample):
  g = cfg.group_norm_groups
  x = np_silu(np_group_norm(np_conv(x, p['conv1']['kernel']), g, p['norm1']['scale'], p['norm1']['bias']))
  x = np_silu(np_group_norm(np_conv(x, p['conv2']['kernel']), g, p['norm2']['scale'], p['norm2']['bias']))
  return np_normalize(np_resize_bilinear(x, x.shape[1] * upsample, x.shape[2] * upsample))


def np_bank(p, text_features):
  text = np_normalize(text_features @ p['text_proj']['kernel'] + p['text_proj']['bias'])
  image = np_normalize(p['learnable_image_prototypes'])
  bank = np.empty((2 * len(text), text.shape[1]))
  bank[0::2], bank[1::2] = text, image
  return np_normalize(bank)


def np_merge(x, how):
  g = x.reshape(*x.shape[:-1], NUM_CLASSES, -1)
  if how == 'mean':
    return g.mean(-1)
  e = np.exp(g - g.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True) * g).sum(-1)


# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def setup():
  cfg = tiny_config()
  model = DualProtoSeg(cfg)
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 40, (NUM_CLASSES * PROMPTS, 12)), jnp.int32)
  images = jnp.zeros((1, GRID * 8, GRID * 8, 3))
  params = jax.jit(model.init)({'params': jax.random.key(0)}, images, ids)['params']
  # Non-trivial norm affines so a mistake in them cannot hide.
  noise = np.random.default_rng(1)
  params = jax.tree.map(lambda leaf: jnp.asarray(leaf + 0.1 * noise.normal(size=leaf.shape), jnp.float32),
                        params)
  to64 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
  return cfg, model, params, to64(params)


def test_refiner_and_pyramid_match_numpy(setup):
  cfg, model, params, p64 = setup
  taps = np.random.default_rng(2).normal(size=(4, 2, GRID, GRID, WIDTH))
  with jax.default_matmul_precision('highest'):
    levels = model.apply({'params': params}, jnp.asarray(taps, jnp.float32), False,
                         method=DualProtoSeg.pyramid)
  for i, level in enumerate(levels):
    refined = np_refiner(p64['shared_decoder'], taps[i], cfg)
    expected = np_pyramid_level(p64[f'feature_pyramid_{i}'], refined, cfg, cfg.pyramid_upsample[i])
    assert level.shape == expected.shape
    np.testing.assert_allclose(np.asarray(level), expected, rtol=1e-4, atol=2e-5)


def test_bank_cams_scores_and_merges_match_numpy(setup):
  cfg, model, params, p64 = setup
  rng = np.random.default_rng(3)
  text_features = rng.normal(size=(NUM_CLASSES * PROMPTS, 16))
  pixel = [np_normalize(rng.normal(size=(2, GRID * u, GRID * u, c)))
           for c, u in zip(cfg.pyramid_channels, cfg.pyramid_upsample)]
  apply = lambda method, *args: model.apply({'params': params}, *args, method=method)
  with jax.default_matmul_precision('highest'):
    bank = apply(DualProtoSeg.prototype_bank, jnp.asarray(text_features, jnp.float32))
    pixel32 = [jnp.asarray(x, jnp.float32) for x in pixel]
    scores = apply(DualProtoSeg.prototype_scores, pixel32, bank)
    cams = [apply(DualProtoSeg.level_cam, pixel32[i], bank, i) for i in range(4)]
  expected_bank = np_bank(p64, text_features)
  np.testing.assert_allclose(np.asarray(bank), expected_bank, rtol=1e-5, atol=1e-6)
  for i in range(4):
    prototypes = np_normalize(expected_bank @ p64[f'proto_projections_{i}']['kernel'])
    expected_cam = p64[f'logit_scale{i + 1}'] * np.einsum('bhwc,pc->bhwp', pixel[i], prototypes)
    np.testing.assert_allclose(np.asarray(cams[i]), expected_cam, rtol=1e-4, atol=1e-4)
    # The scores come from the mean-feature shortcut; the reference averages the materialised CAM.
    np.testing.assert_allclose(np.asarray(scores[i]), expected_cam.mean(axis=(1, 2)), rtol=1e-4, atol=1e-4)
    for how in ('mean', 'max'):
      np.testing.assert_allclose(np.asarray(ops.merge_prototypes(cams[i], NUM_CLASSES, how)),
                                 np_merge(expected_cam, how), rtol=1e-4, atol=1e-4)


def test_bank_is_interleaved_text_then_image(setup):
  """Prototype 2k is the k-th text prototype, 2k+1 the k-th image prototype."""
  cfg, model, params, p64 = setup
  text_features = np.random.default_rng(4).normal(size=(NUM_CLASSES * PROMPTS, 16))
  with jax.default_matmul_precision('highest'):
    bank = np.asarray(model.apply({'params': params}, jnp.asarray(text_features, jnp.float32),
                                  method=DualProtoSeg.prototype_bank))
  np.testing.assert_allclose(bank[1::2], np_normalize(p64['learnable_image_prototypes']), rtol=1e-5,
                             atol=1e-6)
  assert bank.shape == (cfg.num_prototypes, cfg.feature_dim)
