"""Image files to arrays: every tile mode converted exactly (or refused by name), masks, header-only probing.

Files are written by Pillow, tifffile, or by hand (16-bit colour PNG, which Pillow cannot write); expected
arrays come from the source samples with numpy formulas, never from the reader under test.
"""

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protoseg_jax.data import images, records
from protoseg_jax.errors import DatasetError

tifffile = pytest.importorskip('tifffile', reason='tifffile (the test extra) writes the TIFF tiles')

RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, (5, 7, 3), np.uint8)
ALPHA = np.concatenate([[0, 1, 127, 128, 254, 255], RNG.integers(0, 256, 29)]).astype(np.uint8).reshape(5, 7)
# 16-bit samples: both ends, the 8-bit levels scaled up (k * 257), halfway points between levels, random.
GREY16 = np.concatenate([[0, 1, 128, 129, 65535, 65534, 257 * 128, 257 * 128 + 128, 257 * 128 + 129, 65280],
                         RNG.integers(0, 65536, 25)]).astype(np.uint16).reshape(5, 7)


def mode_of(path):
  with Image.open(path) as image:
    return image.mode


def info_of(path):
  with Image.open(path) as image:
    return dict(image.info)


def over_white(colour, alpha):
  """Float reference of compositing over white, rounded."""
  a = alpha.astype(np.float64)[..., None] / 255.0
  return np.round(colour.astype(np.float64) * a + 255.0 * (1.0 - a)).astype(np.uint8)


def grey_to_rgb(grey):
  return np.repeat(np.asarray(grey, np.uint8)[..., None], 3, axis=-1)


def scale16(values):
  """round(v * 255 / 65535) in float64."""
  return np.round(values.astype(np.float64) * 255.0 / 65535.0).astype(np.uint8)


def save(tmp_path, name, image, **options):
  path = str(tmp_path / name)
  image.save(path, **options)
  return path


def png_by_hand(path, samples, colour_type):
  """A 16-bit PNG (colour type 2 = RGB, 6 = RGBA) written from the spec: IHDR, one IDAT, IEND."""
  height, width = samples.shape[:2]

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

  rows = b''.join(b'\x00' + row.astype('>u2').tobytes() for row in samples)  # filter type 0 on every row
  header = struct.pack('>IIBBBBB', width, height, 16, colour_type, 0, 0, 0)
  with open(path, 'wb') as handle:
    handle.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows))
                 + chunk(b'IEND', b''))
  return path


# --- tiles: every mode -----------------------------------------------------------------------------------

def test_8bit_rgb_in_png_tiff_bmp_as_is(tmp_path):
  for name in ('rgb.png', 'rgb.tif', 'rgb.bmp'):
    path = save(tmp_path, name, Image.fromarray(RGB8))
    out = images.read_image(path)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, RGB8)


def test_rgba_and_la_are_composited_over_white(tmp_path):
  path = save(tmp_path, 'rgba.png', Image.fromarray(np.dstack([RGB8, ALPHA]), 'RGBA'))
  expected = over_white(RGB8, ALPHA)
  np.testing.assert_array_equal(images.read_image(path), expected)
  assert (expected[ALPHA == 0] == 255).all() and (expected[ALPHA == 255] == RGB8[ALPHA == 255]).all()
  grey = RGB8[..., 0]
  path = save(tmp_path, 'la.png', Image.fromarray(np.dstack([grey, ALPHA]), 'LA'))
  assert mode_of(path) == 'LA'
  np.testing.assert_array_equal(images.read_image(path), over_white(grey_to_rgb(grey), ALPHA))


def test_palette_with_and_without_transparency(tmp_path):
  palette = RNG.integers(0, 256, (6, 3), np.uint8)
  indices = RNG.integers(0, 6, (5, 7), np.uint8)
  image = Image.fromarray(indices, 'P')
  image.putpalette(palette.flatten().tolist())
  path = save(tmp_path, 'p.png', image)
  np.testing.assert_array_equal(images.read_image(path), palette[indices])
  path = save(tmp_path, 'p_trns.png', image, transparency=2)  # index 2 fully transparent
  assert info_of(path)['transparency'] == 2
  np.testing.assert_array_equal(images.read_image(path),
                                np.where((indices == 2)[..., None], 255, palette[indices]).astype(np.uint8))
  alphas = np.array([255, 0, 64, 200, 255, 10], np.uint8)  # a tRNS alpha per palette entry
  path = save(tmp_path, 'p_alpha.png', image, transparency=alphas.tobytes())
  np.testing.assert_array_equal(images.read_image(path), over_white(palette[indices], alphas[indices]))


