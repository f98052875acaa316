"""MPAMatch export: the safetensors file loads with strict=True into a PyTorch TransUNet (timm UNI trunk,
TransUNet decoder names) and gives the Flax segmenter's logits and pixel embeddings in eval mode; the trunk
file loads strictly into timm's ViT. Written through the core's atomic export (`exporting.export`), as
`--mode=export` does (the CLI round trip is in test_mpamatch_data.py)."""

import os
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
safetensors_torch = pytest.importorskip('safetensors.torch')

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: torch_reference

from protoseg_jax import exporting  # noqa: E402
from protoseg_jax.methods.mpamatch.method import MPAMatchMethod  # noqa: E402
from protoseg_jax.methods.mpamatch.model import MPAMatchModel  # noqa: E402
import torch_reference  # noqa: E402
from test_mpamatch_step import tiny_config  # noqa: E402


def perturbed(tree, seed, scale=0.05):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [leaf + scale * jax.random.normal(key, leaf.shape)
                                      for leaf, key in zip(leaves, keys)])


def test_segmenter_round_trip_through_torch(tmp_path):
  config = tiny_config()
  config.model.vit.layer_scale_init = 1e-5  # UNI has LayerScale: exported as ls1 / ls2 gammas
  method = MPAMatchMethod(config)
  model = method.model
  params, extra = method.init_variables(jax.random.key(0))
  # Off their initial values (unit scales, zero biases, identity adapter, zero / unit running statistics),
  # so a transposed or misplaced tensor cannot go unnoticed; running variances stay positive.
  params = perturbed(params, 1)
  batch_stats = jax.tree_util.tree_map_with_path(
      lambda path, leaf: (np.abs(leaf + 0.3 * np.random.default_rng(len(str(path))).normal(size=leaf.shape))
                          + 0.5 if 'var' in jax.tree_util.keystr(path) else
                          leaf + 0.1 * np.random.default_rng(len(str(path))).normal(size=leaf.shape)),
      extra['batch_stats'])
  out_dir = str(tmp_path / 'export')
  paths = exporting.export(method, params, {**extra, 'batch_stats': batch_stats}, out_dir)
  assert set(paths) == {'model', 'trunk', 'config'}
  assert sorted(os.listdir(tmp_path)) == ['export']  # no staging folder left behind
  assert all(os.path.dirname(path) == out_dir and os.path.isfile(path) for path in paths.values())

  cfg = model.config
  vit = cfg.vit
  trunk = timm.models.vision_transformer.VisionTransformer(
      img_size=config.data.image_size, patch_size=vit.patch_size, embed_dim=vit.width, depth=vit.depth,
      num_heads=vit.num_heads, qkv_bias=True, class_token=True, global_pool='token', num_classes=0,
      init_values=vit.layer_scale_init)
  text = torch_reference.OpenClipText(cfg.text.vocab_size, cfg.text.context_table, cfg.text.width,
                                      cfg.text.num_heads, cfg.text.depth, cfg.text.embed_dim, cls_emb=False)
  network = torch_reference.TransUNetUni(
      trunk, text, vit.width, cfg.bottleneck_channels, list(cfg.decoder_channels), cfg.num_classes,
      cfg.embed_level, cfg.embed_hidden, cfg.embed_dim, cfg.n_ctx, cfg.text.width)
  network.load_state_dict(safetensors_torch.load_file(paths['model']), strict=True)  # every key and shape
  network.eval()
  standalone = timm.models.vision_transformer.VisionTransformer(
      img_size=config.data.image_size, patch_size=vit.patch_size, embed_dim=vit.width, depth=vit.depth,
      num_heads=vit.num_heads, class_token=True, num_classes=0, init_values=vit.layer_scale_init)
  standalone.load_state_dict(safetensors_torch.load_file(paths['trunk']), strict=True)

  images = np.random.default_rng(0).normal(size=(2, config.data.image_size, config.data.image_size, 3))
  images = images.astype(np.float32)
  logits, embeddings = model.apply({'params': params, 'batch_stats': batch_stats}, images, False, False, True,
                                   method=MPAMatchModel.segment)
  with torch.no_grad():
    torch_logits, torch_embeddings = network(torch.from_numpy(images).permute(0, 3, 1, 2))
  np.testing.assert_allclose(torch_logits.permute(0, 2, 3, 1).numpy(), np.asarray(logits), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(torch_embeddings.permute(0, 2, 3, 1).numpy(), np.asarray(embeddings),
                             rtol=1e-4, atol=1e-4)
  assert float(np.abs(np.asarray(logits)).max()) > 1e-2  # a non-trivial comparison
