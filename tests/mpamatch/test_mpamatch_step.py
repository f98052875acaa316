"""The jitted MPAMatch train step on a fixed batch: it learns, keeps the text tower frozen, updates BatchNorm
statistics and the prototype bank, compiles once; plus the model's shapes and config checks."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs import mpamatch_demo  # noqa: E402
from protoseg_jax import train_state  # noqa: E402
from protoseg_jax.errors import ConfigError  # noqa: E402
from protoseg_jax.methods.mpamatch import train  # noqa: E402
from protoseg_jax.methods.mpamatch.method import MPAMatchMethod  # noqa: E402


def tiny_config():
  config = mpamatch_demo.get_config()
  config.data.image_size = 32
  config.data.train_window = 32
  config.model.vit.update(width=32, depth=1, num_heads=2, pos_embed_grid=4, taps=(0,))
  config.model.update(bottleneck_channels=16, decoder_channels=(8, 8, 8), embed_level=1, embed_hidden=8,
                      embed_dim=16)
  config.model.text.update(width=16, depth=1, num_heads=2, embed_dim=16)
  config.train.update(labelled_batch_size=4, unlabelled_batch_size=4, learning_rate=3e-3,
                      encoder_learning_rate=3e-3)
  # A fixed batch: no geometric jitter, so only the strong views and CutMix vary between steps.
  config.data.weak.update(scale_range=(1.0, 1.0), hflip=False, vflip=False, rot90=False)
  return config


def fixed_batch(count=4, size=32):
  """`count` labelled tiles whose classes are colours on a 4 x 4 grid (learnable), `u` = them reversed."""
  rng = np.random.default_rng(0)
  y = np.zeros((count, size, size), np.uint8)
  for i in range(count):
    y[i] = rng.integers(0, 5, (4, 4)).repeat(size // 4, 0).repeat(size // 4, 1)
  palette = np.asarray([(240, 240, 240), (120, 40, 150), (230, 150, 190), (60, 20, 100), (200, 170, 190)])
  x = (palette[y] + rng.normal(0, 8, y.shape + (3,))).clip(0, 255).astype(np.uint8)
  u = x[::-1].copy()
  return {'x': x, 'y': y, 'u': u, 'u_ignore': np.zeros(y.shape, np.uint8)}


@pytest.fixture(scope='module')
def trained():
  config = tiny_config()
  method = MPAMatchMethod(config)
  params, extra = method.init_variables(jax.random.key(0))
  optimizer, schedules = method.optimizer(method.split_params(params)[0], total_steps=100)
  state = train_state.create_train_state(params, extra, optimizer, method)
  initial = jax.tree.map(np.asarray, state)
  step = jax.jit(method.train_step_fn(optimizer, schedules), donate_argnums=(0,))
  batch = fixed_batch()
  history = []
  for _ in range(25):
    state, metrics = step(state, batch, jax.random.key(1))
    history.append({k: float(v) for k, v in metrics.items()})
  return dict(config=config, model=method.model, initial=initial, state=state, history=history, step=step)


def test_loss_decreases_on_a_fixed_batch(trained):
  history = trained['history']
  first, last = history[0], history[-1]
  assert last['loss_x'] < 0.6 * first['loss_x'], (first, last)
  assert np.mean([h['loss'] for h in history[-3:]]) < 0.8 * first['loss'], [h['loss'] for h in history]
  for name in ('img', 'txt'):  # both prototype contrasts learn on the labelled pixels
    assert last[f'loss_{name}_lab'] < first[f'loss_{name}_lab']
  assert last['mask_ratio'] > 0.0  # confident pseudo-labels appear, so the unsupervised terms act
  assert all(np.isfinite(h['loss']) for h in history)


def test_reported_loss_is_the_composite_of_the_reported_terms(trained):
  """The step optimises `train.composite_loss` of the terms it reports (checked against float64 in
  test_mpamatch_losses.py)."""
  loss_config = trained['config'].loss
  for record in trained['history']:
    assert 'loss_img_unl' in record and 'loss_txt_lab' in record
    assert record['loss'] == pytest.approx(train.composite_loss(record, loss_config), rel=1e-6)


def test_text_tower_frozen_everything_else_moves(trained):
  initial, state = trained['initial'], trained['state']
  for before, after in zip(jax.tree.leaves(initial.frozen), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(before, np.asarray(after))
  for key in state.trainable:
    changed = [not np.array_equal(b, np.asarray(a)) for b, a in
               zip(jax.tree.leaves(initial.trainable[key]), jax.tree.leaves(state.trainable[key]))]
    assert all(changed), f'{key}: some leaves did not move'
  moved = [not np.array_equal(b, np.asarray(a)) for b, a in
           zip(jax.tree.leaves(initial.extra['batch_stats']), jax.tree.leaves(state.extra['batch_stats']))]
  assert all(moved)
  bank = state.extra['bank']
  assert np.asarray(bank.seen).all()
  np.testing.assert_allclose(np.linalg.norm(np.asarray(bank.prototypes), axis=1), 1.0, atol=1e-5)
  assert int(state.step) == 25
  assert trained['step']._cache_size() == 1


@pytest.mark.parametrize('strong_update', [False, True])
def test_running_statistics_come_from_the_weak_forward_unless_asked(trained, strong_update):
  """Default: BN running statistics = one EMA update with the [x; u_w] (+ FP) forward's batch statistics;
  `strong_views_update_bn_stats=True` (UniMatch's PyTorch behaviour) folds in the strong views too."""
  from protoseg_jax.methods.mpamatch import augment
  from protoseg_jax.methods.mpamatch.model import MPAMatchModel

  config, model = trained['config'], trained['model']
  config = config.copy_and_resolve_references()
  config.train.strong_views_update_bn_stats = strong_update
  _, prompt_ids = train.build_model(config)
  state = jax.tree.map(jnp.asarray, trained['initial'])
  optimizer, schedules = train.make_optimizer(config.train, state.trainable, total_steps=100)
  step = jax.jit(train.train_step_fn(model, config, prompt_ids, optimizer, schedules))
  batch = fixed_batch()
  new_state, _ = step(state, batch, jax.random.key(1))
  # The step's own keys: fold_in(rng, step) split in 5; the weak view is the identity here (tiny_config), the
  # FP dropout uses keys[4].
  keys = jax.random.split(jax.random.fold_in(jax.random.key(1), 0), 5)
  weak = augment.normalize(jnp.concatenate([batch['x'], batch['u']]).astype(jnp.float32) / 255.0,
                           config.data.mean, config.data.std)
  _, updates = model.apply({'params': state.params, 'batch_stats': state.extra['batch_stats']}, weak, True,
                           True, True, method=MPAMatchModel.segment, mutable=['batch_stats'],
                           rngs={'dropout': keys[4]})
  expected, got = jax.tree.leaves(updates['batch_stats']), jax.tree.leaves(new_state.extra['batch_stats'])
  if strong_update:
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(expected, got)) > 1e-4
  else:
    for want, have in zip(expected, got):
      np.testing.assert_allclose(np.asarray(have), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_model_shapes(trained):
  model, state = trained['model'], trained['state']
  images = jnp.zeros((2, 32, 32, 3))
  variables = {'params': state.params, 'batch_stats': state.extra['batch_stats']}
  logits, embeddings = model.apply(variables, images, False, method=type(model).segment)
  assert logits.shape == (2, 32, 32, 5)
  assert embeddings.shape == (2, 8, 8, 16)     # embed_level 1 of a patch-8 trunk: 1/4 resolution
  np.testing.assert_allclose(np.linalg.norm(np.asarray(embeddings), axis=-1), 1.0, atol=1e-5)


def test_full_size_parameter_count_and_shapes():
  """The published setting builds a UNI ViT-L/16 (303 M) TransUNet without allocating it."""
  from protoseg_jax.methods.mpamatch.config import get_config

  config = get_config()
  config.tokenizer.kind = 'bytes'
  model, prompt_ids = train.build_model(config)
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                                             jnp.zeros((1, 256, 256, 3)), jnp.asarray(prompt_ids)))
  count = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))
  params = shapes['params']
  assert count(params['encoder']) == pytest.approx(303.3e6, rel=0.01)
  assert params['encoder']['pos_embed'].shape == (1, 197, 1024)
  assert params['decoder']['conv_more']['conv']['kernel'].shape == (3, 3, 1024, 512)
  assert params['seg_head']['kernel'].shape == (3, 3, 16, 2)
  assert params['embed_head']['proj2']['kernel'].shape == (1, 1, 256, 512)
  assert params['prompt_learner']['ctx'].shape == (2, 4, 768)
  logits = jax.eval_shape(lambda p: model.apply(p, jnp.zeros((1, 256, 256, 3)), False,
                                                method=type(model).segment), shapes)[0]
  assert logits.shape == (1, 256, 256, 2)


