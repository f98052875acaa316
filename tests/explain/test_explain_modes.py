"""The explanation modes through `main.run` on a trained tiny DualProtoSeg: query (tiles, an image larger than
a tile, a whole slide), predict's prototype map, the prototype page (top-k, wins, structure) and the
one-line errors. Every output is checked against an independent recomputation from the restored weights."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from protoseg_jax import errors, main, ops, registry, trainer
from protoseg_jax.data import images as images_lib
from protoseg_jax.explain import query as query_lib
from protoseg_jax.methods.dualprotoseg import train as dps_train
from protoseg_jax.methods.dualprotoseg.model import DualProtoSeg
from test_explain_page import _number, _parse, _same_share  # pylint: disable=g-bad-import-order

PHRASES = ('tumor necrosis', 'fibrous stroma')


def explain_config(**blocks) -> ml_collections.ConfigDict:
  """The tiny config trained for one epoch of 18 tiles (5 steps, a padded last batch), eval batch 4."""
  config = tiny_config()
  config.data.synthetic.update(num_train=18, num_val=6)
  config.train.epochs = 1
  config.eval.batch_size = 4
  config.query.level = 2            # 8 x 8 features resized to the 32-px tile
  config.explain.update(top_k=3, crop_size=16)
  for block, values in blocks.items():
    config[block].update(values)
  return config


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('explain_run'))
  assert main.run(explain_config(), workdir, 'train') == errors.EXIT_OK
  return workdir


@pytest.fixture(scope='module')
def restored(run_dir):
  config = explain_config()
  method = registry.build(config)
  params, extra, meta, _, _ = trainer.restore_weights(method, config, run_dir, 'best')
  params, extra = jax.device_get((params, extra))
  return config, method, params, extra, method.inference_statics(params, extra), meta


@pytest.fixture(scope='module')
def inputs(run_dir, tmp_path_factory):
  """Two val tiles and one 48 x 40 image (windows at y 0/16, x 0/8, averaged or pasted)."""
  folder = tmp_path_factory.mktemp('inputs')
  val = os.path.join(run_dir, 'synthetic_bcss', 'val', 'img')
  names = sorted(os.listdir(val))[:2]
  tiles = [images_lib.read_image(os.path.join(val, name)) for name in names]
  for name, tile in zip(names, tiles):
    Image.fromarray(tile).save(folder / name)
  large = np.concatenate([np.concatenate(tiles, axis=1), np.concatenate(tiles[::-1], axis=1)[:16]])[:, :40]
  assert large.shape == (48, 40, 3)
  Image.fromarray(large).save(folder / 'zz_large.png')
  return str(folder), names + ['zz_large.png'], tiles + [large]


def jitted(fn):
  return jax.jit(fn)


# ------------------------------------------------------------------------------------------------ query


def reference_maps(method, params, extra, bank, image: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
  """The method's maps resized (float64 bilinear, align_corners=True) to its tile size, windows averaged."""
  query = jitted(method.query_fn())
  size = method.config.data.image_size
  height, width = image.shape[:2]
  total, weight = np.zeros((height, width, len(token_ids))), np.zeros((height, width, 1))
  starts = lambda n: sorted({*range(0, n - size + 1, size), n - size})
  for y in starts(height):
    for x in starts(width):
      maps = np.asarray(query(params, extra, bank, jnp.asarray(token_ids),
                              jnp.asarray(image[None, y:y + size, x:x + size])), np.float64)[0]
      rows, cols = ops.bilinear_matrix(maps.shape[0], size, True), ops.bilinear_matrix(maps.shape[1], size, True)
      total[y:y + size, x:x + size] += np.einsum('oh,hwq,pw->opq', rows, maps, cols)
      weight[y:y + size, x:x + size] += 1
  return total / weight


