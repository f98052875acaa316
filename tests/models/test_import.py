"""Pretrained towers from files on disk: the torch-free checkpoint reader, and CONCH / HF CLIP / timm imports
through `DualProtoSegMethod.init_variables`, checked against torch models with the same random weights.
"""

import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
transformers = pytest.importorskip('transformers')

from protoseg_jax.convert import torch_files, torch_to_flax  # noqa: E402
from protoseg_jax.methods.dualprotoseg.method import DualProtoSegMethod  # noqa: E402
from protoseg_jax.methods.dualprotoseg.model import DualProtoSeg  # noqa: E402
from protoseg_jax.models.text import TextTransformer  # noqa: E402
from protoseg_jax.models.vit import VitConfig, VisionTransformer  # noqa: E402
import tiny_config  # noqa: E402
from torch_reference import OpenClipText, perturb_  # noqa: E402

F = torch.nn.functional


# --- the torch-free reader ------------------------------------------------------------------------------

def test_torch_zip_reader_matches_torch_load(tmp_path):
  generator = torch.Generator().manual_seed(0)
  state = {
      'linear.weight': torch.randn(4, 3, generator=generator),
      'transposed': torch.randn(3, 5, generator=generator).t(),          # non-contiguous strides
      'slice': torch.arange(20.0)[5:9],                                   # storage offset
      'shared_a': torch.arange(6.0), 'half': torch.randn(5, generator=generator).half(),
      'bf16': torch.randn(2, 3, generator=generator).bfloat16(), 'ids': torch.arange(4),
      'scalar': torch.tensor(2.5), 'flag': torch.tensor([True, False]),
  }
  state['shared_b'] = state['shared_a'].view(2, 3)                        # one storage, two views
  path = os.path.join(tmp_path, 'pytorch_model.bin')
  torch.save(state, path)
  loaded = torch_files.load_state_dict(path)
  reference = torch.load(path, weights_only=True)
  assert sorted(loaded) == sorted(reference)
  for name, tensor in reference.items():
    expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
    assert loaded[name].shape == expected.shape, name
    np.testing.assert_array_equal(np.asarray(loaded[name], expected.dtype), expected, err_msg=name)
  assert loaded['half'].dtype == np.float16 and loaded['ids'].dtype == np.int64
  assert str(loaded['bf16'].dtype) == 'bfloat16'


def test_torch_zip_reader_unwraps_and_refuses(tmp_path):
  module = torch.nn.Linear(2, 3)
  wrapped = os.path.join(tmp_path, 'wrapped.pt')
  torch.save({'state_dict': module.state_dict(), 'epoch': 7}, wrapped)
  assert sorted(torch_files.load_state_dict(wrapped)) == ['bias', 'weight']
  with pytest.raises(ValueError, match="no entry 'model'"):
    torch_files.load_state_dict(wrapped, key='model')
  pickled_module = os.path.join(tmp_path, 'module.pt')
  torch.save(module, pickled_module)
  with pytest.raises(ValueError, match=r'module\.pt: refusing to load torch\.nn\.modules\.linear\.Linear'):
    torch_files.load_state_dict(pickled_module)
  corrupt = os.path.join(tmp_path, 'corrupt.bin')
  with zipfile.ZipFile(wrapped) as source, zipfile.ZipFile(corrupt, 'w') as target:
    for item in source.namelist():
      if not item.endswith('data.pkl'):
        target.writestr(item, source.read(item))
  with pytest.raises(ValueError, match=r'corrupt\.bin: not a torch\.save archive'):
    torch_files.load_state_dict(corrupt)
  not_zip = os.path.join(tmp_path, 'old.bin')
  with open(not_zip, 'wb') as handle:
    handle.write(b'\x80\x02legacy')
  with pytest.raises(ValueError, match=r'old\.bin: neither safetensors nor a torch\.save zip'):
    torch_files.load_state_dict(not_zip)
  with pytest.raises(FileNotFoundError, match='missing.bin'):
    torch_files.load_state_dict(os.path.join(tmp_path, 'missing.bin'))


def tiny_timm_vit(image_size=64, width=64, depth=4, heads=4, seed=1, **kwargs):
  torch.manual_seed(seed)
  vit = timm.models.vision_transformer.VisionTransformer(
      img_size=image_size, patch_size=16, embed_dim=width, depth=depth, num_heads=heads, qkv_bias=True,
      class_token=True, global_pool='token', num_classes=0, **kwargs).eval()
  perturb_(vit, seed)
  return vit


def timm_taps(vit, images, taps):
  with torch.no_grad():
    out = vit.forward_intermediates(torch.from_numpy(images).permute(0, 3, 1, 2), indices=list(taps),
                                    norm=False, output_fmt='NCHW', intermediates_only=True)
  return [tap.permute(0, 2, 3, 1).numpy() for tap in out]


