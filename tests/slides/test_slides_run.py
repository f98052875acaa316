"""Whole-slide inference end to end on small pyramidal TIFFs with known layouts and exact stub models.

Layout: 24 x 24 cells of 36 level-0 px at 0.25 µm/px (864 x 864, 3 levels: 0.25 / 0.5 / 1 µm/px); the
model works at 0.5 µm/px (level 1 is read, no resize), tiles of 64 px, stride 48, mask 2x coarser
(1 µm/px: one cell = 9 x 9 mask pixels). JPEG tolerance: cell borders do not fall on JPEG's 8 x 8 blocks
(16 x 16 with chroma subsampling), so ringing and chroma bleeding may move a colour edge by a pixel;
the mask may differ from the layout only in the one-pixel band along class boundaries.
"""

import json
import os
import shutil

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from protoseg_jax import errors
from protoseg_jax.slides import reader, run, slides_config

import slide_fixtures as fx

CELL = 36            # level-0 px per layout cell
MPP0 = 0.25
MODEL_MPP = 0.5
TILE = 64
D = 2                # mask_downsample
CELL_M = CELL * MPP0 / (MODEL_MPP * D)   # 9 mask px per cell


def make_layout(variant=0):
  layout = np.full((24, 24), fx.GLASS_CELL, np.uint8)
  layout[2:10, 2:12] = 0
  layout[4:8, 5:9] = fx.GLASS_CELL            # a glass hole in the tumour
  layout[3:20, 13:21] = 1
  layout[8:11, 15:18] = 0                     # a tumour island in the stroma
  layout[12:20, 3:12] = 2
  layout[14:17, 6:9] = 3
  if variant:
    layout = np.ascontiguousarray(layout[:, ::-1])
  return layout


def expected_mask(layout):
  values = np.where(layout == fx.GLASS_CELL, fx.BACKGROUND, layout).astype(np.uint8)
  return values.repeat(int(CELL_M), 0).repeat(int(CELL_M), 1)


def boundary_band(expected):
  band = np.zeros(expected.shape, bool)
  for value in np.unique(expected):
    region = expected == value
    band |= region & ~ndimage.binary_erosion(region, border_value=1)
  return band


def config(**overrides):
  c = slides_config()
  c.mask_downsample = D
  c.mask_tile = 64
  c.min_polygon_area_um2 = 0.0
  c.progress_seconds = 0.0
  c.update(overrides)
  return c


def run_folder(inputs, out_root, stub=None, **overrides):
  return run.run_slides(inputs, stub or fx.nearest_colour_stub(), config_slides=config(**overrides),
                        class_names=fx.NAMES, palette=fx.COLOURS, background_value=fx.BACKGROUND,
                        model_mpp=MODEL_MPP, tile_size=TILE, batch_size=4, out_root=str(out_root))


@pytest.fixture(scope='module')
def batch(tmp_path_factory):
  root = tmp_path_factory.mktemp('slides')
  folder = root / 'in'
  folder.mkdir()
  fx.write_pyramid(str(folder / 'a.tif'), fx.layout_image(make_layout(0), CELL), MPP0, levels=3)
  fx.write_pyramid(str(folder / 'b.svs'), fx.layout_image(make_layout(1), CELL), MPP0, levels=3, aperio=True)
  calls = []
  report = run_folder([str(folder)], root / 'out', fx.nearest_colour_stub(calls))
  return {'folder': folder, 'out': root / 'out', 'report': report, 'calls': calls}


def test_report_and_summary_csv(batch):
  report = batch['report']
  assert report.failed == [] and report.skipped == [] and report.exit_code == errors.EXIT_OK
  assert [s['slide'] for s in report.done] == ['a', 'b']
  with open(batch['out'] / 'summary.csv') as handle:
    lines = handle.read().splitlines()
  assert len(lines) == 3 and lines[0].startswith('slide,path,slide_mpp')
  assert [line.split(',')[0] for line in lines[1:]] == ['a', 'b']
  summary = json.load(open(batch['out'] / 'a' / 'summary.json'))
  assert (summary['level'], summary['level_mpp'], summary['mask_mpp']) == (1, pytest.approx(0.5), 1.0)
  assert summary['mpp_source'] == 'tiff-resolution'
  assert report.done[1]['mpp_source'] == 'aperio'