def test_query_mode_writes_the_maps_statistics_and_pictures(run_dir, restored, inputs, tmp_path):
  config, method, params, extra, bank, _ = restored
  folder, names, images = inputs
  out = str(tmp_path / 'query')
  options = main.Options(input=folder, out=out, texts=(' tumor necrosis ',) + PHRASES[1:])
  assert main.run(explain_config(), run_dir, 'query', options) == errors.EXIT_OK
  document = json.load(open(os.path.join(out, 'query.json')))
  assert [p['text'] for p in document['phrases']] == list(PHRASES)
  assert document['level'] == 'pyramid level 2 (8 channels)' and document['context'] == 'init'
  assert [record['name'] for record in document['inputs']] == names
  token_ids = method.phrase_token_ids(list(PHRASES))
  threshold, total = config.query.threshold, 0
  for record, image in zip(document['inputs'], images):
    maps = reference_maps(method, params, extra, bank, image, token_ids)
    tissue = query_lib.tissue_mask(image)
    total += int(tissue.sum())
    assert record['tissue_pixels'] == int(tissue.sum()) and tissue.any()
    for q, entry in enumerate(record['phrases']):
      values = maps[..., q][tissue]
      assert entry['max'] == pytest.approx(values.max(), abs=2e-5)
      assert entry['mean'] == pytest.approx(values.mean(), abs=2e-5)
      near = np.abs(values - threshold) < 2e-5        # f32 vs f64 may fall either side of the threshold
      assert abs(entry['fraction_above'] - (values > threshold).mean()) <= near.mean() + 1e-6   # f32 ratio
      overlay = np.asarray(Image.open(os.path.join(out, entry['overlay'])))
      assert overlay.shape == image.shape
    sheet = Image.open(os.path.join(out, record['sheet']))
    assert sheet.width > 3 * 224
  assert document['overall']['tissue_pixels'] == total


@pytest.mark.parametrize('texts, template, message', [
    (('tumor', '  '), '', r"^--text #2 is empty$"),
    (('x' * 37,), '', r"^--text #1 'x{37}' is 37 tokens long after the template; the text tower takes at "
     r'most 36$'),
    (('tumor',), 'a {} of {}', r"^config.query.template 'a \{\} of \{\}' must have exactly one '\{\}' field"),
    (('tumor',), 'image of {name}', r"^config.query.template 'image of \{name\}' must have exactly one"),
    (('tumor',), 'image of {', r"^config.query.template 'image of \{' is not a valid template"),
    ((), '', r'^no --text phrase given'),
])
def test_query_phrase_errors_are_one_line_before_any_checkpoint(tmp_path, texts, template, message):
  config = explain_config(query={'template': template})
  with pytest.raises(errors.ConfigError, match=message) as raised:
    main.run(config, str(tmp_path), 'query', main.Options(texts=texts, input=str(tmp_path)))
  assert '\n' not in str(raised.value)   # and not the CheckpointError of the empty workdir: checked first


def test_a_method_without_the_capabilities_names_the_mode(tmp_path):
  import toy_config  # registers the tests-only toy method  pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match=r"^--mode=query: method 'toy' has no text side$"):
    main.run(toy_config.get_config(), str(tmp_path), 'query', main.Options(texts=('x',)))
  with pytest.raises(errors.ConfigError, match=r"^--mode=prototypes / config.predict.prototype_map: method "
                     r"'toy' has no prototypes$"):
    main.run(toy_config.get_config(), str(tmp_path), 'prototypes')


def write_slide(path: str, image: np.ndarray, mpp: float) -> None:
  """A lossless 2-level tiled pyramidal TIFF with its µm/px in the resolution tags."""
  import tifffile  # pylint: disable=g-import-not-at-top
  with tifffile.TiffWriter(path) as writer:
    for k in range(2):
      per_cm = 1e4 / (mpp * 2 ** k)
      writer.write(np.ascontiguousarray(image[::2 ** k, ::2 ** k]), tile=(16, 16), photometric='rgb',
                   compression='zlib', metadata=None, subfiletype=0 if k == 0 else 1,
                   resolution=(per_cm, per_cm), resolutionunit='CENTIMETER')


