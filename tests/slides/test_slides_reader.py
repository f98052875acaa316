"""Slide readers: µm/px sources, level choice, region reads against the painted layout and OpenSlide."""

import sys

import numpy as np
import pytest

from protoseg_jax.errors import DatasetError
from protoseg_jax.slides import reader, synthetic

import slide_fixtures as fx


@pytest.fixture(scope='module')
def layout():
  layout = np.full((6, 8), fx.GLASS_CELL, np.uint8)
  layout[1:4, 1:4] = 0
  layout[2:5, 4:7] = 1
  return layout


def test_mpp_from_resolution_tags_and_levels(tmp_path, layout):
  path = str(tmp_path / 's.tif')
  fx.write_pyramid(path, fx.layout_image(layout, 64), 0.25, levels=3, jpeg=False)
  with reader.open_slide(path) as slide:
    assert slide.mpp == pytest.approx(0.25)
    assert slide.mpp_source == 'tiff-resolution'
    assert [(lv.width, lv.height) for lv in slide.levels] == [(512, 384), (256, 192), (128, 96)]
    assert [lv.mpp for lv in slide.levels] == pytest.approx([0.25, 0.5, 1.0])


@pytest.mark.parametrize('mode,ext,source', [('aperio', '.svs', 'aperio'), ('ome', '.ome.tif', 'ome'),
                                             ('resolution', '.tif', 'tiff-resolution')])
def test_mpp_sources_of_the_synthetic_writer(tmp_path, layout, mode, ext, source):
  path = str(tmp_path / f'slide{ext}')
  synthetic.write_synthetic_slide(path, layout, 0.4, levels=3, tile=64, cell_px=32, mpp_tags=mode)
  with reader.open_slide(path) as slide:
    assert (slide.mpp, slide.mpp_source) == (pytest.approx(0.4), source)
    assert len(slide.levels) == 3
    assert [lv.mpp for lv in slide.levels] == pytest.approx([0.4, 0.8, 1.6])


def test_aperio_description_is_read(tmp_path, layout):
  path = str(tmp_path / 'a.svs')
  fx.write_pyramid(path, fx.layout_image(layout, 64), 0.2526, levels=2, aperio=True)
  with reader.open_slide(path) as slide:
    assert (slide.mpp, slide.mpp_source) == (pytest.approx(0.2526), 'aperio')
    assert [(lv.width, lv.height) for lv in slide.levels] == [(512, 384), (256, 192)]


def test_slide_without_mpp_is_refused_by_name_and_accepted_with_override(tmp_path, layout):
  path = str(tmp_path / 'nompp.tif')
  fx.write_pyramid(path, fx.layout_image(layout, 64), None, levels=2, jpeg=False)
  with pytest.raises(DatasetError, match=r'nompp\.tif: no µm/px.*config\.slides\.slide_mpp'):
    reader.open_slide(path)
  with reader.open_slide(path, slide_mpp=0.5) as slide:
    assert (slide.mpp, slide.mpp_source) == (0.5, 'config.slides.slide_mpp')


def test_region_reads_are_the_painted_layout(tmp_path, layout):
  path = str(tmp_path / 'lossless.tif')
  image = fx.layout_image(layout, 64)
  fx.write_pyramid(path, image, 0.25, levels=3, tile=128, jpeg=False)
  with reader.open_slide(path) as slide:
    # Across several tiles of level 0, and partly outside the image (glass).
    np.testing.assert_array_equal(slide.read_region(0, 100, 50, 300, 200), image[50:250, 100:400])
    region = slide.read_region(1, 200, 150, 100, 80)                # level 1 is 256 x 192
    np.testing.assert_array_equal(region[:42, :56], image[::2, ::2][150:, 200:])
    assert (region[42:] == 255).all() and (region[:, 56:] == 255).all()


def test_region_reads_match_openslide(tmp_path, layout):
  openslide = pytest.importorskip('openslide')
  for name, aperio in (('g.tif', False), ('a.svs', True)):
    path = str(tmp_path / name)
    fx.write_pyramid(path, fx.layout_image(layout, 64), 0.25, levels=2, jpeg=True, aperio=aperio)
    reference = openslide.OpenSlide(path)
    with reader.open_slide(path, 'tifffile') as slide:
      assert float(reference.properties['openslide.mpp-x']) == pytest.approx(slide.mpp)
      expected = np.asarray(reference.read_region((2 * 70, 2 * 30), 1, (150, 120)).convert('RGB'))
      np.testing.assert_array_equal(slide.read_region(1, 70, 30, 150, 120), expected)


def test_choose_level_is_the_coarsest_at_or_finer_than_the_model():
  levels = [reader.Level(1, 1, 2.0 ** k, 0.25 * 2 ** k) for k in range(4)]   # 0.25, 0.5, 1, 2 µm/px
  assert reader.choose_level(levels, 0.5) == 1           # exact match: never level 0
  assert reader.choose_level(levels, 0.7) == 1           # between levels: the finer neighbour
  assert reader.choose_level(levels, 1.0) == 2
  assert reader.choose_level(levels, 0.505) == 1
  assert reader.choose_level(levels, 0.49) == 0          # finer than level 1: only level 0 is at or finer
  assert reader.choose_level(levels, 0.495) == 1         # within the 2 % tolerance of level 1
  assert reader.choose_level(levels, 0.1) == 0           # finer than the slide: level 0 (upsampled)
  assert reader.choose_level(levels, 9.0) == 3


def test_corrupt_file_is_reported_by_name(tmp_path):
  path = tmp_path / 'broken.svs'
  path.write_bytes(b'II*\x00' + b'\x17' * 500)
  with pytest.raises(DatasetError, match='broken.svs'):
    reader.open_slide(str(path))


def test_missing_openslide_names_the_extra(tmp_path, monkeypatch):
  path = tmp_path / 'x.ndpi'
  path.write_bytes(b'\x00' * 16)
  monkeypatch.setitem(sys.modules, 'openslide', None)      # import openslide -> ImportError
  with pytest.raises(DatasetError, match=r"x\.ndpi: reading \.ndpi slides needs the 'openslide' extra: "
                                         r"pip install 'protoseg_jax\[openslide\]'"):
    reader.open_slide(str(path))
