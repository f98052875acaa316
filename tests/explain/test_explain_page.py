"""The prototype page (`protoseg_jax.explain.page`): crops by hand, the HTML parsed with the stdlib."""

import html.parser
import json
import os

import numpy as np
import pytest
from PIL import Image

from protoseg_jax.explain import page
from protoseg_jax.explain import prototype_map as pm

VOID = {'img', 'meta', 'br', 'hr', 'link', 'input', 'source'}


class _Node:

  def __init__(self, tag, attrs, parent):
    self.tag, self.attrs, self.parent, self.children, self.text = tag, dict(attrs), parent, [], []

  def classes(self):
    return (self.attrs.get('class') or '').split()

  def walk(self):
    yield self
    for child in self.children:
      yield from child.walk()

  def find(self, tag=None, cls=None):
    return [n for n in self.walk() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes())]

  def all_text(self):
    return ''.join(self.text) + ''.join(c.all_text() for c in self.children)


class _Tree(html.parser.HTMLParser):
  """A minimal DOM; fails on mismatched end tags (the page must be well formed)."""

  def __init__(self):
    super().__init__()
    self.root = self.current = _Node('#root', {}, None)

  def handle_starttag(self, tag, attrs):
    node = _Node(tag, attrs, self.current)
    self.current.children.append(node)
    if tag not in VOID:
      self.current = node

  def handle_endtag(self, tag):
    assert self.current.tag == tag, f'</{tag}> closes <{self.current.tag}>'
    self.current = self.current.parent

  def handle_data(self, data):
    self.current.text.append(data)


def _parse(path):
  tree = _Tree()
  tree.feed(open(path, encoding='utf-8').read())
  tree.close()
  assert tree.current is tree.root, 'unclosed elements'
  return tree.root


# ---------------------------------------------------------------------------------------------- crops


def test_crop_patch_is_centred_on_the_cell_and_clamped():
  tile = np.arange(224 * 224 * 3, dtype=np.int64).reshape(224, 224, 3) % 251
  tile = tile.astype(np.uint8)
  # 28x28 map: cell (10, 5) covers rows 80..87, columns 40..47; its centre is (84, 44).
  np.testing.assert_array_equal(page.crop_patch(tile, 10, 5, (28, 28), 32), tile[68:100, 28:60])
  np.testing.assert_array_equal(page.crop_patch(tile, 10, 5, (28, 28), 9), tile[80:89, 40:49])  # 84-4.5+.5
  np.testing.assert_array_equal(page.crop_patch(tile, 0, 27, (28, 28), 64), tile[0:64, 160:224])
  np.testing.assert_array_equal(page.crop_patch(tile, 27, 0, (28, 28), 224), tile)
  # 14x14 map (cells of 16 px): cell (3, 13) -> centre (56, 216): the window is pushed inside on the right.
  np.testing.assert_array_equal(page.crop_patch(tile, 3, 13, (14, 14), 48), tile[32:80, 176:224])
  # Non-square tile, 2x4 map of a 40x80 tile: cells of 20x20, cell (1, 2) centre (30, 50).
  wide = tile[:40, :80]
  np.testing.assert_array_equal(page.crop_patch(wide, 1, 2, (2, 4), 10), wide[25:35, 45:55])
  with pytest.raises(ValueError, match='crop size'):
    page.crop_patch(wide, 0, 0, (2, 4), 41)
  with pytest.raises(ValueError, match='outside'):
    page.crop_patch(wide, 2, 0, (2, 4), 10)


def test_cell_box_locates_the_matched_cell_inside_its_crop():
  # 28x28 map on 224: cell (10, 5) = rows 80..88, columns 40..48; crop of 32 starts at (68, 28).
  assert page.cell_box((224, 224), 10, 5, (28, 28), 32) == (12.0, 12.0, 8.0, 8.0)
  # At the border the crop is clamped, the cell is not centred any more: (0, 27) -> crop (0, 160).
  assert page.cell_box((224, 224), 0, 27, (28, 28), 64) == (0.0, 56.0, 8.0, 8.0)
  # A cell larger than the crop is cut at the crop: 2x2 map (112-px cells), crop of 64 centred at (56, 168).
  assert page.cell_box((224, 224), 0, 1, (2, 2), 64) == (0.0, 0.0, 64.0, 64.0)


def test_collect_crops_reads_each_tile_once_and_skips_fillers():
  rng = np.random.default_rng(0)
  tiles = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  result = {'values': np.asarray([[0.9, 0.5], [0.7, -np.inf]], np.float32),
            'tiles': np.asarray([[2, 0], [2, -1]]), 'ys': np.asarray([[1, 3], [0, -1]]),
            'xs': np.asarray([[2, 0], [3, -1]])}
  reads = []

  def read(t):
    reads.append(t)
    return tiles[t]

  crops = page.collect_crops(result, read, (4, 4), 16, tile_name=lambda t: f'tile{t}.png')
  assert sorted(reads) == [0, 2]
  assert [len(crops[0]), len(crops[1])] == [2, 1]
  first = crops[0][0]
  assert (first.similarity, first.tile, first.y, first.x, first.source) == (pytest.approx(0.9), 2, 1, 2,
                                                                            'tile2.png')
  np.testing.assert_array_equal(first.image, page.crop_patch(tiles[2], 1, 2, (4, 4), 16))
  assert first.cell == page.cell_box((32, 32), 1, 2, (4, 4), 16)


# ------------------------------------------------------------------------------------------------ page