def test_query_of_a_whole_slide_stitches_the_tile_maps_at_mask_resolution(run_dir, restored, tmp_path):
  config, method, params, extra, bank, _ = restored
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (80, 96, 3)).astype(np.uint8)        # 3 x 3 tiles of 32, the last row cut
  path = str(tmp_path / 'slide.tif')
  write_slide(path, image, config.data.mpp)
  slides = {'overlap': 0.0, 'blend': 'mean', 'mask_downsample': 1, 'tissue_method': 'none'}
  out = str(tmp_path / 'out')
  options = main.Options(input=path, out=out, texts=PHRASES)
  assert main.run(explain_config(slides=slides), run_dir, 'query', options) == errors.EXIT_OK
  document = json.load(open(os.path.join(out, 'slides', 'slide', 'query.json')))
  assert document['mask_size'] == [96, 80] and document['heatmap_size'] == [96, 80]
  assert document['tiles'] == 9 and document['overall']['tissue_pixels'] == 80 * 96
  padded = np.full((96, 96, 3), 255, np.uint8)                        # outside the slide: white glass
  padded[:80] = image
  maps = reference_maps(method, params, extra, bank, padded, method.phrase_token_ids(list(PHRASES)))[:80]
  for q, entry in enumerate(document['overall']['phrases']):
    assert entry['max'] == pytest.approx(maps[..., q].max(), abs=2e-5)
    assert entry['mean'] == pytest.approx(maps[..., q].mean(), abs=2e-5)
    assert entry['fraction_above'] == pytest.approx((maps[..., q] > config.query.threshold).mean(), abs=2e-3)
  record = document['inputs'][0]
  for entry in record['phrases']:
    assert np.asarray(Image.open(os.path.join(out, 'slides', 'slide', entry['overlay']))).shape == (80, 96, 3)
  assert os.path.isfile(os.path.join(out, 'slides', 'slide', record['sheet']))


# --------------------------------------------------------------------------------------- prototype map


def expected_prototype_map(method, params, extra, bank, window: np.ndarray) -> np.ndarray:
  """Pixel of predicted class c < C -> c * G + argmax over c's CAM channels; background -> 255 (PNG)."""
  labels = jnp.asarray(method.image_labels('x.png'))[None]
  scores = jitted(method.scores_fn('predict'))(params, extra, bank, jnp.asarray(window[None]), labels)
  predicted = np.argmax(np.asarray(scores), axis=-1)[0]
  level = method.config.eval.cam_level - 1
  features = method.model.apply({'params': params}, dps_train.model_input(jnp.asarray(window[None]),
                                                                          method.config.data),
                                level, method=DualProtoSeg.level_features)
  cams = np.asarray(method.model.apply({'params': params}, features, bank, level,
                                       method=DualProtoSeg.level_cam))[0]
  assert cams.shape[:2] == window.shape[:2]          # level 4 of the tiny model: the tile's own size
  classes, group = method.model_config.num_classes, 2 * method.model_config.prompts_per_class
  grouped = cams.reshape(*cams.shape[:2], classes, group)
  safe = np.minimum(predicted, classes - 1)
  winner = np.take_along_axis(np.argmax(grouped, axis=-1), safe[..., None], axis=-1)[..., 0]
  return np.where(predicted < classes, predicted * group + winner, 255), predicted


def test_predict_prototype_map_is_the_argmax_over_the_predicted_class_prototype_cams(run_dir, restored,
                                                                                      inputs, tmp_path):
  _, method, params, extra, bank, _ = restored
  folder, names, images = inputs
  out = str(tmp_path / 'pred')
  config = explain_config(predict={'prototype_map': True})
  assert main.run(config, run_dir, 'predict', main.Options(input=folder, out=out)) == errors.EXIT_OK
  legend = json.load(open(os.path.join(out, 'prototype_maps', 'prototype_legend.json')))
  assert len(legend['prototypes']) == 16 and legend['background']['png_index'] == 255
  for name, image in zip(names, images):
    stem = os.path.splitext(name)[0]
    shown = Image.open(os.path.join(out, 'prototype_maps', stem + '.png'))
    assert shown.mode == 'P'
    proto_map = np.asarray(shown)
    if image.shape[:2] == (32, 32):
      expected, predicted = expected_prototype_map(method, params, extra, bank, image)
      np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, 'masks', stem + '.png'))),
                                    predicted)
    else:                                             # windows pasted in order, the later one on top
      expected = np.zeros(image.shape[:2], np.int64)
      for y in (0, 16):
        for x in (0, 8):
          expected[y:y + 32, x:x + 32] = expected_prototype_map(method, params, extra, bank,
                                                                image[y:y + 32, x:x + 32])[0]
    np.testing.assert_array_equal(proto_map, expected)
    assert (proto_map < 255).any()


# ------------------------------------------------------------------------------------- prototype page


@pytest.fixture(scope='module')
def page_dir(run_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('page'))
  assert main.run(explain_config(), run_dir, 'prototypes', main.Options(split='train', out=out)) == 0
  return out