def tiny_config_for(vit_width=64, text_width=64, **backbone):
  config = tiny_config.get_config()
  config.model.vit.update(patch_size=16, width=vit_width, depth=4, num_heads=4, pos_embed_grid=4,
                          taps=(0, 1, 2, 3))
  config.model.text.update(vocab_size=300, context_table=48, context_length=40, width=text_width, depth=2,
                           num_heads=4, embed_dim=32)
  config.data.image_size = 64
  config.backbone.update(backbone)
  return config


def run_towers(config, images):
  method = DualProtoSegMethod(config)
  model = method.model
  params, extra = method.init_variables(jax.random.key(0))
  assert extra == {}
  with jax.default_matmul_precision('highest'):
    taps = model.apply({'params': params}, jnp.asarray(images), method=DualProtoSeg.trunk_taps)
  return model, params, np.asarray(taps)


def flax_text_features(model, params, ids):
  """The imported text tower on token ids `[N, L]` -> `[N, E]` (no prompt context)."""
  text_model = TextTransformer(model.config.text)
  variables = {'params': params['text_encoder']}
  with jax.default_matmul_precision('highest'):
    embeddings = text_model.apply(variables, jnp.asarray(ids), method=TextTransformer.embed)
    return np.asarray(text_model.apply(variables, embeddings, jnp.asarray(ids)))


def test_conch_checkpoint_imports_both_towers(tmp_path):
  vit = tiny_timm_vit()
  text = OpenClipText(vocab=300, context=48, width=64, heads=4, layers=2, embed_dim=32).eval()
  perturb_(text, 2)
  state = {f'visual.trunk.{k}': v for k, v in vit.state_dict().items()}
  state.update({f'text.{k}': v for k, v in text.state_dict().items()})
  # CoCa parts DualProtoSeg does not use must be accepted and ignored.
  state.update({'visual.attn_pool_contrast.query': torch.zeros(1, 32), 'visual.ln_contrast.weight':
                torch.ones(32), 'visual.proj_contrast': torch.zeros(32, 32), 'logit_scale': torch.tensor(1.0),
                'text_decoder.resblocks.0.ln_1.weight': torch.ones(64)})
  path = os.path.join(tmp_path, 'pytorch_model.bin')
  torch.save(state, path)
  config = tiny_config_for(source='conch', path=path)
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  model, params, taps = run_towers(config, images)
  for tap, expected in zip(taps, timm_taps(vit, images, (0, 1, 2, 3))):
    np.testing.assert_allclose(tap, expected, rtol=1e-5, atol=1e-5)

  ids = np.random.default_rng(1).integers(3, 300, (3, 20))
  with torch.no_grad():
    expected_text = text(torch.from_numpy(ids)).numpy()
  np.testing.assert_allclose(flax_text_features(model, params, ids), expected_text, rtol=1e-5, atol=1e-5)
  # The prompt context starts from the imported token table (plus the configured noise).
  from protoseg_jax.models import text as text_lib
  from protoseg_jax.tokenizer import ByteTokenizer
  tokenizer = ByteTokenizer()
  init_ids = [tokenizer.bos_id] + tokenizer.encode(config.prompts.context_init) + [tokenizer.eos_id]
  expected_ctx = text_lib.initial_context(text.token_embedding.weight.detach().numpy(), init_ids,
                                          model.config.num_classes, model.config.n_ctx,
                                          config.prompts.context_init_std,
                                          np.random.default_rng(config.seed))
  np.testing.assert_allclose(np.asarray(params['prompt_learner']['ctx']), expected_ctx, rtol=1e-6)

  surplus = {**state, 'visual.unexpected_head.weight': torch.zeros(2)}
  torch.save(surplus, path)
  with pytest.raises(ValueError, match="unexpected key 'visual.unexpected_head.weight'"):
    run_towers(config, images)
  missing = {k: v for k, v in state.items() if k != 'text.transformer.resblocks.1.mlp.c_fc.weight'}
  torch.save(missing, path)
  with pytest.raises(ValueError, match="'transformer.resblocks.1.mlp.c_fc.weight' is missing"):
    run_towers(config, images)
  wrong = {**state, 'text.ln_final.weight': torch.ones(48)}
  torch.save(wrong, path)
  with pytest.raises(ValueError, match=r"'ln_final.weight' has shape \(48,\)"):
    run_towers(config, images)


