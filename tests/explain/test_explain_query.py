"""Free-text queries (`explain.query`) and the colours, against float64 NumPy and hand-set values."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from protoseg_jax.errors import ConfigError
from protoseg_jax.explain import colors, query


class _ByteTokens:
  """One token per UTF-8 byte (like the repo's byte tokenizer): token counts are easy to predict."""

  def encode(self, text):
    return list(text.encode('utf-8'))


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _bilinear_align_corners(x, out_h, out_w):
  """Brute-force bilinear resize of [B, h, w, Q] with align_corners=True, one output pixel at a time."""
  batch, h, w, q = x.shape
  out = np.zeros((batch, out_h, out_w, q))
  for i in range(out_h):
    sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = min(int(np.floor(sy)), h - 1)
    y1, fy = min(y0 + 1, h - 1), sy - y0
    for j in range(out_w):
      sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = min(int(np.floor(sx)), w - 1)
      x1, fx = min(x0 + 1, w - 1), sx - x0
      out[:, i, j] = ((1 - fy) * (1 - fx) * x[:, y0, x0] + (1 - fy) * fx * x[:, y0, x1]
                      + fy * (1 - fx) * x[:, y1, x0] + fy * fx * x[:, y1, x1])
  return out


# ----------------------------------------------------------------------------------------------- phrases


def test_format_phrases_strips_and_applies_the_template():
  prompts = query.format_phrases(['  tumor necrosis ', 'comedo necrosis'], 'a histopathology image of {}',
                                 _ByteTokens(), 64)
  assert prompts == ['a histopathology image of tumor necrosis', 'a histopathology image of comedo necrosis']
  assert query.format_phrases(['x'], '', _ByteTokens(), 1) == ['x']
  assert query.format_phrases(['x'], None, _ByteTokens(), 1) == ['x']
  assert query.format_phrases(['x'], '{{literal}} {}', _ByteTokens(), 20) == ['{literal} x']


@pytest.mark.parametrize('phrases, position', [(['tumor', ''], 2), (['   '], 1), (['a', 'b', '\t\n'], 3)])
def test_empty_phrase_names_its_position(phrases, position):
  with pytest.raises(ConfigError) as info:
    query.format_phrases(phrases, '{}', _ByteTokens(), 64)
  assert str(info.value) == f'--text #{position} is empty'


def test_no_phrase_is_an_error():
  with pytest.raises(ConfigError, match='no --text phrase'):
    query.format_phrases([], '{}', _ByteTokens(), 64)


def test_too_long_phrase_names_phrase_and_token_count():
  template = 'image of {}'                      # 9 bytes + the phrase
  assert query.format_phrases(['abcde'], template, _ByteTokens(), 14) == ['image of abcde']   # exactly 14
  with pytest.raises(ConfigError) as info:
    query.format_phrases(['ok', 'abcdef'], template, _ByteTokens(), 14)
  message = str(info.value)
  assert "--text #2 'abcdef'" in message and '15 tokens' in message and 'at most 14' in message
  assert '\n' not in message


@pytest.mark.parametrize('template', ['a {0}', 'a {phrase}', '{} and {}', 'no field', 'a {:>5}', 'a {!r}',
                                      'a {', 'a } {}', '{x.y}'])
def test_bad_template_names_the_template(template):
  with pytest.raises(ConfigError) as info:
    query.format_phrases(['tumor'], template, _ByteTokens(), 64)
  message = str(info.value)
  assert 'config.query.template' in message and repr(template) in message and '\n' not in message


# ------------------------------------------------------------------------------------------------ arrays


def test_similarity_maps_match_numpy_cosine():
  rng = np.random.default_rng(0)
  pixels, phrases = _unit(rng, (2, 5, 6, 16)), _unit(rng, (3, 16))
  out = np.asarray(query.similarity_maps(jnp.asarray(pixels, jnp.float32), jnp.asarray(phrases, jnp.float32)))
  expected = np.einsum('bhwc,qc->bhwq', pixels, phrases)
  assert out.shape == (2, 5, 6, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_similarity_maps_resize_to_the_tile():
  rng = np.random.default_rng(1)
  pixels, phrases = _unit(rng, (2, 4, 5, 8)), _unit(rng, (2, 8))
  out = np.asarray(query.similarity_maps(jnp.asarray(pixels, jnp.float32), jnp.asarray(phrases, jnp.float32),
                                         out_hw=(9, 7)))
  expected = _bilinear_align_corners(np.einsum('bhwc,qc->bhwq', pixels, phrases), 9, 7)
  np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_similarity_maps_accumulate_bf16_inputs_in_f32():
  rng = np.random.default_rng(2)
  pixels = jnp.asarray(_unit(rng, (1, 8, 8, 512)), jnp.bfloat16)
  phrases = jnp.asarray(_unit(rng, (2, 512)), jnp.bfloat16)
  out = query.similarity_maps(pixels, phrases)
  assert out.dtype == jnp.float32
  # Exact products of the bf16 values summed in float64; a bf16 accumulator would be off by ~1e-3.
  expected = np.einsum('bhwc,qc->bhwq', np.asarray(pixels, np.float64), np.asarray(phrases, np.float64))
  np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=2e-6)


def _stats_reference(sims, tissue, threshold):
  batch, _, _, q = sims.shape
  out = {k: np.full((batch, q), np.nan) for k in ('max', 'mean', 'fraction_above')}
  for b in range(batch):
    for p in range(q):
      values = [sims[b, i, j, p] for i in range(sims.shape[1]) for j in range(sims.shape[2])
                if tissue[b, i, j]]
      if values:
        out['max'][b, p] = max(values)
        out['mean'][b, p] = sum(values) / len(values)
        out['fraction_above'][b, p] = sum(v > threshold for v in values) / len(values)
  return out


def test_phrase_statistics_over_tissue_match_loops():
  rng = np.random.default_rng(3)
  sims = np.round(rng.uniform(-1, 1, (3, 6, 5, 4)), 1).astype(np.float32)   # values exactly at 0.2 occur
  tissue = rng.uniform(size=(3, 6, 5)) < 0.6
  tissue[2] = False                                                          # an input without tissue
  stats = jax.device_get(query.phrase_statistics(jnp.asarray(sims), jnp.asarray(tissue), 0.2))
  expected = _stats_reference(sims.astype(np.float64), tissue, np.float32(0.2))
  for key in ('max', 'mean', 'fraction_above'):
    np.testing.assert_allclose(stats[key], expected[key], rtol=1e-6, atol=1e-7, equal_nan=True)
  np.testing.assert_array_equal(stats['tissue_pixels'], tissue.sum(axis=(1, 2)))
  assert np.isnan(stats['max'][2]).all()


def test_combine_statistics_equals_statistics_of_the_union():
  rng = np.random.default_rng(7)
  sims = rng.uniform(-1, 1, (4, 5, 6, 3)).astype(np.float32)
  tissue = rng.uniform(size=(4, 5, 6)) < 0.5
  tissue[1] = False
  per_input = jax.device_get(query.phrase_statistics(jnp.asarray(sims), jnp.asarray(tissue), 0.1))
  combined = query.combine_statistics(per_input)
  union = sims[tissue].astype(np.float64)                    # [pixels, Q]: all tissue pixels of all inputs
  np.testing.assert_allclose(combined['max'], union.max(0), rtol=1e-6)
  np.testing.assert_allclose(combined['mean'], union.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(combined['fraction_above'], (union > np.float32(0.1)).mean(0), rtol=1e-6)
  assert combined['tissue_pixels'] == tissue.sum()
  none = query.combine_statistics({k: v[1:2] for k, v in per_input.items()})
  assert np.isnan(none['max']).all() and none['tissue_pixels'] == 0


def test_phrase_statistics_threshold_is_strict_and_does_not_retrace():
  sims = jnp.asarray([[[[0.5], [0.25]], [[0.25], [-1.0]]]])                  # [1, 2, 2, 1]
  one = query.phrase_statistics(sims, None, 0.25)
  compiled = query.phrase_statistics._cache_size()
  two = query.phrase_statistics(sims, None, 0.0)
  assert query.phrase_statistics._cache_size() == compiled                  # a new threshold: no new trace
  assert float(one['fraction_above'][0, 0]) == 0.25 and float(two['fraction_above'][0, 0]) == 0.75
  assert float(one['max'][0, 0]) == 0.5 and float(one['mean'][0, 0]) == 0.0
  assert int(one['tissue_pixels'][0]) == 4


def test_tissue_mask_treats_near_white_glass_as_background():
  tiles = np.asarray([[[250, 248, 251], [230, 200, 225], [221, 221, 221], [219, 240, 240]]], np.uint8)
  np.testing.assert_array_equal(query.tissue_mask(tiles), [[False, True, False, True]])


# ---------------------------------------------------------------------------------------------- colours


def test_oklab_conversion_round_trips_and_white_is_neutral():
  rgb = np.random.default_rng(4).uniform(size=(50, 3))
  np.testing.assert_allclose(colors.oklab_to_rgb(colors.rgb_to_oklab(rgb)), rgb, atol=1e-9)
  np.testing.assert_allclose(colors.rgb_to_oklab(np.ones(3)), [1.0, 0.0, 0.0], atol=1e-6)
  assert abs(colors.rgb_to_oklab(np.zeros(3))[0]) < 1e-9


def test_similarity_lut_is_perceptually_uniform_and_monotone():
  lut = colors.similarity_lut()
  assert lut.shape == (256, 3) and lut.dtype == np.uint8
  lab = colors.rgb_to_oklab(lut / 255.0)
  assert (np.diff(lab[:, 0]) >= -2e-3).all()                   # lightness never falls (beyond 8-bit rounding)
  assert lab[0, 0] < 0.3 and lab[-1, 0] > 0.9                   # dark low end, bright high end
  steps = np.linalg.norm(lab[16::16] - lab[:-16:16], axis=-1)   # 15 equal spans of 16 entries
  assert steps.max() / steps.min() < 1.15
  assert len({tuple(c) for c in lut}) >= 250                    # (nearly) every entry distinct


def test_apply_lut_maps_range_ends_and_clips():
  lut = colors.similarity_lut()
  out = colors.apply_lut(np.asarray([-5.0, 0.0, 0.5, 1.0, 9.0, np.nan]), (0.0, 1.0))
  np.testing.assert_array_equal(out, lut[[0, 0, 128, 255, 255, 0]])
  np.testing.assert_array_equal(colors.apply_lut(np.ones(3), (1.0, 1.0)), lut[[0, 0, 0]])


def test_prototype_palette_is_distinct_and_grouped_by_class():
  class_colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255)]
  palette = colors.prototype_palette(4, 20, class_colors)
  assert palette.shape == (80, 3) and palette.dtype == np.uint8
  np.testing.assert_array_equal(palette, colors.prototype_palette(4, 20, class_colors))   # deterministic
  lab = colors.rgb_to_oklab(palette / 255.0)
  distance = np.linalg.norm(lab[:, None] - lab[None], axis=-1) + np.eye(80)
  assert distance.min() > 0.02                                  # all pairs apart (OKLab JND ≈ 0.02)
  hues = np.asarray([colors.class_hue(c) for c in class_colors])
  own = np.rad2deg(np.arctan2(lab[:, 2], lab[:, 1])) % 360
  gap = np.abs((own[:, None] - hues[None] + 180) % 360 - 180)   # [80, 4] hue distance to each class hue
  np.testing.assert_array_equal(np.argmin(gap, axis=1), np.repeat(np.arange(4), 20))


