"""Export to PyTorch: the safetensors file loads with strict=True into torch modules built from the same
config (named as the reference `ClsNetwork`) and gives the Flax model's prototype scores; the trunk export
loads strictly into timm's ViT and gives the same block taps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
safetensors_torch = pytest.importorskip('safetensors.torch')

from protoseg_jax import builders, export, runtime  # noqa: E402
from protoseg_jax.models.dualprotoseg import DualProtoSeg  # noqa: E402
import tiny_config  # noqa: E402
import torch_reference  # noqa: E402


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  config = tiny_config.get_config()
  model, tokenizer, prompt_ids = runtime.model_and_prompts(config)
  params = runtime.initial_params(config, model, tokenizer, prompt_ids, jax.random.key(0))
  # Move every parameter off its initial value (GroupNorm scales of 1, zero biases ...), so that a
  # transposed or misplaced tensor cannot go unnoticed.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [leaf + 0.05 * jax.random.normal(key, leaf.shape)
                                        for leaf, key in zip(leaves, keys)])
  out_dir = tmp_path_factory.mktemp('export')
  paths = export.export(config, params, str(out_dir))
  return config, model, params, prompt_ids, paths


def test_full_network_round_trip(exported):
  config, model, params, prompt_ids, paths = exported
  cfg = builders.model_config(config)
  vit = cfg.vit
  trunk = timm.models.vision_transformer.VisionTransformer(
      img_size=vit.patch_size * vit.pos_embed_grid, patch_size=vit.patch_size, embed_dim=vit.width,
      depth=vit.depth, num_heads=vit.num_heads, qkv_bias=True, class_token=True, global_pool='token',
      num_classes=0)
  text_cfg = cfg.text
  extended_vocab = text_cfg.vocab_size + cfg.num_classes * cfg.n_ctx
  text = torch_reference.OpenClipText(extended_vocab, text_cfg.context_table, text_cfg.width,
                                      text_cfg.num_heads, text_cfg.depth, text_cfg.embed_dim, cls_emb=False)
  grid = config.data.image_size // vit.patch_size
  network = torch_reference.ClsNetwork(
      trunk, text, vit.taps, cfg.num_classes, cfg.prompts_per_class, cfg.n_ctx, cfg.feature_dim,
      cfg.refiner_width, cfg.refiner_blocks, cfg.group_norm_groups, list(cfg.pyramid_channels),
      [(grid * up, grid * up) for up in cfg.pyramid_upsample], visual_proj_dim=export.VISUAL_PROJECTION_DIM)
  state = safetensors_torch.load_file(paths['model'])
  network.load_state_dict(state, strict=True)  # every key, every shape
  network.eval()

  images = np.random.default_rng(0).normal(size=(2, config.data.image_size, config.data.image_size, 3))
  images = images.astype(np.float32)
  ids = torch_reference.soft_prompt_ids(prompt_ids, text_cfg.vocab_size, cfg.num_classes, cfg.n_ctx)
  with torch.no_grad():
    expected = network(torch.from_numpy(images).permute(0, 3, 1, 2), ids).numpy()
  with jax.default_matmul_precision('highest'):
    scores = model.apply({'params': params}, jnp.asarray(images), jnp.asarray(prompt_ids))
  np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5, atol=1e-5)
  # The learned context sits both in prompt_learner.ctx and in the appended token rows, as in the reference.
  np.testing.assert_array_equal(state['clip_adapter.model.text.token_embedding.weight'][-cfg.n_ctx:].numpy(),
                                np.asarray(params['prompt_learner']['ctx'])[-1])


def test_trunk_exports_as_a_strict_timm_vit(exported):
  config, model, params, _, paths = exported
  vit = builders.model_config(config).vit
  reference = timm.models.vision_transformer.VisionTransformer(
      img_size=vit.patch_size * vit.pos_embed_grid, patch_size=vit.patch_size, embed_dim=vit.width,
      depth=vit.depth, num_heads=vit.num_heads, qkv_bias=True, class_token=True, global_pool='token',
      num_classes=0)
  reference.load_state_dict(safetensors_torch.load_file(paths['trunk']), strict=True)
  reference.eval()
  images = np.random.default_rng(1).normal(size=(2, config.data.image_size, config.data.image_size, 3))
  images = images.astype(np.float32)
  unique = sorted(set(vit.taps))
  with torch.no_grad():
    expected = reference.forward_intermediates(torch.from_numpy(images).permute(0, 3, 1, 2), indices=unique,
                                               norm=False, output_fmt='NCHW', intermediates_only=True)
  with jax.default_matmul_precision('highest'):
    taps = model.apply({'params': params}, jnp.asarray(images), method=DualProtoSeg.trunk_taps)
  for index, tap in zip(vit.taps, np.asarray(taps)):
    np.testing.assert_allclose(tap, expected[unique.index(index)].permute(0, 2, 3, 1).numpy(), rtol=1e-5,
                               atol=1e-5)


def test_partial_trunk_is_refused(exported):
  config, _, params, _, _ = exported
  vit = builders.model_config(config).vit
  shallow = vit.__class__(**{**vit.__dict__, 'depth': vit.depth + 2})
  with pytest.raises(ValueError, match='the last tap .* is not the last block'):
    export.trunk_to_timm(params['trunk'], shallow)