@pytest.mark.parametrize('stem,variant', [('a', 0), ('b', 1)])
def test_mask_is_the_layout_and_glass_is_background(batch, stem, variant):
  mask = tifffile.imread(batch['out'] / stem / 'mask.tif')
  expected = expected_mask(make_layout(variant))
  assert mask.shape == expected.shape == (216, 216)
  wrong = mask != expected
  assert not (wrong & ~boundary_band(expected)).any()          # JPEG: only along class boundaries
  assert wrong.sum() <= 0.02 * expected.size
  glass = expected == fx.BACKGROUND
  assert (mask[glass & ~boundary_band(expected)] == fx.BACKGROUND).all()
  summary = json.load(open(batch['out'] / stem / 'summary.json'))
  for entry in summary['classes']:
    pixels = int((mask == entry['value']).sum())
    assert entry['area_mm2'] == pytest.approx(pixels * 1e-6)  # 1 µm² per mask pixel
    assert abs(pixels - (expected == entry['value']).sum()) <= boundary_band(expected).sum() * 0.5


def test_glass_tiles_are_not_sent_to_the_model(batch):
  sent = [tile for tiles in batch['calls'] for tile in tiles if tile.any()]   # padding tiles are all zero
  summary_a, summary_b = batch['report'].done
  assert len(sent) == summary_a['tiles'] + summary_b['tiles']
  assert summary_a['tiles'] < summary_a['tiles_total']
  for tile in sent:
    rgb = tile.astype(np.int32)
    saturated = (rgb.max(-1) - rgb.min(-1)) > 0.2 * rgb.max(-1)
    assert saturated.mean() >= 0.05                               # config.slides.min_tissue_fraction


def test_mask_tiff_is_a_tagged_palette_pyramid(batch):
  with tifffile.TiffFile(batch['out'] / 'a' / 'mask.tif') as tiff:
    levels = tiff.series[0].levels
    assert [level.shape for level in levels] == [(216, 216), (108, 108), (54, 54)]
    page = tiff.pages[0]
    assert page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.is_tiled and page.tilewidth == 64
    assert page.dtype == np.uint8
    np.testing.assert_array_equal(page.colormap[:, :5], fx.COLOURS.T.astype(np.uint16) * 257)
    assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
    assert page.resolution == pytest.approx((1e4, 1e4))          # 1 µm/px
    assert levels[1].pages[0].resolution == pytest.approx((5e3, 5e3))
    assert 'PhysicalSizeX="1.0"' in tiff.ome_metadata
    full = levels[0].asarray()
    np.testing.assert_array_equal(levels[1].asarray(), full[::2, ::2])


def test_geojson_polygons_match_mask_areas_and_level0_coordinates(batch):
  import shapely.geometry
  mask = tifffile.imread(batch['out'] / 'a' / 'mask.tif')
  features = json.load(open(batch['out'] / 'a' / 'a.geojson'))['features']
  names = [f['properties']['classification']['name'] for f in features]
  assert names == ['TUM', 'STR', 'LYM', 'NEC']                      # no feature for the background
  for feature, value in zip(features, range(4)):
    props = feature['properties']
    assert props['objectType'] == 'annotation'
    assert props['classification']['color'] == fx.COLOURS[value].tolist()
    geometry = shapely.geometry.shape(feature['geometry'])
    assert geometry.is_valid
    mask_um2 = (mask == value).sum() * 1.0
    assert geometry.area * MPP0 ** 2 == pytest.approx(mask_um2, rel=0.01)
  tumour = shapely.geometry.shape(features[0]['geometry'])
  main = max(tumour.geoms, key=lambda p: p.area)
  assert len(tumour.geoms) == 2 and len(main.interiors) == 1          # the island, and the glass hole
  # Level-0 pixel bounds of cells [2:10, 2:12], within a mask pixel (4 level-0 px; JPEG edges) ...
  assert main.bounds == pytest.approx((2 * CELL, 2 * CELL, 12 * CELL, 10 * CELL), abs=4)
  # ... and exactly the outer pixel edges of the mask's own tumour component (mask pixel u spans level-0
  # pixels [4u, 4u + 4)).
  labels, _ = ndimage.label(mask == 0)
  rows, cols = np.nonzero(labels == labels[4 * int(CELL_M), 3 * int(CELL_M)])
  step = CELL * 2 / CELL_M / 2                                # 4 level-0 px per mask px
  assert main.bounds == pytest.approx((cols.min() * step, rows.min() * step, (cols.max() + 1) * step,
                                       (rows.max() + 1) * step), abs=1e-6)
  hole = shapely.geometry.Polygon(main.interiors[0])
  assert hole.bounds == pytest.approx((5 * CELL, 4 * CELL, 9 * CELL, 8 * CELL), abs=4)


