"""BCSS-WSSS reader: labels, layout aliases, masks, and the error messages a user sees."""

import os

import numpy as np
import pytest
from PIL import Image

from protoseg_jax.data import bcss


def write_png(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8), mode=mode).save(path)


def make_dataset(root, train_dir='training', val_dir='val'):
  rng = np.random.default_rng(0)
  tile = lambda: rng.integers(0, 256, (8, 8, 3), np.uint8)
  write_png(os.path.join(root, train_dir, 'a+0[1101].png'), tile())
  write_png(os.path.join(root, train_dir, 'b+0[0010].png'), tile())
  mask = np.array([[0, 4], [2, 2]], np.uint8).repeat(4, 0).repeat(4, 1)
  write_png(os.path.join(root, val_dir, 'img', 'v1.png'), tile())
  os.makedirs(os.path.join(root, val_dir, 'mask'))
  bcss.write_palette_png(os.path.join(root, val_dir, 'mask', 'v1.png'), mask, bcss.BCSS_PALETTE)
  return mask


def test_parse_label_compact_and_spaced():
  np.testing.assert_array_equal(bcss.parse_label('TCGA-A1+0[1101].png', 4), [1, 1, 0, 1])
  np.testing.assert_array_equal(bcss.parse_label('x[2][1 0 1 0].png', 4), [1, 0, 1, 0])  # last group wins


@pytest.mark.parametrize('name, message', [('tile.png', 'no image-level label'),
                                           ('tile[110].png', 'must be 4 digits'),
                                           ('tile[1201].png', 'must be 4 digits')])
def test_parse_label_errors_name_the_file(name, message):
  with pytest.raises(bcss.DatasetError, match=message) as error:
    bcss.parse_label(name, 4)
  assert name in str(error.value)


def test_lists_tiles_with_aliases(tmp_path):
  make_dataset(str(tmp_path), train_dir='train', val_dir='valid')
  tiles = bcss.list_train_tiles(str(tmp_path), 4)
  assert [os.path.basename(p) for p, _ in tiles] == ['a+0[1101].png', 'b+0[0010].png']
  np.testing.assert_array_equal(tiles[1][1], [0, 0, 1, 0])
  pairs = bcss.list_eval_tiles(str(tmp_path), 'val')
  assert [os.path.basename(p) for pair in pairs for p in pair] == ['v1.png', 'v1.png']


def test_palette_grey_and_rgb_masks_read_identically(tmp_path):
  mask = make_dataset(str(tmp_path))
  palette_path = os.path.join(tmp_path, 'val', 'mask', 'v1.png')
  assert Image.open(palette_path).mode == 'P'
  write_png(os.path.join(tmp_path, 'grey.png'), mask, mode='L')
  write_png(os.path.join(tmp_path, 'rgb.png'), bcss.BCSS_PALETTE[mask])
  for path in (palette_path, os.path.join(tmp_path, 'grey.png'), os.path.join(tmp_path, 'rgb.png')):
    np.testing.assert_array_equal(bcss.read_mask(path, 5), mask)
  np.testing.assert_array_equal(bcss.label_from_mask(mask, 4), [1, 0, 1, 0])


def expect_error(fn, *fragments):
  with pytest.raises(bcss.DatasetError) as error:
    fn()
  for fragment in fragments:
    assert fragment in str(error.value), str(error.value)


def test_error_messages_name_the_file(tmp_path):
  root = str(tmp_path)
  expect_error(lambda: bcss.list_train_tiles(os.path.join(root, 'missing'), 4), 'missing', 'not found')
  make_dataset(root)
  expect_error(lambda: bcss.list_eval_tiles(root, 'test'), 'no test folder')
  write_png(os.path.join(root, 'training', 'nolabel.png'), np.zeros((8, 8, 3)))
  expect_error(lambda: bcss.list_train_tiles(root, 4), 'nolabel.png', 'no image-level label')
  os.remove(os.path.join(root, 'training', 'nolabel.png'))
  write_png(os.path.join(root, 'val', 'img', 'orphan.png'), np.zeros((8, 8, 3)))
  expect_error(lambda: bcss.list_eval_tiles(root, 'val'), 'orphan.png', 'no mask')
  corrupt = os.path.join(root, 'corrupt.png')
  with open(corrupt, 'wb') as handle:
    handle.write(b'not a png at all')
  expect_error(lambda: bcss.read_image(corrupt), 'corrupt.png', 'unreadable')
  valid = os.path.join(root, 'training', 'a+0[1101].png')
  data = open(valid, 'rb').read()
  truncated = os.path.join(root, 'truncated.png')
  with open(truncated, 'wb') as handle:
    handle.write(data[:len(data) // 2])
  expect_error(lambda: bcss.read_image(truncated), 'truncated.png', 'unreadable')
  write_png(os.path.join(root, 'bad_mask.png'), np.full((4, 4), 7), mode='L')
  expect_error(lambda: bcss.read_mask(os.path.join(root, 'bad_mask.png'), 5), 'bad_mask.png', '[7]')


def test_empty_training_folder(tmp_path):
  os.makedirs(tmp_path / 'training')
  expect_error(lambda: bcss.list_train_tiles(str(tmp_path), 4), 'training', 'no tiles')


def test_overlay_and_colorize():
  image = np.full((1, 2, 3), 100, np.uint8)
  mask = np.array([[0, 4]], np.uint8)
  np.testing.assert_array_equal(bcss.colorize(mask, bcss.BCSS_PALETTE), [[[255, 0, 0], [255, 255, 255]]])
  np.testing.assert_array_equal(bcss.overlay(image, mask, bcss.BCSS_PALETTE, 0.5),
                                [[[178, 50, 50], [178, 178, 178]]])