def test_grey_and_1bit_are_replicated(tmp_path):
  grey = RGB8[..., 1]
  for name in ('l.png', 'l.tif'):
    np.testing.assert_array_equal(images.read_image(save(tmp_path, name, Image.fromarray(grey, 'L'))),
                                  grey_to_rgb(grey))
  bits = RNG.integers(0, 2, (5, 7)).astype(bool)
  path = save(tmp_path, 'one.png', Image.fromarray(bits))
  assert mode_of(path) == '1'
  np.testing.assert_array_equal(images.read_image(path), grey_to_rgb(np.where(bits, 255, 0)))


def test_colour_key_transparency_in_grey_and_rgb(tmp_path):
  grey = RGB8[..., 2].copy()
  grey[0, 0] = 17
  path = save(tmp_path, 'l_key.png', Image.fromarray(grey, 'L'), transparency=17)
  np.testing.assert_array_equal(images.read_image(path),
                                np.where((grey == 17)[..., None], 255, grey_to_rgb(grey)).astype(np.uint8))
  rgb = RGB8.copy()
  rgb[1, 2] = (1, 2, 3)
  path = save(tmp_path, 'rgb_key.png', Image.fromarray(rgb), transparency=(1, 2, 3))
  keyed = (rgb == (1, 2, 3)).all(-1)
  expected = np.where(keyed[..., None], 255, rgb).astype(np.uint8)
  np.testing.assert_array_equal(images.read_image(path), expected)


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
  expected = grey_to_rgb(scale16(GREY16))
  assert len(np.unique(expected)) > 20  # the old `.convert('RGB')` made every value > 255 white
  paths = [save(tmp_path, 'i16.png', Image.fromarray(GREY16))]
  tifffile.imwrite(str(tmp_path / 'i16le.tif'), GREY16)
  tifffile.imwrite(str(tmp_path / 'i16be.tif'), GREY16.astype('>u2'), byteorder='>')
  paths += [str(tmp_path / 'i16le.tif'), str(tmp_path / 'i16be.tif')]
  assert [mode_of(path) for path in paths] == ['I;16', 'I;16', 'I;16B']
  for path in paths:
    np.testing.assert_array_equal(images.read_image(path), expected, err_msg=path)
  # A tRNS grey key on the 16-bit samples.
  path = save(tmp_path, 'i16_key.png', Image.fromarray(GREY16), transparency=int(GREY16[0, 3]))
  keyed = (GREY16 == GREY16[0, 3])[..., None]
  np.testing.assert_array_equal(images.read_image(path), np.where(keyed, 255, expected).astype(np.uint8))


def test_16bit_colour_is_pillows_high_byte(tmp_path):
  """Pillow keeps 8 bits of 48/64-bit PNG and TIFF: v >> 8, at most one level from round(v * 255 / 65535)."""
  rgb16 = np.stack([GREY16, GREY16[::-1], GREY16[:, ::-1]], -1)
  alpha16 = np.full(GREY16.shape, 65535, np.uint16)
  alpha16[0, :4] = (0, 32768, 65535, 257)
  path = png_by_hand(str(tmp_path / 'rgb48.png'), rgb16, colour_type=2)
  np.testing.assert_array_equal(images.read_image(path), (rgb16 >> 8).astype(np.uint8))
  assert np.abs((rgb16 >> 8).astype(int) - scale16(rgb16)).max() == 1
  path = png_by_hand(str(tmp_path / 'rgba64.png'), np.dstack([rgb16, alpha16]), colour_type=6)
  np.testing.assert_array_equal(images.read_image(path),
                                over_white((rgb16 >> 8).astype(np.uint8), (alpha16 >> 8).astype(np.uint8)))
  tifffile.imwrite(str(tmp_path / 'rgb48.tif'), rgb16, photometric='rgb')
  np.testing.assert_array_equal(images.read_image(str(tmp_path / 'rgb48.tif')), (rgb16 >> 8).astype(np.uint8))
  assert images.probe_image(path).bits == 16


def test_ycbcr_tiff_is_converted(tmp_path):
  ycbcr = np.dstack([RGB8[..., 0], np.full((5, 7), 128, np.uint8), np.full((5, 7), 128, np.uint8)])
  path = save(tmp_path, 'ycbcr.tif', Image.fromarray(ycbcr, 'YCbCr'))
  assert mode_of(path) == 'YCbCr'
  np.testing.assert_array_equal(images.read_image(path), grey_to_rgb(RGB8[..., 0]))  # Cb = Cr = 128: grey


