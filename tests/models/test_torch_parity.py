"""ViT trunk and text tower against independent PyTorch implementations (timm, transformers).

Tiny random torch models are written to disk in their real formats, read back, converted, and run on the
same inputs; outputs must agree to 1e-5 (f32, highest matmul precision).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
transformers = pytest.importorskip('transformers')

from protoseg_jax.convert import torch_to_flax  # noqa: E402
from protoseg_jax.models.text import TextConfig, TextTransformer  # noqa: E402
from protoseg_jax.models.vit import VisionTransformer, VitConfig  # noqa: E402
from torch_reference import perturb_  # noqa: E402


def numpy_state(state_dict):
  return {key: value.detach().cpu().numpy() for key, value in state_dict.items()}


@pytest.mark.parametrize('layer_scale', [None, 1e-5])
def test_vit_taps_match_timm(tmp_path, layer_scale):
  torch.manual_seed(0)
  reference = timm.models.vision_transformer.VisionTransformer(
      img_size=64, patch_size=16, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0, qkv_bias=True,
      class_token=True, global_pool='token', num_classes=0, init_values=layer_scale).eval()
  perturb_(reference, 1)
  path = os.path.join(tmp_path, 'vit.pth')
  torch.save(reference.state_dict(), path)
  state = numpy_state(torch.load(path, map_location='cpu', weights_only=True))
  config = VitConfig(patch_size=16, width=64, depth=4, num_heads=4, pos_embed_grid=4,
                     layer_scale_init=layer_scale, taps=(1, 3))
  params = torch_to_flax.vit_from_timm(state, config)
  images = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    expected = reference.forward_intermediates(torch.from_numpy(images).permute(0, 3, 1, 2), indices=[1, 3],
                                               norm=False, output_fmt='NCHW', intermediates_only=True)
  with jax.default_matmul_precision('highest'):
    taps = VisionTransformer(config).apply({'params': params}, jnp.asarray(images))
  for tap, reference_tap in zip(taps, expected):
    np.testing.assert_allclose(np.asarray(tap), reference_tap.permute(0, 2, 3, 1).numpy(), rtol=1e-5,
                               atol=1e-5)


def test_vit_converter_names_the_bad_key():
  reference = timm.models.vision_transformer.VisionTransformer(
      img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=0)
  state = numpy_state(reference.state_dict())
  config = VitConfig(patch_size=16, width=32, depth=1, num_heads=2, pos_embed_grid=2, taps=(0,))
  torch_to_flax.vit_from_timm(state, config)  # the unmodified dict converts
  with pytest.raises(ValueError, match="'blocks.0.attn.proj.weight' is missing"):
    torch_to_flax.vit_from_timm({k: v for k, v in state.items() if k != 'blocks.0.attn.proj.weight'}, config)
  with pytest.raises(ValueError, match="unexpected key 'blocks.0.extra'"):
    torch_to_flax.vit_from_timm({**state, 'blocks.0.extra': np.zeros(3)}, config)
  with pytest.raises(ValueError, match=r"'pos_embed' has shape \(1, 5, 24\), not a square position table"):
    torch_to_flax.vit_from_timm({**state, 'pos_embed': np.zeros((1, 5, 24), np.float32)}, config)


@pytest.mark.parametrize('activation', ['quick_gelu', 'gelu'])
def test_text_tower_matches_transformers_clip(tmp_path, activation):
  from safetensors.numpy import load_file

  hf_config = transformers.CLIPTextConfig(vocab_size=300, hidden_size=64, intermediate_size=256,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          max_position_embeddings=32, hidden_act=activation,
                                          projection_dim=48, eos_token_id=299)
  torch.manual_seed(0)
  reference = transformers.CLIPTextModelWithProjection(hf_config).eval()
  perturb_(reference, 3)
  reference.save_pretrained(tmp_path, safe_serialization=True)
  state = load_file(os.path.join(tmp_path, 'model.safetensors'))
  config = TextConfig(vocab_size=300, context_table=32, context_length=12, width=64, depth=2, num_heads=4,
                      embed_dim=48, layer_norm_eps=hf_config.layer_norm_eps, activation=activation,
                      causal_mask=True, pooling='eos')
  params = torch_to_flax.text_from_hf_clip(state, config)
  rng = np.random.default_rng(4)
  ids = rng.integers(3, 290, (3, 12))
  ids[:, 0] = 1
  ids[0, 5], ids[1, 11], ids[2, 8] = 299, 299, 299  # EOS = the largest id, as in CLIP's vocabularies
  ids[0, 6:] = 0
  with torch.no_grad():
    expected = reference(input_ids=torch.from_numpy(ids)).text_embeds.numpy()
  model = TextTransformer(config)
  flax_ids = ids  # HF pools at the first eos_token_id, ours at argmax(ids): the same position here
  with jax.default_matmul_precision('highest'):
    embeddings = model.apply({'params': params}, jnp.asarray(flax_ids), method=TextTransformer.embed)
    out = model.apply({'params': params}, embeddings, jnp.asarray(flax_ids))
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_reference_quirk_mode_differs_from_clip_mode():
  base = TextConfig(vocab_size=50, context_table=8, context_length=8, width=16, depth=1, num_heads=2,
                    embed_dim=8)
  quirk = TextTransformer(base)
  clip = TextTransformer(TextConfig(**{**base.__dict__, 'causal_mask': True, 'pooling': 'eos'}))
  ids = jnp.asarray([[1, 5, 6, 49, 0, 0, 0, 0]])
  params = quirk.init(jax.random.key(0), ids, method=lambda module, ids: module(module.embed(ids), ids))
  embeddings = quirk.apply(params, ids, method=TextTransformer.embed)
  assert not np.allclose(np.asarray(quirk.apply(params, embeddings, ids)),
                         np.asarray(clip.apply(params, embeddings, ids)), atol=1e-4)