# -------------------------------------------------------------------------------------------- rendering


def test_heatmap_overlay_blends_on_tissue_only():
  tile = np.full((2, 2, 3), 100, np.uint8)
  sim = np.asarray([[0.0, 1.0], [1.0, 0.5]])
  tissue = np.asarray([[True, True], [False, True]])
  out = query.heatmap_overlay(tile, sim, (0.0, 1.0), alpha=0.5, tissue=tissue)
  lut = colors.similarity_lut().astype(np.float64)
  np.testing.assert_array_equal(out[0, 1], np.round(0.5 * 100 + 0.5 * lut[255]).astype(np.uint8))
  np.testing.assert_array_equal(out[0, 0], np.round(0.5 * 100 + 0.5 * lut[0]).astype(np.uint8))
  np.testing.assert_array_equal(out[1, 0], tile[1, 0])
  with pytest.raises(ValueError, match='differ in size'):
    query.heatmap_overlay(tile, np.zeros((3, 3)), (0.0, 1.0))


def test_terminology_sheet_uses_one_scale_for_all_phrases():
  rng = np.random.default_rng(5)
  tile = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  sims = rng.uniform(-0.2, 0.6, (32, 32, 3)).astype(np.float32)
  sims[..., 2] *= 0.1                    # a weak phrase must look weak on the shared scale
  tissue = np.ones((32, 32), bool)
  tissue[:4] = False
  stats = {'max': sims.reshape(-1, 3).max(0), 'mean': sims.reshape(-1, 3).mean(0)}
  sheet = query.terminology_sheet(tile, sims, ['a', 'b', 'c'], stats, title='t', tissue=tissue, panel=32)
  lo, hi = sims[tissue].min(), sims[tissue].max()
  margin, gap, title_h = 16, 12, 30
  for q in range(3):
    left = margin + (q + 1) * (32 + gap)
    panel = sheet[margin + title_h:margin + title_h + 32, left:left + 32]
    np.testing.assert_array_equal(panel, query.heatmap_overlay(tile, sims[..., q], (lo, hi), 0.6, tissue))
  np.testing.assert_array_equal(sheet[margin + title_h:margin + title_h + 32, margin:margin + 32], tile)
  bar_left = margin + 4 * (32 + gap)
  np.testing.assert_array_equal(sheet[margin + title_h, bar_left + 5], colors.similarity_lut()[255])
  np.testing.assert_array_equal(sheet[margin + title_h + 31, bar_left + 5], colors.similarity_lut()[0])


