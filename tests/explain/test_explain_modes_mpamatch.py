"""The explanation modes through `main.run` on a trained tiny MPAMatch: query, predict's prototype map and the
prototype page. Its tiles (40 px) are larger than the 32-px window, so every mode works on windows; every
output is checked against an independent recomputation from the restored weights."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import tiny_mpamatch_config
from PIL import Image
from test_explain_modes import reference_maps  # pylint: disable=g-bad-import-order
from test_explain_page import _parse  # pylint: disable=g-bad-import-order

from protoseg_jax import errors, main, registry, trainer
from protoseg_jax.data import images as images_lib
from protoseg_jax.explain import query as query_lib

PHRASES = ('gland', 'fibrous stroma')
WINDOWS = [(0, 0), (0, 8), (8, 0), (8, 8)]       # 32-px windows of a 40-px tile, in the modes' order


def read_json(path: str):
  with open(path, encoding='utf-8') as file:
    return json.load(file)


def explain_config(root: str, **blocks) -> ml_collections.ConfigDict:
  """A tiny MPAMatch trained for 2 steps on 16 tiles of 40 px (4 labelled), validated on 4."""
  config = tiny_mpamatch_config(root, num_val=4)
  config.train.update(steps=2, eval_every_steps=2)
  config.checkpoint.update(every_steps=2, keep=1, async_save=False)
  config.query.context = 'tumour'           # MPAMatch's contexts start random: a class's learned one
  config.explain.update(top_k=3, crop_size=16)
  for block, values in blocks.items():
    config[block].update(values)
  return config


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('mpamatch_explain_run'))
  assert main.run(explain_config(os.path.join(workdir, 'data')), workdir, 'train') == errors.EXIT_OK
  return workdir


@pytest.fixture(scope='module')
def restored(run_dir):
  config = explain_config(os.path.join(run_dir, 'data'))
  method = registry.build(config)
  params, extra, meta, _, _ = trainer.restore_weights(method, config, run_dir, 'best')
  params, extra = jax.device_get((params, extra))
  return config, method, params, extra, method.inference_statics(params, extra), meta


@pytest.fixture(scope='module')
def val_images(run_dir):
  folder = os.path.join(run_dir, 'data', 'val', 'images')
  names = sorted(os.listdir(folder))
  images = [images_lib.read_image(os.path.join(folder, name)) for name in names]
  assert len(images) == 4 and all(image.shape == (40, 40, 3) for image in images)
  return folder, names, images


def test_query_mode_statistics_equal_the_averaged_window_maps(run_dir, restored, val_images, tmp_path):
  config, method, params, extra, statics, meta = restored
  folder, names, images = val_images
  out = str(tmp_path / 'query')
  options = main.Options(input=folder, out=out, texts=PHRASES)
  assert main.run(config, run_dir, 'query', options) == errors.EXIT_OK
  document = read_json(os.path.join(out, 'query.json'))
  assert document['method'] == 'mpamatch' and document['step'] == meta['step'] == 2
  assert document['context'] == 'tumour' and document['level'] == 'embedding map (8 x 8 per tile)'
  assert [p['text'] for p in document['phrases']] == list(PHRASES)
  assert [record['name'] for record in document['inputs']] == names
  token_ids = method.phrase_token_ids(list(PHRASES))
  for record, image in zip(document['inputs'], images):
    maps = reference_maps(method, params, extra, statics, image, token_ids)
    tissue = query_lib.tissue_mask(image)
    assert record['tissue_pixels'] == int(tissue.sum()) > 0
    for q, entry in enumerate(record['phrases']):
      values = maps[..., q][tissue]
      assert entry['max'] == pytest.approx(values.max(), abs=2e-5)
      assert entry['mean'] == pytest.approx(values.mean(), abs=2e-5)
      assert np.asarray(Image.open(os.path.join(out, entry['overlay']))).shape == image.shape
    assert os.path.isfile(os.path.join(out, record['sheet']))


def pasted_prototype_map(method, params, extra, statics, image: np.ndarray) -> np.ndarray:
  """The 4 windows' maps from `prototype_map_fn`, each pasted over the earlier ones."""
  map_fn = jax.jit(method.prototype_map_fn('predict'))
  windows = np.stack([image[y:y + 32, x:x + 32] for y, x in WINDOWS])
  labels = jnp.full((len(WINDOWS), len(method.config.data.class_names)), -1, jnp.int32)
  maps = np.asarray(map_fn(params, extra, statics, jnp.asarray(windows), labels))
  pasted = np.full(image.shape[:2], -1, np.int64)
  for (y, x), window_map in zip(WINDOWS, maps):
    pasted[y:y + 32, x:x + 32] = window_map
  return pasted