@pytest.mark.parametrize('writer, message', [
    (lambda path: tifffile.imwrite(path, np.zeros((4, 4), np.float32)), r'32-bit float image \(mode F\)'),
    (lambda path: tifffile.imwrite(path, np.zeros((4, 4), np.int32)), r'32-bit integer image \(mode I\)'),
    (lambda path: tifffile.imwrite(path, np.zeros((4, 4), np.int16)), r'signed 16-bit integer image'),
    (lambda path: tifffile.imwrite(path, np.zeros((4, 4, 4), np.uint8), photometric='separated'),
     'CMYK image'),
    (lambda path: Image.new('CMYK', (4, 4)).save(path, 'JPEG'), 'CMYK image'),
    (lambda path: Image.new('LAB', (4, 4)).save(path, 'TIFF'), "image mode 'LAB' is not read"),
])
def test_modes_without_a_defined_rgb_are_refused_by_name(tmp_path, writer, message):
  path = str(tmp_path / 'tile.tif')
  writer(path)
  with pytest.raises(DatasetError, match=f'tile.tif: {message}'):
    images.read_image(path)
  with pytest.raises(DatasetError, match=f'tile.tif: {message}'):  # the same rule from the header alone
    images.probe_images([path])


def test_multipage_tiff_reads_the_first_page_and_warns_once(tmp_path, monkeypatch):
  monkeypatch.setattr(images, '_warned_multiframe', False)
  pages = np.stack([RGB8, 255 - RGB8])
  path = str(tmp_path / 'pages.tif')
  tifffile.imwrite(path, pages, photometric='rgb')
  with pytest.warns(UserWarning, match=r'pages\.tif: 2 frames / pages; the first is read'):
    np.testing.assert_array_equal(images.read_image(path), RGB8)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    np.testing.assert_array_equal(images.read_image(path), RGB8)  # once per process
  assert images.probe_image(path).frames == 2


def test_file_objects_and_record_bytes_read_alike(tmp_path):
  path = save(tmp_path, 'i16.png', Image.fromarray(GREY16))
  data = Path(path).read_bytes()
  expected = images.read_image(path)
  np.testing.assert_array_equal(images.read_image(io.BytesIO(data), name='x'), expected)
  np.testing.assert_array_equal(records.decode_image(data, 'shard: record 0'), expected)  # the Grain route
  with pytest.raises(DatasetError, match=r'^shard: record 3: unreadable image'):
    records.decode_image(b'not a png', 'shard: record 3')