def _example(tmp_path, with_wins=True):
  rng = np.random.default_rng(1)
  classes = ['TUM', 'STR', 'LYM']
  phrases = [[f'{c} phrase {j}' for j in range(3)] for c in classes]
  phrases[0][1] = 'nuclei <b>& "quotes"'                       # must be escaped, not become markup
  infos = pm.describe_prototypes(classes, pm.interleaved_kinds(3), phrases)
  crops = {}
  for info in infos:
    if info.kind == 'image' and info.index != 3:                # prototype 3: no patch at all
      count = int(rng.integers(1, 4))
      crops[info.index] = [page.Patch(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8),
                                      float(rng.uniform(-1, 1)), int(rng.integers(0, 50)), 1, 2, 'tile.png')
                           for _ in range(count)]
  wins = rng.integers(0, 5000, len(infos)) if with_wins else None
  if with_wins:
    wins[[0, 4, 7]] = [10 ** 7, 3, 0]           # shares below 0.01% and exactly 0 occur
  meta = {'method': 'dualprotoseg', 'checkpoint': '/ckpt/best', 'step': 1234, 'split': 'val'}
  path = page.write_prototype_page(str(tmp_path), classes, infos, crops, wins, meta)
  return path, classes, infos, crops, wins


def _number(text):
  text = text.strip()
  if text == '–':
    return None
  if text == '<0.01%':
    return 'tiny'
  if text.endswith('%'):
    return float(text[:-1]) / 100
  return float(text.replace(',', ''))


def _same_share(shown, value):
  if shown == 'tiny':
    return 0 < value < 1e-4
  return shown == pytest.approx(value, abs=5e-4 if value >= 0.01 else 5e-5)


def test_share_formatting_never_shows_a_false_zero():
  shown = [page._percent(v) for v in (None, 0.0, 0.00005, 0.0042, 0.25123)]
  assert shown == ['–', '0.00%', '<0.01%', '0.42%', '25.1%']


def test_page_structure_images_and_numbers_match_the_json(tmp_path):
  path, classes, infos, crops, wins = _example(tmp_path)
  root = _parse(path)
  document = json.load(open(tmp_path / 'prototypes.json'))
  assert document['meta']['step'] == 1234 and document['total_wins'] == int(wins.sum())

  # Self-contained: no scripts, stylesheets or remote references; every image is a relative file that exists.
  assert not root.find('script') and not root.find('link')
  images = root.find('img')
  assert len(images) == sum(len(v) for v in crops.values())
  for image in images:
    src = image.attrs['src']
    assert not src.startswith(('/', 'http:', 'https:', 'file:')) and os.path.isfile(tmp_path / src)
  assert 'http' not in open(path).read()

  sections = root.find('section', 'class')
  assert [s.attrs['id'] for s in sections] == [c['id'] for c in document['classes']]
  assert [s.attrs['data-class'] for s in sections] == classes
  elements = root.find(cls='proto')
  assert sorted(e.attrs['id'] for e in elements) == sorted(i.element_id for i in infos)
  assert len({e.attrs['id'] for e in elements}) == len(infos)

  for section, class_doc in zip(sections, document['classes']):
    header = section.find('h2')[0]
    assert _number(header.find(cls='count')[0].all_text()) == class_doc['wins']
    assert _same_share(_number(header.find(cls='share')[0].all_text()), class_doc['share'])
    shown = {e.attrs['id']: e for e in section.find(cls='proto')}
    assert sorted(shown) == sorted(p['id'] for p in class_doc['prototypes'])      # in its own class section
    for record in class_doc['prototypes']:
      element = shown[record['id']]
      assert element.attrs['data-kind'] == record['kind']
      assert int(element.attrs['data-index']) == record['index']
      assert record['wins'] == int(wins[record['index']])
      assert _number(element.find(cls='count')[0].all_text()) == record['wins']
      assert _same_share(_number(element.find(cls='share')[0].all_text()), record['share'])
      assert _same_share(_number(element.find(cls='class-share')[0].all_text()), record['class_share'])
      if record['kind'] == 'text':
        assert element.find(cls='phrase')[0].all_text() == record['phrase']
      shown_images = element.find('img')
      assert [i.attrs['src'] for i in shown_images] == [p['file'] for p in record['patches']]
      sims = [_number(f.all_text()) for f in element.find(cls='sim')]
      assert sims == [round(p['similarity'], 3) for p in record['patches']]
      expected = crops.get(record['index'], [])
      assert [p['similarity'] for p in record['patches']] == [c.similarity for c in expected]
      for patch, crop in zip(record['patches'], expected):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / patch['file'])), crop.image)
  phrase_0_1 = [p for c in document['classes'] for p in c['prototypes'] if p['index'] == 2][0]
  assert phrase_0_1['phrase'] == 'nuclei <b>& "quotes"'
  assert not root.find('b')                                      # escaped: no stray <b> element
  header_text = root.find('header')[0].all_text()
  assert '/ckpt/best' in header_text and '1234' in header_text and 'val' in header_text


def test_page_without_win_counts_shows_dashes_and_null(tmp_path):
  path, _, infos, _, _ = _example(tmp_path, with_wins=False)
  root = _parse(path)
  document = json.load(open(tmp_path / 'prototypes.json'))
  assert document['total_wins'] is None
  assert all(p['wins'] is None and p['share'] is None for c in document['classes'] for p in c['prototypes'])
  assert {e.all_text() for e in root.find(cls='count')} == {'–'}
  with pytest.raises(ValueError, match='win counts'):
    page.write_prototype_page(str(tmp_path), ['TUM'], infos, {}, np.zeros(3), {})