def test_predict_prototype_map_pastes_the_window_maps(run_dir, restored, val_images, tmp_path):
  config, method, params, extra, statics, _ = restored
  folder, names, images = val_images
  out = str(tmp_path / 'pred')
  config = ml_collections.ConfigDict(config.to_dict())
  config.predict.prototype_map = True
  assert main.run(config, run_dir, 'predict', main.Options(input=folder, out=out)) == errors.EXIT_OK
  legend = read_json(os.path.join(out, 'prototype_maps', 'prototype_legend.json'))
  # One text and one image prototype per class, background included (MPAMatch segments it as a class).
  assert [(p['class'], p['kind']) for p in legend['prototypes']] == [
      (name, kind) for name in config.data.class_names for kind in ('text', 'image')]
  for name, image in zip(names, images):
    shown = Image.open(os.path.join(out, 'prototype_maps', os.path.splitext(name)[0] + '.png'))
    assert shown.mode == 'P'
    np.testing.assert_array_equal(np.asarray(shown), pasted_prototype_map(method, params, extra, statics,
                                                                           image))


def test_prototypes_page_topk_and_wins(run_dir, restored, val_images, tmp_path):
  """Top-k: per train window its max over positions (first on ties), every window a candidate (MPAMatch's
  labels are masks, so no image-level label gates a class), ranked by (-similarity, window); wins: every val
  pixel is won by one prototype, the background class having its own."""
  config, method, params, extra, statics, _ = restored
  out = str(tmp_path / 'page')
  assert main.run(config, run_dir, 'prototypes', main.Options(split='train', out=out)) == errors.EXIT_OK
  source = method.explain_images(run_dir, 'train')
  reads = [source.read(i) for i in range(len(source))]
  assert len(reads) == 16 and all(np.all(label == -1) for _, label in reads)
  patch_fn = jax.jit(method.patch_similarities_fn())
  sims = np.concatenate([np.asarray(patch_fn(params, extra, statics, jnp.asarray(
      np.stack([image[y:y + 32, x:x + 32] for y, x in WINDOWS])))) for image, _ in reads])   # [64, 8, 8, P]
  document = read_json(os.path.join(out, 'prototypes.json'))
  assert document['meta']['tiles'] == 64 and document['meta']['feature map'] == '8 x 8'
  records = {p['index']: p for c in document['classes'] for p in c['prototypes']}
  infos = method.prototype_infos()
  assert sorted(records) == list(range(len(infos))) == list(range(sims.shape[-1]))
  for info in infos:
    flat = sims[..., info.index].reshape(len(sims), -1)
    positions = np.argmax(flat, axis=1)
    ranked = sorted((-float(flat[t, p]), t, p // 8, p % 8) for t, p in enumerate(positions))
    expected = ranked[:config.explain.top_k]
    patches = records[info.index]['patches']
    assert [(p['tile'], p['y'], p['x']) for p in patches] == [(t, y, x) for _, t, y, x in expected]
    np.testing.assert_allclose([p['similarity'] for p in patches], [-s for s, *_ in expected], rtol=0,
                               atol=1e-6)
    for patch in patches:
      image, (y, x) = patch['tile'] // 4, WINDOWS[patch['tile'] % 4]
      assert patch['source'] == f'{source.names[image]} @ ({y}, {x})'
      assert Image.open(os.path.join(out, patch['file'])).size == (16, 16)
  assert document['total_wins'] == 4 * 40 * 40
  assert sum(c['wins'] for c in document['classes']) == document['total_wins']
  root = _parse(os.path.join(out, 'index.html'))
  assert [s.attrs['data-class'] for s in root.find('section', 'class')] == list(config.data.class_names)
  assert sorted(e.attrs['id'] for e in root.find(cls='proto')) == [f'proto-{i:03d}' for i in range(len(infos))]
  assert not root.find('script') and not root.find('link')
  for image in root.find('img'):
    assert os.path.isfile(os.path.join(out, image.attrs['src'])), image.attrs['src']