def test_hf_clip_folder_imports_vision_and_text(tmp_path):
  hf_config = transformers.CLIPConfig(
      text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=48, eos_token_id=299),
      vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         image_size=64, patch_size=16),
      projection_dim=32)
  torch.manual_seed(0)
  reference = transformers.CLIPModel(hf_config).eval()
  perturb_(reference, 5)
  reference.save_pretrained(tmp_path, safe_serialization=True)
  config = tiny_config_for(source='hf_clip', path=str(tmp_path))
  config.model.vit.update(pre_norm=True, activation='quick_gelu', layer_norm_eps=1e-5)
  config.model.text.update(activation='quick_gelu', causal_mask=True, pooling='eos')
  images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
  model, params, taps = run_towers(config, images)
  with torch.no_grad():
    hidden = reference.vision_model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
                                    output_hidden_states=True).hidden_states
  for index, tap in enumerate(taps):
    expected = hidden[index + 1][:, 1:].numpy().reshape(2, 4, 4, 64)
    np.testing.assert_allclose(tap, expected, rtol=1e-5, atol=1e-5)

  ids = np.random.default_rng(2).integers(3, 290, (2, 20))
  ids[:, -1] = 299
  with torch.no_grad():
    expected_text = reference.get_text_features(input_ids=torch.from_numpy(ids))
    expected_text = getattr(expected_text, 'pooler_output', expected_text).numpy()
  np.testing.assert_allclose(flax_text_features(model, params, ids), expected_text, rtol=1e-5, atol=1e-5)

  config.model.vit.width = 96
  with pytest.raises(ValueError, match=r'vision_config.hidden_size is 64 but config.model.vit.width is 96'):
    run_towers(config, images)


def test_timm_trunk_with_resized_position_table(tmp_path):
  vit = tiny_timm_vit(image_size=128)  # an 8x8 position grid in the file; the config asks for 4x4
  path = os.path.join(tmp_path, 'uni.safetensors')
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path)
  config = tiny_config_for(source='timm', path=path)
  images = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
  _, params, _ = run_towers(config, images)
  table = vit.pos_embed.detach()
  # Default: timm's resampling (anti-aliased bicubic, class token apart), as CONCH / UNI run it.
  expected = timm.layers.resample_abs_pos_embed(table, [4, 4], num_prefix_tokens=1).numpy()
  np.testing.assert_allclose(np.asarray(params['trunk']['pos_embed']), expected, rtol=1e-5, atol=1e-5)
  # The older bilinear option, explicitly.
  config.model.vit.pos_embed_resample = 'bilinear'
  _, params, _ = run_towers(config, images)
  grid = table[:, 1:].reshape(1, 8, 8, 64).permute(0, 3, 1, 2)
  resized = F.interpolate(grid, size=(4, 4), mode='bilinear', align_corners=False)
  expected = torch.cat([table[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 16, 64)], dim=1).numpy()
  np.testing.assert_allclose(np.asarray(params['trunk']['pos_embed']), expected, rtol=1e-6, atol=1e-6)
  # Same grid: taps equal timm's on its own input size.
  same = tiny_timm_vit(image_size=64, seed=3)
  save_file({k: v.contiguous() for k, v in same.state_dict().items()}, path)
  _, _, taps = run_towers(config, images)
  for tap, expected_tap in zip(taps, timm_taps(same, images, (0, 1, 2, 3))):
    np.testing.assert_allclose(tap, expected_tap, rtol=1e-5, atol=1e-5)


def test_backbone_config_errors_name_the_key(tmp_path):
  images = np.zeros((1, 64, 64, 3), np.float32)
  with pytest.raises(ValueError, match='config.backbone.source must be one of'):
    run_towers(tiny_config_for(source='conchh', path='x'), images)
  with pytest.raises(ValueError, match='config.backbone.path is empty'):
    run_towers(tiny_config_for(source='conch', path=''), images)
  with pytest.raises(FileNotFoundError, match='nope.bin'):
    run_towers(tiny_config_for(source='conch', path=os.path.join(tmp_path, 'nope.bin')), images)
  with pytest.raises(FileNotFoundError, match=r'no config.json'):
    run_towers(tiny_config_for(source='hf_clip', path=str(tmp_path)), images)
  with open(os.path.join(tmp_path, 'config.json'), 'w') as handle:
    handle.write('{}')
  with pytest.raises(FileNotFoundError, match=r'no model.safetensors or pytorch_model.bin'):
    run_towers(tiny_config_for(source='hf_clip', path=str(tmp_path)), images)


def test_converted_trunk_is_what_the_module_builds():
  config = VitConfig(patch_size=16, width=32, depth=2, num_heads=2, pos_embed_grid=2, taps=(1,),
                     pre_norm=True)
  built = VisionTransformer(config).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
      patch_size=16))
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  converted = torch_to_flax.vit_from_hf_clip(state, config, prefix='')  # a bare CLIPVisionModel
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  assert shapes(converted) == shapes(built)
