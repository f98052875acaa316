"""The synthetic H&E set: determinism, labels consistent with masks, class statistics, layout."""

import hashlib
import os

import numpy as np
import pytest

from protoseg_jax.data import bcss, synthetic


def digest(root):
  hasher = hashlib.sha256()
  for folder, _, files in sorted(os.walk(root)):
    for name in sorted(files):
      hasher.update(name.encode())
      hasher.update(open(os.path.join(folder, name), 'rb').read())
  return hasher.hexdigest()


@pytest.fixture(scope='module')
def small_set(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('synth') / 'set')
  synthetic.write_bcss_layout(root, num_train=12, num_val=4, num_test=3, size=64, seed=3)
  return root


def test_deterministic_and_seed_dependent(small_set, tmp_path):
  again = synthetic.write_bcss_layout(str(tmp_path / 'again'), 12, 4, 3, size=64, seed=3)
  other = synthetic.write_bcss_layout(str(tmp_path / 'other'), 12, 4, 3, size=64, seed=4)
  assert digest(small_set) == digest(again) != digest(other)


def test_reuses_identical_set_and_refuses_to_mix(small_set):
  before = digest(small_set)
  assert synthetic.write_bcss_layout(small_set, 12, 4, 3, size=64, seed=3) == small_set
  assert digest(small_set) == before
  with pytest.raises(bcss.DatasetError, match='already holds other data'):
    synthetic.write_bcss_layout(small_set, 13, 4, 3, size=64, seed=3)


def test_reader_reads_it_and_file_labels_match_masks(small_set):
  tiles = bcss.list_train_tiles(small_set, 4)
  assert len(tiles) == 12 and all(label.sum() >= 1 for _, label in tiles)
  pairs = bcss.list_eval_tiles(small_set, 'val')
  assert len(pairs) == 4 and len(bcss.list_eval_tiles(small_set, 'test')) == 3
  for index, (image_path, mask_path) in enumerate(pairs):
    image, mask = synthetic.render_tile(synthetic._tile_rng(3, 'val', index), 64)
    np.testing.assert_array_equal(bcss.read_image(image_path), image)
    np.testing.assert_array_equal(bcss.read_mask(mask_path, 5), mask)


def test_training_label_is_the_set_of_mask_classes():
  for index in range(6):
    rng = synthetic._tile_rng(0, 'train', index)
    _, mask = synthetic.render_tile(rng, 64)
    label = bcss.parse_label(f'x[{synthetic._label_text(mask)}].png', 4)
    np.testing.assert_array_equal(label, bcss.label_from_mask(mask, 4))


def test_all_values_occur_and_classes_differ_in_colour_and_texture():
  colour = {value: [] for value in range(5)}
  darkness = {value: [] for value in range(5)}
  for index in range(40):
    image, mask = synthetic.render_tile(np.random.default_rng(index), 96)
    grey = image.astype(np.float64).mean(-1)
    for value in np.unique(mask):
      region = mask == value
      colour[value].append(image[region].mean(0))
      darkness[value].append((grey[region] < 110).mean())  # fraction of nucleus-dark pixels
  assert all(colour[value] for value in range(5)), 'every class value must occur'
  mean = {value: np.mean(colour[value], 0) for value in range(5)}
  dark = {value: np.mean(darkness[value]) for value in range(5)}
  assert mean[4].min() > 220                       # background is near-white
  assert dark[2] > 2 * dark[1] and dark[0] > 2 * dark[1] and dark[3] < dark[2]  # nuclei-rich classes
  assert np.abs(mean[0] - mean[1]).max() > 15      # tumour and stroma differ in colour
