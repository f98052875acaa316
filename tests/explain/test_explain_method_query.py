"""A free-text query through a method's text path equals its class prompt: the class's text-prototype map.

DualProtoSeg: a query with class c's learned context and one of c's phrases reproduces that text prototype's
CAM channel / logit scale at the query level. MPAMatch: with class c's context and its class name, the
cosine with its text prototype over the embedding map. Tiny random models with fixed seeds.
"""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from protoseg_jax import ops, registry
from protoseg_jax.errors import ConfigError
from protoseg_jax.explain import prototype_map as pm
from protoseg_jax.methods.dualprotoseg import train as dps_train
from protoseg_jax.methods.dualprotoseg.model import DualProtoSeg
from protoseg_jax.methods.mpamatch.model import MPAMatchModel
from protoseg_jax.methods.mpamatch.prototypes import PrototypeBank
from protoseg_jax.models import text as text_lib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configs import mpamatch_demo  # noqa: E402  pylint: disable=g-import-not-at-top


def with_query(config: ml_collections.ConfigDict, **values) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.query.update(values)
  return config


@pytest.fixture(scope='module')
def dualprotoseg():
  config = tiny_config()
  method = registry.build(config)
  params, extra = jax.jit(method.random_variables)(jax.random.key(3))
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
  bank = method.inference_statics(params, extra)
  return config, method, params, extra, bank, images


def text_prototype_maps(method, params, bank, images, level: int, indices) -> np.ndarray:
  """Reference: the CAM channels of bank positions `indices` at 0-based `level`, divided by the logit scale."""
  features = method.model.apply({'params': params}, dps_train.model_input(images, method.config.data), level,
                                method=DualProtoSeg.level_features)
  cam = method.model.apply({'params': params}, features, bank, level, method=DualProtoSeg.level_cam)
  return np.asarray(cam[..., list(indices)] / params[f'logit_scale{level + 1}'])


@pytest.mark.parametrize('level', [4, 2])
def test_dualprotoseg_query_with_class_context_is_the_class_text_prototype_map(dualprotoseg, level):
  config, _, params, extra, bank, images = dualprotoseg
  c, per_class = 2, config.model.prompts_per_class
  method = registry.build(with_query(config, context=config.data.class_names[c], level=level))
  phrases = list(config.prompts.phrases[c])
  sims = jax.jit(method.query_fn())(params, extra, bank, jnp.asarray(method.phrase_token_ids(phrases)), images)
  # Interleaved bank: class c's text prototype j sits at 2 (c M + j).
  reference = text_prototype_maps(method, params, bank, images, level - 1,
                                  [2 * (c * per_class + j) for j in range(per_class)])
  assert sims.shape == reference.shape and sims.shape[-1] == per_class
  np.testing.assert_allclose(np.asarray(sims), reference, rtol=0, atol=1e-5)
  # Another class's context changes the map: the context is what makes the prompt the class's.
  other = registry.build(with_query(config, context=config.data.class_names[0], level=level))
  moved = jax.jit(other.query_fn())(params, extra, bank, jnp.asarray(other.phrase_token_ids(phrases)), images)
  assert np.max(np.abs(np.asarray(moved) - reference)) > 1e-3


def test_dualprotoseg_bank_renormalisation_is_a_no_op_on_unit_rows(dualprotoseg):
  _, method, params, _, bank, _ = dualprotoseg
  features = method.model.apply({'params': params}, jnp.asarray(method.prompt_ids),
                                method=DualProtoSeg.text_features)
  text_prototypes = method.model.apply({'params': params}, features,
                                       method=lambda model, t: ops.l2_normalize(model.text_proj(t)))
  np.testing.assert_allclose(np.asarray(bank[0::2]), np.asarray(text_prototypes), rtol=0, atol=2.5e-7)


def test_dualprotoseg_contexts_init_mean_and_class(dualprotoseg):
  config, method, params, _, _, _ = dualprotoseg
  table = np.asarray(params['text_encoder']['token_embedding']['embedding'])
  init_ids = [method.tokenizer.bos_id] + method.tokenizer.encode(config.prompts.context_init) + [
      method.tokenizer.eos_id]
  expected = text_lib.initial_context(table, init_ids, 1, config.model.n_ctx, 0.0, np.random.default_rng(0))[0]
  np.testing.assert_array_equal(np.asarray(method.query_context_fn()(params)), expected)   # default 'init'
  ctx = np.asarray(params['prompt_learner']['ctx'])
  mean = registry.build(with_query(config, context='mean')).query_context_fn()(params)
  np.testing.assert_allclose(np.asarray(mean), ctx.mean(axis=0), rtol=0, atol=1e-7)
  named = registry.build(with_query(config, context='LYM')).query_context_fn()(params)
  np.testing.assert_array_equal(np.asarray(named), ctx[2])
  with pytest.raises(ConfigError, match=r"^config.query.context='lym' must be 'init', 'mean' or a class name "
                     r'\(TUM, STR, LYM, NEC\)$'):
    registry.build(with_query(config, context='lym')).query_fn()
  with pytest.raises(ConfigError, match=r'^config.query.level=5 is not a pyramid level \(1..4\)$'):
    registry.build(with_query(config, level=5)).query_fn()