def test_decoder_depth_must_match_patch_size():
  config = tiny_config()
  config.model.decoder_channels = (8, 8)
  with pytest.raises(ValueError, match='config.model.decoder_channels'):
    train.build_model(config)


def test_timm_encoder_import(tmp_path):
  """A timm-layout ViT state dict (as UNI's) lands in `encoder` / `encoder_norm` with transposed kernels."""
  from safetensors.numpy import save_file

  vit = train.segmenter_config(tiny_config()).vit
  rng = np.random.default_rng(0)
  width, hidden, patch = vit.width, int(vit.width * vit.mlp_ratio), vit.patch_size
  state = {'patch_embed.proj.weight': rng.normal(size=(width, 3, patch, patch)),
           'patch_embed.proj.bias': rng.normal(size=(width,)),
           'pos_embed': rng.normal(size=(1, 1 + vit.pos_embed_grid ** 2, width)),
           'cls_token': rng.normal(size=(1, 1, width)),
           'norm.weight': rng.normal(size=(width,)), 'norm.bias': rng.normal(size=(width,)),
           'head.weight': rng.normal(size=(3, width))}   # classifier: ignored
  for name, shape in (('norm1', (width,)), ('norm2', (width,))):
    state[f'blocks.0.{name}.weight'] = rng.normal(size=shape)
    state[f'blocks.0.{name}.bias'] = rng.normal(size=shape)
  for name, (out, inp) in (('attn.qkv', (3 * width, width)), ('attn.proj', (width, width)),
                           ('mlp.fc1', (hidden, width)), ('mlp.fc2', (width, hidden))):
    state[f'blocks.0.{name}.weight'] = rng.normal(size=(out, inp))
    state[f'blocks.0.{name}.bias'] = rng.normal(size=(out,))
  state = {key: value.astype(np.float32) for key, value in state.items()}
  path = str(tmp_path / 'uni.safetensors')
  save_file(state, path)
  loaded = train.load_timm_encoder(path, vit)
  np.testing.assert_array_equal(loaded['encoder_norm']['scale'], state['norm.weight'])
  np.testing.assert_array_equal(loaded['encoder']['blocks_0']['attn']['qkv']['kernel'],
                                state['blocks.0.attn.qkv.weight'].T)
  np.testing.assert_array_equal(loaded['encoder']['patch_embed']['kernel'],
                                state['patch_embed.proj.weight'].transpose(2, 3, 1, 0))
  with pytest.raises(ConfigError, match='config.backbone.path'):
    train.load_timm_encoder(str(tmp_path / 'missing.safetensors'), vit)


