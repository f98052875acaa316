"""Prototype maps (`protoseg_jax.explain.prototype_map`) against a brute-force NumPy argmax."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from protoseg_jax.explain import colors
from protoseg_jax.explain import prototype_map as pm


def _reference(cams, mask, num_classes, group):
  """Pixel by pixel: first maximum of the pixel's class group, -1 outside the classes."""
  batch, height, width, _ = cams.shape
  out = np.full((batch, height, width), -1, np.int64)
  for b in range(batch):
    for i in range(height):
      for j in range(width):
        c = int(mask[b, i, j])
        if 0 <= c < num_classes:
          scores = [cams[b, i, j, c * group + g] for g in range(group)]
          best = 0
          for g in range(1, group):
            if scores[g] > scores[best]:
              best = g
          out[b, i, j] = c * group + best
  return out


@pytest.mark.parametrize('ties', [False, True])
def test_prototype_map_equals_brute_force(ties):
  rng = np.random.default_rng(0 + ties)
  num_classes, group = 4, 6
  cams = rng.normal(size=(3, 7, 5, num_classes * group)).astype(np.float32)
  if ties:
    cams = rng.integers(0, 3, cams.shape).astype(np.float32)   # many exact ties -> lowest index must win
  mask = rng.integers(-1, num_classes + 2, (3, 7, 5))          # -1 and 4, 5: not a tissue class
  out = np.asarray(pm.prototype_map(jnp.asarray(cams), jnp.asarray(mask, jnp.int32), num_classes, group))
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, _reference(cams, mask, num_classes, group))
  assert (out[mask >= num_classes] == pm.BACKGROUND).all()


def test_prototype_map_hand_set_values_and_bf16():
  cams = np.zeros((1, 1, 3, 4), np.float32)   # 2 classes x 2 prototypes
  cams[0, 0, 0] = [1, 2, 9, 9]                # class 0 pixel: prototype 1 (class 1's big values don't count)
  cams[0, 0, 1] = [5, 5, 3, 4]                # class 1 pixel: prototype 3
  cams[0, 0, 2] = [7, 7, 7, 7]                # background
  mask = np.asarray([[[0, 1, 2]]])
  for dtype in (jnp.float32, jnp.bfloat16):
    out = pm.prototype_map(jnp.asarray(cams, dtype), jnp.asarray(mask), 2, 2)
    np.testing.assert_array_equal(np.asarray(out), [[[1, 3, -1]]])
  cams[0, 0, 1] = [0, 0, 4, 4]                # tie inside class 1 -> the lower index, 2
  np.testing.assert_array_equal(np.asarray(pm.prototype_map(jnp.asarray(cams), jnp.asarray(mask), 2, 2)),
                                [[[1, 2, -1]]])


def test_prototype_map_rejects_inconsistent_shapes():
  with pytest.raises(ValueError, match='expected 2 classes x 3'):
    pm.prototype_map(jnp.zeros((1, 2, 2, 5)), jnp.zeros((1, 2, 2), jnp.int32), 2, 3)
  with pytest.raises(ValueError, match='differ'):
    pm.prototype_map(jnp.zeros((1, 4, 4, 6)), jnp.zeros((1, 2, 2), jnp.int32), 2, 3)


def test_describe_interleaved_bank():
  phrases = [['t0', 't1', 't2'], ['s0', 's1', 's2']]
  infos = pm.describe_prototypes(['TUM', 'STR'], pm.interleaved_kinds(3), phrases)
  assert [i.index for i in infos] == list(range(12))
  assert [(i.class_name, i.kind, i.number, i.phrase) for i in infos[:4]] == [
      ('TUM', 'text', 0, 't0'), ('TUM', 'image', 0, None), ('TUM', 'text', 1, 't1'),
      ('TUM', 'image', 1, None)]
  assert (infos[6].class_name, infos[6].kind, infos[6].phrase) == ('STR', 'text', 's0')
  assert (infos[11].kind, infos[11].number) == ('image', 2)
  assert len({i.element_id for i in infos}) == 12
  palette = colors.prototype_palette(2, 6)
  assert [i.color for i in infos] == [tuple(int(v) for v in c) for c in palette]
  with pytest.raises(ValueError, match='has 2 phrases'):
    pm.describe_prototypes(['TUM'], pm.interleaved_kinds(3), [['a', 'b']])


def test_prototype_map_png_round_trip_and_legend(tmp_path):
  rng = np.random.default_rng(2)
  infos = pm.describe_prototypes(['TUM', 'STR', 'LYM', 'NEC'], pm.interleaved_kinds(10),
                                 [[f'c{c}p{j}' for j in range(10)] for c in range(4)])
  palette = np.asarray([i.color for i in infos], np.uint8)
  proto_map = rng.integers(-1, 80, (24, 20)).astype(np.int32)
  path = tmp_path / 'map.png'
  pm.write_prototype_map_png(str(path), proto_map, palette)
  image = Image.open(path)
  assert image.mode == 'P'
  indices = np.asarray(image)
  np.testing.assert_array_equal(indices, np.where(proto_map < 0, 255, proto_map))
  file_palette = np.asarray(image.getpalette()[:768], np.uint8).reshape(256, 3)
  np.testing.assert_array_equal(file_palette[:80], palette)
  np.testing.assert_array_equal(file_palette[255], colors.BACKGROUND_COLOR)
  rgb = np.asarray(image.convert('RGB'))
  np.testing.assert_array_equal(rgb[proto_map >= 0], palette[proto_map[proto_map >= 0]])

  png, js = pm.write_legend(str(tmp_path), infos)
  legend = json.load(open(js))
  assert legend['background'] == {'value': -1, 'png_index': 255, 'color': '#000000'}
  assert [e['index'] for e in legend['prototypes']] == list(range(80))
  entry = legend['prototypes'][43]     # class 2, position 3: image prototype number 1
  assert (entry['class'], entry['kind'], entry['number'], entry['phrase']) == ('LYM', 'image', 1, None)
  assert legend['prototypes'][42]['phrase'] == 'c2p1'
  assert [e['color'] for e in legend['prototypes']] == [colors.hex_color(c) for c in palette]
  assert Image.open(png).size[0] > 4 * 200
  with pytest.raises(ValueError, match='at most 255'):
    pm.map_palette(np.zeros((256, 3), np.uint8))