def test_dualprotoseg_prototype_infos_follow_the_interleaved_bank(dualprotoseg):
  config, method, *_ = dualprotoseg
  infos = method.prototype_infos()
  per_class = config.model.prompts_per_class
  assert len(infos) == method.model_config.num_prototypes == 2 * 4 * per_class
  for info in infos:
    c, g = divmod(info.index, 2 * per_class)
    assert (info.class_index, info.class_name) == (c, config.data.class_names[c])
    assert (info.kind, info.number) == (('text', 'image')[g % 2], g // 2)
    assert info.phrase == (config.prompts.phrases[c][g // 2] if g % 2 == 0 else None)
  assert len({info.color for info in infos}) == len(infos)


@pytest.fixture(scope='module')
def mpamatch():
  config = mpamatch_demo.get_config()
  method = registry.build(config)
  params, extra = jax.jit(method.random_variables)(jax.random.key(5))
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.integers(0, 256, (2, 64, 64, 3)), jnp.uint8)
  rows = rng.normal(size=(len(config.data.class_names), config.model.embed_dim))
  extra = {**extra, 'bank': PrototypeBank(jnp.asarray(rows / np.linalg.norm(rows, axis=1, keepdims=True),
                                                       jnp.float32), jnp.ones(len(rows), bool))}
  return config, method, params, extra, images


def test_mpamatch_query_with_class_context_is_the_class_text_prototype_map(mpamatch):
  config, _, params, extra, images = mpamatch
  c = 2
  name = config.data.class_names[c]
  method = registry.build(with_query(config, context=name))
  sims = jax.jit(method.query_fn())(params, extra, (), jnp.asarray(method.phrase_token_ids([name])), images)
  embeddings = method._embeddings(params, extra, images)  # pylint: disable=protected-access
  text = method.model.apply({'params': params}, jnp.asarray(method.prompt_ids),
                            method=MPAMatchModel.text_prototypes)
  reference = np.einsum('bhwe,e->bhw', np.asarray(embeddings, np.float64), np.asarray(text[c], np.float64))
  assert sims.shape == (2, 16, 16, 1)
  np.testing.assert_allclose(np.asarray(sims[..., 0]), reference, rtol=0, atol=1e-5)
  with pytest.raises(ConfigError, match="context starts random"):
    registry.build(with_query(config, context='init')).query_fn()
  with pytest.raises(ConfigError, match=r'^config.query.level=2: MPAMatch has one feature level'):
    registry.build(with_query(config, level=2)).query_fn()


def test_mpamatch_prototype_map_is_the_closer_of_the_class_text_and_image_prototype(mpamatch):
  config, method, params, extra, images = mpamatch
  num_classes = len(config.data.class_names)
  infos = method.prototype_infos()
  assert [(info.class_index, info.kind, info.phrase) for info in infos] == [
      (c, kind, name if kind == 'text' else None) for c, name in enumerate(config.data.class_names)
      for kind in ('text', 'image')]
  labels = jnp.full((2, num_classes), -1, jnp.int32)
  proto_map = np.asarray(jax.jit(method.prototype_map_fn('predict'))(params, extra, (), images, labels))
  predicted = np.argmax(np.asarray(method.scores_fn('predict')(params, extra, (), images, labels)), axis=-1)
  embeddings = method._embeddings(params, extra, images)  # pylint: disable=protected-access
  text = method.model.apply({'params': params}, jnp.asarray(method.prompt_ids),
                            method=MPAMatchModel.text_prototypes)
  image = np.asarray(extra['bank'].prototypes)
  rows = ops.bilinear_matrix(16, 64, True)
  resized = lambda p: np.einsum('oh,bhw,pw->bop', rows, np.einsum('bhwe,e->bhw', np.asarray(embeddings), p), rows)
  cams = np.stack([resized(np.asarray(v)) for c in range(num_classes) for v in (text[c], image[c])], -1)
  chosen = np.take_along_axis(cams.reshape(*cams.shape[:3], num_classes, 2), predicted[..., None, None],
                              axis=3)[..., 0, :]
  expected = 2 * predicted + np.argmax(chosen, axis=-1)
  close = np.abs(chosen[..., 0] - chosen[..., 1]) < 1e-5      # near-ties may go either way in f32
  assert close.mean() < 0.01 and np.all(proto_map[~close] == expected[~close])
  assert set(np.unique(proto_map)) <= set(range(2 * num_classes)) and pm.BACKGROUND not in proto_map