def test_unreadable_truncated_and_missing_files_are_named(tmp_path):
  path = save(tmp_path, 'rgb.png', Image.fromarray(RNG.integers(0, 256, (64, 64, 3), np.uint8)))
  data = Path(path).read_bytes()
  (tmp_path / 'cut.png').write_bytes(data[:len(data) // 2])
  (tmp_path / 'junk.png').write_bytes(b'not an image')
  for name, message in (('cut.png', 'unreadable image'), ('junk.png', 'unreadable image'),
                        ('missing.png', 'file not found')):
    with pytest.raises(DatasetError, match=f'{name}: {message}'):
      images.read_image(str(tmp_path / name))


# --- masks -----------------------------------------------------------------------------------------------

def test_masks_values_from_palette_grey_16bit_and_colours(tmp_path):
  mask = RNG.integers(0, 5, (5, 7)).astype(np.uint8)
  images.write_palette_png(str(tmp_path / 'p.png'), mask, images.BCSS_PALETTE)
  save(tmp_path, 'l.png', Image.fromarray(mask, 'L'))
  save(tmp_path, 'i16.png', Image.fromarray(mask.astype(np.uint16)))  # class values, never scaled
  save(tmp_path, 'rgb.png', Image.fromarray(images.BCSS_PALETTE[mask]))
  save(tmp_path, 'rgba.png', Image.fromarray(np.dstack([images.BCSS_PALETTE[mask], ALPHA]), 'RGBA'))
  for name in ('p.png', 'l.png', 'i16.png', 'rgb.png', 'rgba.png'):
    out = images.read_mask(str(tmp_path / name), 5)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, mask, err_msg=name)
  save(tmp_path, 'big.png', Image.fromarray(np.full((5, 7), 300, np.uint16)))
  with pytest.raises(DatasetError, match=r'big\.png: mask values \[300\] outside 0\.\.4'):
    images.read_mask(str(tmp_path / 'big.png'), 5)
  save(tmp_path, 'la.png', Image.fromarray(np.dstack([mask, mask]), 'LA'))
  with pytest.raises(DatasetError, match=r"la\.png: mask mode 'LA' is not palette, grey or RGB"):
    images.read_mask(str(tmp_path / 'la.png'), 5)


def test_validate_masks_from_headers(tmp_path):
  tile = save(tmp_path, 'tile.png', Image.fromarray(RGB8))
  mask = RNG.integers(0, 5, (5, 7)).astype(np.uint8)
  images.write_palette_png(str(tmp_path / 'mask.png'), mask, images.BCSS_PALETTE)
  infos = images.validate_masks([(tile, str(tmp_path / 'mask.png'))], threads=2)
  assert [(info.mode, info.height, info.width) for info in infos] == [('P', 5, 7)]
  images.write_palette_png(str(tmp_path / 'small.png'), mask[:4], images.BCSS_PALETTE)
  with pytest.raises(DatasetError, match=r'small\.png: mask is 7x4 but its image is 7x5'):
    images.validate_masks([(tile, str(tmp_path / 'mask.png')), (tile, str(tmp_path / 'small.png'))])
  save(tmp_path, 'la.png', Image.fromarray(np.dstack([mask, mask]), 'LA'))
  with pytest.raises(DatasetError, match=r"la\.png: mask mode 'LA'"):
    images.validate_masks([(tile, str(tmp_path / 'la.png'))])


# --- probing headers -------------------------------------------------------------------------------------

def test_probe_reports_headers(tmp_path):
  paths = [save(tmp_path, 'rgb.png', Image.fromarray(RGB8)),
           save(tmp_path, 'i16.png', Image.fromarray(GREY16)),
           save(tmp_path, 'l.jpg', Image.fromarray(RGB8[..., 0], 'L'))]
  infos = images.probe_images(paths, expected_hw=(5, 7), threads=2)
  assert [(i.path, i.format, i.mode, i.height, i.width, i.bits, i.frames) for i in infos] == [
      (paths[0], 'PNG', 'RGB', 5, 7, 8, 1), (paths[1], 'PNG', 'I;16', 5, 7, 16, 1),
      (paths[2], 'JPEG', 'L', 5, 7, 8, 1)]


def test_probe_names_the_first_bad_file(tmp_path):
  good = [save(tmp_path, f'good{i}.png', Image.fromarray(RGB8)) for i in range(20)]
  wide = save(tmp_path, 'wide.png', Image.fromarray(np.zeros((5, 9, 3), np.uint8)))
  (tmp_path / 'junk.png').write_bytes(b'not an image')
  with pytest.raises(DatasetError, match=r'wide\.png: tile is 9x5, config\.data\.image_size is 7x5'):
    images.probe_images(good + [wide, str(tmp_path / 'junk.png')], expected_hw=(5, 7), threads=4,
                        size_key='config.data.image_size')
  with pytest.raises(DatasetError, match=r'junk\.png: unreadable image'):
    images.probe_images(good + [str(tmp_path / 'junk.png'), wide], expected_hw=(5, 7), threads=4)
  with pytest.raises(DatasetError, match=r'gone\.png: file not found'):
    images.probe_images([str(tmp_path / 'gone.png')])
  assert len(images.probe_images(good + [wide])) == 21  # no expected size: any size


def test_probe_finds_cut_short_png_and_jpeg_from_their_ends(tmp_path):
  big = RNG.integers(0, 256, (96, 96, 3), np.uint8)
  for name in ('cut.png', 'cut.jpg'):
    path = save(tmp_path, name, Image.fromarray(big))
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:len(data) * 2 // 3])
    with pytest.raises(DatasetError, match=f'{name}: truncated (PNG|JPEG)'):
      images.probe_images([path])
  # Only headers are read: a PNG whose compressed pixels are damaged passes the probe; decoding finds it.
  path = save(tmp_path, 'damaged.png', Image.fromarray(big))
  data = bytearray(Path(path).read_bytes())
  start = data.index(b'IDAT') + 4
  data[start + 10:start + 60] = bytes(50)
  Path(path).write_bytes(bytes(data))
  images.probe_images([path])
  with pytest.raises(DatasetError, match=r'damaged\.png: unreadable image'):
    images.read_image(path)


def test_bcss_re_exports_the_image_functions():
  from protoseg_jax.data import bcss

  for name in ('read_image', 'read_mask', 'colorize', 'overlay', 'write_palette_png', 'label_from_mask',
               'BCSS_PALETTE'):
    assert getattr(bcss, name) is getattr(images, name)
  assert os.path.basename(images.__file__) == 'images.py'