def test_conch_text_tower_is_loaded_for_training_and_for_restoring(tmp_path):
  """`backbone.text_source='conch'`: the frozen tower comes from the file, in training and when a checkpoint
  is restored (eval / predict rebuild the frozen part from the config)."""
  pytest.importorskip('torch')
  from safetensors.torch import save_file
  from torch_reference import OpenClipText, perturb_

  config = tiny_config()
  text_config = config.model.text
  text = OpenClipText(vocab=text_config.vocab_size, context=text_config.context_table,
                      width=text_config.width, heads=text_config.num_heads, layers=text_config.depth,
                      embed_dim=text_config.embed_dim)
  perturb_(text, 3)
  state = {f'text.{key}': value.contiguous() for key, value in text.state_dict().items()}
  path = str(tmp_path / 'conch.safetensors')
  save_file(state, path)
  config.backbone.update(text_source='conch', text_path=path)
  model, prompt_ids = train.build_model(config)
  params, _ = train.init_variables(config, model, prompt_ids, jax.random.key(0))
  frozen = MPAMatchMethod(config).frozen_params(jax.random.key(5))
  want = text.token_embedding.weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(params['text_encoder']['token_embedding']['embedding']), want)
  np.testing.assert_array_equal(np.asarray(frozen['text_encoder']['token_embedding']['embedding']), want)
  np.testing.assert_array_equal(np.asarray(params['text_encoder']['text_projection']),
                                text.text_projection.detach().numpy())
  config.backbone.text_path = str(tmp_path / 'missing.bin')
  with pytest.raises(FileNotFoundError, match='missing.bin'):
    train.init_variables(config, model, prompt_ids, jax.random.key(0))
