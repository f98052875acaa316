"""Export to PyTorch: the safetensors file loads with strict=True into torch modules built from the same
config (named and registered as the reference `ClsNetwork`, incl. the prompt learner's second registration
of the CONCH model and the text-prototype buffers) and gives the Flax model's prototype scores; the trunk
export loads strictly into timm's ViT and gives the same block taps; `export_config.json` records the
channel order."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
safetensors_torch = pytest.importorskip('safetensors.torch')

from protoseg_jax import exporting  # noqa: E402
from protoseg_jax.convert import to_torch  # noqa: E402
from protoseg_jax.methods.dualprotoseg import export as export_lib  # noqa: E402
from protoseg_jax.methods.dualprotoseg.method import DualProtoSegMethod  # noqa: E402
from protoseg_jax.methods.dualprotoseg.model import DualProtoSeg  # noqa: E402
import tiny_config  # noqa: E402
import torch_reference  # noqa: E402

ALIAS, MODEL = 'clip_adapter.prompt_learner.model_conch.', 'clip_adapter.model.'


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  config = tiny_config.get_config()
  method = DualProtoSegMethod(config)
  initial, extra = method.init_variables(jax.random.key(0))
  # Move every parameter off its initial value (GroupNorm scales of 1, zero biases, the prompt context ...),
  # so that a transposed or misplaced tensor cannot go unnoticed.
  leaves, treedef = jax.tree.flatten(initial)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(treedef, [leaf + 0.05 * jax.random.normal(key, leaf.shape)
                                        for leaf, key in zip(leaves, keys)])
  out_dir = tmp_path_factory.mktemp('run') / 'export'
  paths = exporting.export(method, params, extra, str(out_dir))
  return dict(config=config, method=method, initial=initial, params=params, paths=paths)


def reference_network(method):
  cfg, config = method.model_config, method.config
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
  return torch_reference.ClsNetwork(
      trunk, text, vit.taps, cfg.num_classes, cfg.prompts_per_class, cfg.n_ctx, cfg.feature_dim,
      cfg.refiner_width, cfg.refiner_blocks, cfg.group_norm_groups, list(cfg.pyramid_channels),
      [(grid * up, grid * up) for up in cfg.pyramid_upsample],
      visual_proj_dim=export_lib.VISUAL_PROJECTION_DIM)


def test_full_network_round_trip(exported):
  config, method, params, paths = (exported[k] for k in ('config', 'method', 'params', 'paths'))
  cfg, model, prompt_ids = method.model_config, method.model, method.prompt_ids
  network = reference_network(method)
  state = safetensors_torch.load_file(paths['model'])
  result = network.load_state_dict(state, strict=True)  # every key, every shape
  assert not result.missing_keys and not result.unexpected_keys
  assert set(state) == set(network.state_dict())
  network.eval()

  images = np.random.default_rng(0).normal(size=(2, config.data.image_size, config.data.image_size, 3))
  images = images.astype(np.float32)
  ids = torch_reference.soft_prompt_ids(prompt_ids, cfg.text.vocab_size, cfg.num_classes, cfg.n_ctx)
  with torch.no_grad():
    expected = network(torch.from_numpy(images).permute(0, 3, 1, 2), ids).numpy()
  with jax.default_matmul_precision('highest'):
    scores = model.apply({'params': params}, jnp.asarray(images), jnp.asarray(prompt_ids))
  np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5, atol=1e-5)
  # The learned context sits both in prompt_learner.ctx and in the appended token rows, as in the reference.
  np.testing.assert_array_equal(state[MODEL + 'text.token_embedding.weight'][-cfg.n_ctx:].numpy(),
                                np.asarray(params['prompt_learner']['ctx'])[-1])


def test_prompt_learner_alias_is_the_conch_model(exported):
  state = safetensors_torch.load_file(exported['paths']['model'])
  model_keys = sorted(key[len(MODEL):] for key in state if key.startswith(MODEL))
  alias_keys = sorted(key[len(ALIAS):] for key in state if key.startswith(ALIAS))
  assert model_keys and alias_keys == model_keys
  for key in model_keys:
    torch.testing.assert_close(state[ALIAS + key], state[MODEL + key], rtol=0, atol=0, msg=key)


def test_prototype_buffers_are_the_initial_text_features(exported):
  """`prototypes` / `class_prototypes`: the reference's construction-time `encode_text(normalize=True)`, i.e.
  the text tower on the prompts with the *initial* context (not the trained one), recomputed in torch."""
  config, method, initial, params = (exported[k] for k in ('config', 'method', 'initial', 'params'))
  cfg, tokenizer = method.model_config, method.tokenizer
  network = reference_network(method)
  state = safetensors_torch.load_file(exported['paths']['model'])
  network.load_state_dict(state, strict=True)
  network.eval()
  # The reference's ConchPromptLearner: rows 1..n_ctx of the BOS/EOS tokenisation of the init phrase padded
  # by repeating its last id to n_ctx + 2, from the frozen token table, plus per-class noise. The noise is a
  # random draw: read it off the unperturbed initial parameters (table rows there vs. their context).
  ids = [tokenizer.bos_id] + tokenizer.encode(config.prompts.context_init) + [tokenizer.eos_id]
  ids = (ids + [ids[-1]] * (cfg.n_ctx + 2))[1:cfg.n_ctx + 1]
  rows = lambda p: np.asarray(p['text_encoder']['token_embedding']['embedding'], np.float64)[ids]
  noise = np.asarray(initial['prompt_learner']['ctx'], np.float64) - rows(initial)[None]
  assert 0.005 < noise.std() < 0.05                    # config.prompts.context_init_std = 0.02
  initial_ctx = torch.from_numpy((rows(params)[None] + noise).astype(np.float32))
  soft_ids = torch_reference.soft_prompt_ids(method.prompt_ids, cfg.text.vocab_size, cfg.num_classes,
                                             cfg.n_ctx)
  with torch.no_grad():
    features, class_features = network.encode_text(soft_ids, initial_ctx)
    trained_features, _ = network.encode_text(soft_ids)
  assert state['prototypes'].shape == (cfg.num_classes * cfg.prompts_per_class, cfg.text.embed_dim)
  assert state['class_prototypes'].shape == (cfg.num_classes, cfg.text.embed_dim)
  torch.testing.assert_close(state['prototypes'], features, rtol=1e-5, atol=1e-5)
  torch.testing.assert_close(state['class_prototypes'], class_features, rtol=1e-5, atol=1e-5)
  # The buffers are not the trained context's features (the test would catch that mix-up).
  assert (state['prototypes'] - trained_features).abs().max() > 1e-3


def test_export_config_records_channel_order(exported, tmp_path):
  config = exported['config']
  with open(exported['paths']['config']) as handle:
    written = json.load(handle)
  assert config.data.channel_order == 'bgr'          # the published default
  assert written['channel_order'] == 'bgr' and written['config']['data']['channel_order'] == 'bgr'
  assert written['normalisation']['mean'] == list(config.data.mean)
  rgb = tiny_config.get_config()
  rgb.data.channel_order = 'rgb'
  cfg = DualProtoSegMethod(rgb).model_config
  features = np.ones((cfg.num_classes * cfg.prompts_per_class, cfg.text.embed_dim), np.float32)
  paths = export_lib.write(rgb, cfg, exported['params'], features, str(tmp_path))
  with open(paths['config']) as handle:
    assert json.load(handle)['channel_order'] == 'rgb'


def test_trunk_exports_as_a_strict_timm_vit(exported):
  config, method, params, paths = (exported[k] for k in ('config', 'method', 'params', 'paths'))
  vit = method.model_config.vit
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
    taps = method.model.apply({'params': params}, jnp.asarray(images), method=DualProtoSeg.trunk_taps)
  for index, tap in zip(vit.taps, np.asarray(taps)):
    np.testing.assert_allclose(tap, expected[unique.index(index)].permute(0, 2, 3, 1).numpy(), rtol=1e-5,
                               atol=1e-5)


def test_partial_trunk_is_refused(exported):
  vit = exported['method'].model_config.vit
  shallow = vit.__class__(**{**vit.__dict__, 'depth': vit.depth + 2})
  with pytest.raises(ValueError, match='the last tap .* is not the last block'):
    to_torch.trunk_to_timm(exported['params']['trunk'], shallow)