def test_overlay_has_the_thumbnail_and_a_legend(batch):
  from PIL import Image
  overlay = np.asarray(Image.open(batch['out'] / 'a' / 'overlay.png').convert('RGB'))
  # A 216 µm slide: the overlay is drawn at the mask's 1 µm/px (finer than the 8 µm/px tissue thumbnail).
  thumb_width = 216
  assert overlay.shape[0] == thumb_width and overlay.shape[1] > thumb_width + 20
  assert (overlay[5, 5] == fx.GLASS).all()                    # glass is not tinted
  legend = overlay[:, thumb_width:].reshape(-1, 3)
  for colour in fx.COLOURS:
    assert (legend == colour).all(-1).any()


def test_rerun_skips_complete_slides_and_redoes_incomplete(batch, tmp_path):
  out = tmp_path / 'out'
  shutil.copytree(batch['out'], out)
  calls = []
  report = run_folder([str(batch['folder'])], out, fx.nearest_colour_stub(calls))
  assert len(report.skipped) == 2 and report.done == [] and calls == []
  os.remove(out / 'b' / 'summary.json')                       # as if killed before the completion mark
  report = run_folder([str(batch['folder'])], out, fx.nearest_colour_stub(calls))
  assert [os.path.basename(p) for p in report.skipped] == ['a.tif']
  assert [s['slide'] for s in report.done] == ['b'] and calls
  assert not [n for n in os.listdir(out / 'b') if '.partial-' in n or n.startswith('.mask-')]