def test_write_query_outputs_json_equals_statistics(tmp_path):
  rng = np.random.default_rng(6)
  tiles = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  sims = rng.uniform(-1, 1, (2, 16, 16, 2)).astype(np.float32)
  tissue = np.ones((2, 16, 16), bool)
  tissue[1] = False
  stats = jax.device_get(query.phrase_statistics(jnp.asarray(sims), jnp.asarray(tissue), 0.3))
  path = query.write_query_outputs(str(tmp_path), ['a.png', 'a.png'], tiles, sims, ['tumor necrosis', 'x'],
                                   ['p1', 'p2'], stats, threshold=0.3, level=4, tissue=tissue,
                                   meta={'template': '{}'})
  document = json.load(open(path))
  assert document['threshold'] == 0.3 and document['level'] == 4 and document['template'] == '{}'
  assert [p['prompt'] for p in document['phrases']] == ['p1', 'p2']
  assert len(document['inputs']) == 2 and document['inputs'][0]['sheet'] != document['inputs'][1]['sheet']
  for b, record in enumerate(document['inputs']):
    assert os.path.isfile(tmp_path / record['sheet'])
    for q, entry in enumerate(record['phrases']):
      for key in ('max', 'mean', 'fraction_above'):
        value = float(stats[key][b, q])
        assert entry[key] == (None if np.isnan(value) else value)
      overlay = np.asarray(Image.open(tmp_path / entry['overlay']))
      np.testing.assert_array_equal(overlay, query.heatmap_overlay(
          tiles[b], sims[b, ..., q], tuple(record['value_range']), 0.6, tissue[b]))
  assert document['inputs'][1]['phrases'][0]['max'] is None     # no tissue -> null, never NaN in the JSON
  overall = document['overall']
  assert overall['tissue_pixels'] == 256 and overall['phrases'][1]['max'] == float(stats['max'][0, 1])