def test_prototypes_mode_topk_equals_a_brute_force_ranking(run_dir, restored, page_dir):
  """Per prototype: per train tile its max over positions (first on ties), among tiles whose label has the
  prototype's class, ranked by (-similarity, tile); the first k."""
  config, method, params, extra, bank, _ = restored
  source = method.explain_images(run_dir, 'train')
  assert len(source) == 18
  patch_fn = jitted(method.patch_similarities_fn())
  infos = method.prototype_infos()
  sims, labels = [], []
  for first in range(0, len(source), 4):                  # batches of 4 as the mode
    batch = [source.read(i) for i in range(first, min(first + 4, len(source)))]
    images = np.zeros((4, 32, 32, 3), np.uint8)
    images[:len(batch)] = [image for image, _ in batch]
    sims.append(np.asarray(patch_fn(params, extra, bank, jnp.asarray(images)))[:len(batch)])
    labels += [label for _, label in batch]
  sims, labels = np.concatenate(sims), np.stack(labels)                     # [N, h, w, P], [N, C]
  height, width = sims.shape[1:3]
  document = json.load(open(os.path.join(page_dir, 'prototypes.json')))
  records = {p['index']: p for c in document['classes'] for p in c['prototypes']}
  assert sorted(records) == list(range(len(infos)))
  for info in infos:
    candidates = []
    for tile in range(len(source)):
      if labels[tile, info.class_index] == 0:
        continue
      flat = sims[tile, ..., info.index].reshape(-1)
      position = int(np.argmax(flat))
      candidates.append((-float(flat[position]), tile, position // width, position % width))
    expected = sorted(candidates)[:config.explain.top_k]
    patches = records[info.index]['patches']
    assert [(p['tile'], p['y'], p['x']) for p in patches] == [(t, y, x) for _, t, y, x in expected]
    np.testing.assert_allclose([p['similarity'] for p in patches], [-s for s, *_ in expected], rtol=0,
                               atol=1e-6)
    assert [p['source'] for p in patches] == [source.names[t] for _, t, _, _ in expected]
  assert (height, width) == (4, 4) and document['meta']['feature map'] == '4 x 4'


def test_prototype_page_structure_and_numbers_of_a_real_run(run_dir, page_dir):
  root = _parse(os.path.join(page_dir, 'index.html'))
  document = json.load(open(os.path.join(page_dir, 'prototypes.json')))
  assert document['meta']['split'] == 'train' and document['meta']['wins split'] == 'val'
  for image in root.find('img'):
    assert os.path.isfile(os.path.join(page_dir, image.attrs['src'])), image.attrs['src']
  assert not root.find('script') and not root.find('link')
  sections = root.find('section', 'class')
  assert [s.attrs['data-class'] for s in sections] == ['TUM', 'STR', 'LYM', 'NEC']
  elements = root.find(cls='proto')
  assert sorted(e.attrs['id'] for e in elements) == [f'proto-{i:03d}' for i in range(16)]
  for section, class_doc in zip(sections, document['classes']):
    assert _number(section.find('h2')[0].find(cls='count')[0].all_text()) == class_doc['wins']
    shown = {e.attrs['id']: e for e in section.find(cls='proto')}
    assert sorted(shown) == sorted(p['id'] for p in class_doc['prototypes'])
    for record in class_doc['prototypes']:
      element = shown[record['id']]
      assert _number(element.find(cls='count')[0].all_text()) == record['wins']
      assert _same_share(_number(element.find(cls='share')[0].all_text()), record['share'])
      assert [i.attrs['src'] for i in element.find('img')] == [p['file'] for p in record['patches']]
      assert [_number(f.all_text()) for f in element.find(cls='sim')] == [
          round(p['similarity'], 3) for p in record['patches']]
      for patch in record['patches']:
        assert Image.open(os.path.join(page_dir, patch['file'])).size == (16, 16)
  # Wins are the eval split's predicted tissue pixels, gated by the ground-truth labels as evaluation was:
  # one validation in this run, so the best checkpoint's confusion matrix is the last eval line's.
  confusion = np.asarray([json.loads(line) for line in open(os.path.join(run_dir, 'eval_metrics.jsonl'))][-1]
                         ['confusion_matrix'])
  assert document['total_wins'] == int(confusion[:, :4].sum()) > 0
  assert sum(c['wins'] for c in document['classes']) == document['total_wins']