def test_corrupt_and_mpp_less_slides_are_reported_and_the_others_complete(batch, tmp_path):
  folder = tmp_path / 'in'
  shutil.copytree(batch['folder'], folder)
  (folder / 'broken.tif').write_bytes(b'II*\x00' + os.urandom(300))
  whole = (folder / 'a.tif').read_bytes()
  (folder / 'cut.tif').write_bytes(whole[:len(whole) // 2])       # tile data cut off mid-file
  fx.write_pyramid(str(folder / 'nompp.tif'), fx.layout_image(make_layout(0), CELL), None, levels=2)
  report = run_folder([str(folder)], tmp_path / 'out')
  assert [s['slide'] for s in report.done] == ['a', 'b']
  failed = dict((os.path.basename(p), message) for p, message in report.failed)
  assert set(failed) == {'broken.tif', 'cut.tif', 'nompp.tif'}
  assert failed['broken.tif'].startswith(str(folder / 'broken.tif'))
  assert failed['cut.tif'].startswith(str(folder / 'cut.tif')) and 'decode' in failed['cut.tif']
  assert 'config.slides.slide_mpp' in failed['nompp.tif']
  assert report.exit_code == errors.EXIT_SOME_FAILED
  assert not os.path.exists(tmp_path / 'out' / 'broken')
  # With the override the slide without µm/px is accepted.
  report = run_folder([str(folder / 'nompp.tif')], tmp_path / 'out', slide_mpp=MPP0)
  assert report.failed == [] and report.done[0]['mpp_source'] == 'config.slides.slide_mpp'


def test_processes_divide_the_slides(batch, tmp_path):
  done = []
  for index in range(2):
    report = run.run_slides([str(batch['folder'])], fx.nearest_colour_stub(), config_slides=config(),
                            class_names=fx.NAMES, palette=fx.COLOURS, background_value=fx.BACKGROUND,
                            model_mpp=MODEL_MPP, tile_size=TILE, batch_size=4, out_root=str(tmp_path),
                            process_index=index, process_count=2)
    assert report.other_process == 1
    done.append([s['slide'] for s in report.done])
  assert done == [['a'], ['b']]


@pytest.mark.parametrize('model_mpp,level,factor', [(0.5, 1, 1.0), (0.7, 1, 1.4), (1.0, 2, 1.0)])
def test_reads_the_nearest_level_at_or_finer_than_the_model(batch, tmp_path, monkeypatch, model_mpp, level,
                                                           factor):
  levels = []
  original = reader.TiffSlide.read_region

  def recording(self, lv, x, y, width, height):
    levels.append((lv, width, height))
    return original(self, lv, x, y, width, height)

  monkeypatch.setattr(reader.TiffSlide, 'read_region', recording)
  d = 2 if model_mpp != 0.7 else 1
  report = run.run_slides([str(batch['folder'] / 'a.tif')], fx.nearest_colour_stub(),
                          config_slides=config(mask_downsample=d), class_names=fx.NAMES, palette=fx.COLOURS,
                          background_value=fx.BACKGROUND, model_mpp=model_mpp, tile_size=TILE, batch_size=4,
                          out_root=str(tmp_path))
  summary = report.done[0]
  assert (summary['level'], summary['resize_factor']) == (level, pytest.approx(factor))
  tile_reads = {lv for lv, width, height in levels if min(width, height) >= TILE * factor - 1
                and max(width, height) <= TILE * factor + 3}
  assert tile_reads == {level}                                # never level 0 when a closer level exists
  # The mask still lines up with the layout at level 0: the tumour's bounding box in level-0 pixels.
  import shapely.geometry
  features = json.load(open(tmp_path / 'a' / 'a.geojson'))['features']
  tumour = max(shapely.geometry.shape(features[0]['geometry']).geoms, key=lambda p: p.area)
  step = summary['level0_px_per_mask_px']
  assert tumour.bounds == pytest.approx((2 * CELL, 2 * CELL, 12 * CELL, 10 * CELL), abs=1.01 * step)


@pytest.mark.parametrize('blend', ['mean', 'gaussian'])
def test_no_seams_on_a_smooth_gradient(tmp_path, blend):
  # Lossless slide whose red channel rises smoothly from left to right; the stub's scores are a smooth
  # function of the pixel (so they vary inside a tile but agree wherever tiles overlap).
  width = 900
  red = np.round(np.linspace(30, 230, width)).astype(np.uint8)
  image = np.zeros((400, width, 3), np.uint8)
  image[..., 0] = red[None, :]
  image[..., 1] = 60
  image[..., 2] = 120
  path = str(tmp_path / 'gradient.tif')
  fx.write_pyramid(path, image, MPP0, levels=2, jpeg=False)

  def smooth_stub(tiles):
    r = tiles[..., 0].astype(np.float32) / 255.0
    scores = np.stack([r, 1 - r, 0 * r, 0 * r, 0 * r], -1)
    scores[~tiles.any(-1)] = 0
    return scores

  report = run.run_slides([path], smooth_stub, config_slides=config(blend=blend, tissue_method='none'),
                          class_names=fx.NAMES, palette=fx.COLOURS, background_value=fx.BACKGROUND,
                          model_mpp=MODEL_MPP, tile_size=TILE, batch_size=4, out_root=str(tmp_path / 'out'))
  assert report.failed == []
  mask = tifffile.imread(tmp_path / 'out' / 'gradient' / 'mask.tif')
  assert (mask[:, 0] == 1).all() and (mask[:, -2] == 0).all()
  boundary = (mask[:, :-1] == 1).sum(axis=1)                  # first class-0 column, row by row
  assert (boundary == boundary[0]).all()                      # a straight edge: no jumps at tile borders
  # The edge is where red crosses 127.5 (level 1 = every 2nd pixel, mask px = 2 level-1 px).
  crossing = np.argmax(red[::2].astype(np.float32) / 255.0 > 0.5)
  assert abs(boundary[0] - crossing / 2) <= 1


def test_a_slide_of_clean_glass_sends_nothing(tmp_path):
  glass = np.full((24, 24), fx.GLASS_CELL, np.uint8)
  fx.write_pyramid(str(tmp_path / 'glass.tif'), fx.layout_image(glass, CELL), MPP0, levels=3, jpeg=False)
  calls = []
  report = run_folder([str(tmp_path / 'glass.tif')], tmp_path / 'out', fx.nearest_colour_stub(calls))
  assert report.failed == [] and calls == [] and report.done[0]['tiles'] == 0
  assert (tifffile.imread(tmp_path / 'out' / 'glass' / 'mask.tif') == fx.BACKGROUND).all()
  assert json.load(open(tmp_path / 'out' / 'glass' / 'glass.geojson'))['features'] == []

  def strict(constant):
    raise AssertionError(f'summary.json holds {constant}, which is not JSON')

  json.loads((tmp_path / 'out' / 'glass' / 'summary.json').read_text(), parse_constant=strict)


def test_the_openslide_reader_gives_the_same_mask(batch, tmp_path):
  pytest.importorskip('openslide')
  report = run_folder([str(batch['folder'] / 'b.svs')], tmp_path, reader='openslide')
  assert report.done[0]['reader'] == 'openslide' and report.done[0]['mpp_source'] == 'openslide.mpp-x'
  np.testing.assert_array_equal(tifffile.imread(tmp_path / 'b' / 'mask.tif'),
                                tifffile.imread(batch['out'] / 'b' / 'mask.tif'))
