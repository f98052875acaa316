"""Position-table resampling against PyTorch's anti-aliased bicubic and timm's `resample_abs_pos_embed`,
and the ViT forward against timm's `dynamic_img_size=True` trunk (CONCH's set-up: 28x28 table, 224 input).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

from protoseg_jax.convert import torch_to_flax  # noqa: E402
from protoseg_jax.errors import ConfigError  # noqa: E402
from protoseg_jax.models import pos_embed  # noqa: E402
from protoseg_jax.models.vit import VitConfig, VisionTransformer  # noqa: E402
from torch_reference import perturb_  # noqa: E402

F = torch.nn.functional
SIZES = [(28, 14), (16, 14), (14, 7), (28, 10), (13, 5),     # downsampling, integer and not
         (14, 16), (14, 28), (7, 10), (3, 8)]                 # upsampling
TOL = dict(rtol=1e-5, atol=1e-5)


def tables(side, width=6, seed=0):
  """A random table and a smooth one (low-frequency cosines), `[1, 1 + side*side, width]` float32."""
  rng = np.random.default_rng(seed)
  noisy = rng.normal(size=(1, 1 + side * side, width)).astype(np.float32)
  y, x = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side), indexing='ij')
  phase = rng.uniform(0, 2 * np.pi, width)
  smooth = np.cos(2.0 * x[..., None] + 3.0 * y[..., None] + phase).reshape(1, side * side, width)
  smooth = np.concatenate([noisy[:, :1], smooth], axis=1).astype(np.float32)
  return noisy, smooth


def torch_interpolate(table, out_hw, **kwargs):
  side = int(round(np.sqrt(table.shape[1] - 1)))
  grid = torch.from_numpy(table[:, 1:]).reshape(1, side, side, -1).permute(0, 3, 1, 2)
  out = F.interpolate(grid, size=out_hw, align_corners=False, **kwargs)
  out = out.permute(0, 2, 3, 1).reshape(1, out_hw[0] * out_hw[1], -1).numpy()
  return np.concatenate([table[:, :1], out], axis=1)


@pytest.mark.parametrize('in_size,out_size', SIZES)
def test_matrix_is_torch_bicubic_antialias(in_size, out_size):
  # Each column of the identity, resampled by torch in float64, is a column of the weight matrix.
  eye = torch.eye(in_size, dtype=torch.float64).reshape(in_size, 1, 1, in_size)
  expected = F.interpolate(eye, size=(1, out_size), mode='bicubic', antialias=True, align_corners=False)
  expected = expected.reshape(in_size, out_size).T.numpy()
  weights = pos_embed.bicubic_antialias_matrix(in_size, out_size)
  np.testing.assert_allclose(weights, expected, rtol=0, atol=1e-12)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-12)
  # ... and it is not the plain (clamped, a = -0.75) bicubic nor bilinear.
  plain = F.interpolate(eye, size=(1, out_size), mode='bicubic', align_corners=False)
  assert np.abs(weights - plain.reshape(in_size, out_size).T.numpy()).max() > 1e-3


@pytest.mark.parametrize('in_size,out_size', SIZES)
def test_tables_match_torch_and_timm(in_size, out_size):
  out_hw = (out_size, out_size)
  for table in tables(in_size):
    expected = torch_interpolate(table, out_hw, mode='bicubic', antialias=True)
    timm_out = timm.layers.resample_abs_pos_embed(torch.from_numpy(table), list(out_hw),
                                                  num_prefix_tokens=1).numpy()
    np.testing.assert_allclose(timm_out, expected, rtol=1e-6, atol=1e-6)  # the referees agree
    host = pos_embed.resample_pos_embed(table, 1, out_hw)                 # NumPy in: float64 NumPy path
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    np.testing.assert_allclose(host, timm_out, **TOL)
    with jax.default_matmul_precision('highest'):
      device = jax.jit(pos_embed.resample_pos_embed, static_argnums=(1, 2))(jnp.asarray(table), 1, out_hw)
    np.testing.assert_allclose(np.asarray(device), timm_out, **TOL)
    bilinear = pos_embed.resample_pos_embed(table, 1, out_hw, method='bilinear')
    np.testing.assert_allclose(bilinear, torch_interpolate(table, out_hw, mode='bilinear'), **TOL)


def test_non_square_grid_and_no_prefix():
  _, table = tables(10, seed=1)
  grid_only = table[:, 1:]
  out = pos_embed.resample_pos_embed(grid_only, 0, (7, 4))
  expected = timm.layers.resample_abs_pos_embed(torch.from_numpy(grid_only), [7, 4], num_prefix_tokens=0)
  np.testing.assert_allclose(out, expected.numpy(), **TOL)
  assert pos_embed.resample_pos_embed(table, 1, (10, 10)) is table
  with pytest.raises(ValueError, match='pos_embed_resample'):
    pos_embed.resample_pos_embed(table, 1, (5, 5), method='bicubic')
  with pytest.raises(ConfigError, match=r"config.model.vit.pos_embed_resample is 'nearest'"):
    VitConfig(pos_embed_resample='nearest')


def tiny_dynamic_timm(width=32, depth=2, heads=2, seed=4):
  torch.manual_seed(seed)
  vit = timm.models.vision_transformer.VisionTransformer(
      img_size=448, patch_size=16, embed_dim=width, depth=depth, num_heads=heads, qkv_bias=True,
      class_token=True, global_pool='token', num_classes=0, dynamic_img_size=True).eval()
  perturb_(vit, seed)
  with torch.no_grad():  # a position table with structure at every scale
    vit.pos_embed.copy_(torch.randn(vit.pos_embed.shape, generator=torch.Generator().manual_seed(seed)))
  return vit


@pytest.mark.parametrize('image_hw', [(224, 224), (224, 160)])
def test_vit_forward_matches_timm_dynamic_img_size(image_hw):
  vit = tiny_dynamic_timm()
  state = {key: value.detach().numpy() for key, value in vit.state_dict().items()}
  config = VitConfig(patch_size=16, width=32, depth=2, num_heads=2, pos_embed_grid=28, taps=(0, 1))
  assert config.pos_embed_resample == 'bicubic_antialias'
  params = torch_to_flax.vit_from_timm(state, config)        # same grid: the table is taken as is
  np.testing.assert_array_equal(params['pos_embed'], state['pos_embed'])
  images = np.random.default_rng(5).normal(size=(2, *image_hw, 3)).astype(np.float32)
  with torch.no_grad():
    expected = vit.forward_intermediates(torch.from_numpy(images).permute(0, 3, 1, 2), indices=[0, 1],
                                         norm=False, output_fmt='NCHW', intermediates_only=True)
  expected = [tap.permute(0, 2, 3, 1).numpy() for tap in expected]
  with jax.default_matmul_precision('highest'):
    taps = VisionTransformer(config).apply({'params': params}, jnp.asarray(images))
    old = VisionTransformer(VitConfig(**{**config.__dict__, 'pos_embed_resample': 'bilinear'})).apply(
        {'params': params}, jnp.asarray(images))
  for tap, reference in zip(taps, expected):
    assert tap.shape == (2, image_hw[0] // 16, image_hw[1] // 16, 32)
    np.testing.assert_allclose(np.asarray(tap), reference, **TOL)
  # The old bilinear option is a different trunk input: the test above would catch a silent fallback.
  assert np.abs(np.asarray(old[0]) - expected[0]).max() > 1e-2


@pytest.mark.parametrize('method', ['bicubic_antialias', 'bilinear'])
def test_importer_resamples_with_the_configured_method(method):
  vit = tiny_dynamic_timm(depth=1)
  state = {key: value.detach().numpy() for key, value in vit.state_dict().items()}
  config = VitConfig(patch_size=16, width=32, depth=1, num_heads=2, pos_embed_grid=14, taps=(0,),
                     pos_embed_resample=method)
  params = torch_to_flax.vit_from_timm(state, config)  # file grid 28, config grid 14
  if method == 'bicubic_antialias':
    expected = timm.layers.resample_abs_pos_embed(vit.pos_embed.detach(), [14, 14], num_prefix_tokens=1)
    expected = expected.numpy()
  else:
    expected = torch_interpolate(state['pos_embed'], (14, 14), mode='bilinear')
  assert params['pos_embed'].dtype == np.float32 and params['pos_embed'].shape == (1, 197, 32)
  np.testing.assert_allclose(params['pos_embed'], expected, **TOL)


def test_published_config_resamples_like_timm():
  """`configs/bcss.py` -> `VitConfig` (through the method's config reader): the 28x28 CONCH table resampled
  to the 14x14 grid of a 224 input with timm's anti-aliased bicubic. Sizes other than the grid are shrunk."""
  from configs import bcss  # pylint: disable=g-import-not-at-top (tiny_config puts the repo root on sys.path)
  from protoseg_jax.methods.dualprotoseg import method as method_lib  # pylint: disable=g-import-not-at-top

  config = bcss.get_config()
  assert config.model.vit.pos_embed_resample == 'bicubic_antialias'
  vit_block = config.model.vit
  assert (vit_block.pos_embed_grid, vit_block.patch_size, config.data.image_size) == (28, 16, 224)
  config.model.vit.update(width=32, depth=2, num_heads=2, taps=(0, 1, 1, 1))
  vit_config = method_lib.model_config(config).vit
  assert vit_config.pos_embed_resample == 'bicubic_antialias' and vit_config.pos_embed_grid == 28
  vit = tiny_dynamic_timm()
  params = torch_to_flax.vit_from_timm({k: v.detach().numpy() for k, v in vit.state_dict().items()},
                                       vit_config)
  size = config.data.image_size
  images = np.random.default_rng(6).normal(size=(1, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    expected = vit.forward_intermediates(torch.from_numpy(images).permute(0, 3, 1, 2), indices=[1],
                                         norm=False, output_fmt='NCHW', intermediates_only=True)[0]
  with jax.default_matmul_precision('highest'):
    taps = VisionTransformer(vit_config).apply({'params': params}, jnp.asarray(images))
  assert taps[-1].shape == (1, 14, 14, 32)
  np.testing.assert_allclose(np.asarray(taps[-1]), expected.permute(0, 2, 3, 1).numpy(), **TOL)
