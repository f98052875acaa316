"""MPAMatch data: GlaS / EBHI-Seg / KPI / folder readers and their errors, the seeded split file, host
batches, the core's sliding-window stitching and MPAMatch's metric summary, and the CLI round trip (train ->
eval -> predict -> export) on a tiny synthetic set."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from protoseg_jax import inference
from protoseg_jax.data import segmentation_sets as sets
from protoseg_jax.errors import DatasetError
from protoseg_jax.methods.mpamatch import data, method as method_lib
from protoseg_jax.methods.mpamatch.config import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _glas(root, count=8, size=(10, 12)):
  rng = np.random.default_rng(0)
  for prefix, n in (('train', count), ('testA', 2), ('testB', 1)):
    for i in range(1, n + 1):
      _write(f'{root}/{prefix}_{i}.bmp', rng.integers(0, 256, size + (3,)))
      anno = np.zeros(size, np.uint8)
      anno[2:5, 3:7] = i          # instance ids -> foreground
      _write(f'{root}/{prefix}_{i}_anno.bmp', anno)
  return root


def _config(kind='glas', root=''):
  config = get_config()
  config.data.kind = kind
  config.data.root = root
  return config


def test_glas_reader_pairs_splits_and_binarises_instances(tmp_path):
  root = _glas(str(tmp_path / 'glas'))
  splits = sets.list_glas(root)
  assert len(splits['train']) == 8 and len(splits['testA']) == 2 and len(splits['test']) == 3
  pair = splits['train'][2]
  assert pair.id == 'train_3.bmp' and pair.mask.endswith('train_3_anno.bmp')
  image, mask = sets.load_pair(pair, _config(root=root).data)
  assert image.shape == (10, 12, 3) and mask.shape == (10, 12)
  assert set(np.unique(mask)) == {0, 1} and mask[2:5, 3:7].all() and mask.sum() == 12


def test_missing_annotation_is_named(tmp_path):
  root = _glas(str(tmp_path / 'glas'))
  os.remove(f'{root}/train_5_anno.bmp')
  with pytest.raises(DatasetError, match='train_5.bmp: no annotation'):
    sets.list_glas(root)


def test_mismatched_sizes_are_named(tmp_path):
  root = _glas(str(tmp_path / 'glas'))
  _write(f'{root}/train_2_anno.bmp', np.zeros((9, 12)))
  pair = sets.list_glas(root)['train'][1]
  with pytest.raises(DatasetError,
                     match=r'train_2_anno.bmp: annotation is 12x9 but its image .*train_2.bmp is 12x10'):
    sets.load_pair(pair, _config(root=root).data)


def test_empty_splits_are_reported(tmp_path):
  config = _config('folder', str(tmp_path / 'empty'))
  os.makedirs(tmp_path / 'empty' / 'train' / 'images')
  os.makedirs(tmp_path / 'empty' / 'train' / 'masks')
  with pytest.raises(DatasetError, match='no training images'):
    sets.list_dataset(config.data, config.data.root)
  root = _glas(str(tmp_path / 'glas'), count=4)
  config = _config(root=root)
  config.data.labelled_fraction = 1.0
  splits = sets.list_dataset(config.data, root)
  split = sets.load_or_create_split(splits, config.data, str(tmp_path / 'split.json'))
  assert split['unlabelled'] == []
  with pytest.raises(DatasetError, match='unlabelled split is empty'):
    data.load_train_batches(config.data, config.train, splits, split, 0, need_unlabelled=True)
  with open(tmp_path / 'bad.json', 'w') as handle:
    json.dump({'labelled': [], 'unlabelled': ['train_1.bmp'], 'val': []}, handle)
  with pytest.raises(DatasetError, match='labelled split is empty'):
    sets.load_or_create_split(splits, config.data, str(tmp_path / 'bad.json'))
  with pytest.raises(DatasetError, match="split 'testB' is empty or absent"):
    sets.eval_pairs({'train': splits['train']}, split, 'testB')


@pytest.mark.parametrize('fraction,labelled', [(1 / 8, 9), (1 / 4, 18), (1 / 2, 36)])
def test_seeded_split_file(tmp_path, fraction, labelled):
  root = _glas(str(tmp_path / 'glas'), count=80, size=(4, 4))
  config = _config(root=root)
  config.data.labelled_fraction = fraction
  splits = sets.list_dataset(config.data, root)
  path = sets.split_path(config.data, str(tmp_path))
  assert os.path.basename(path) == f'split_{fraction:g}_seed0.json'
  split = sets.load_or_create_split(splits, config.data, path)
  assert len(split['val']) == 8                       # 10 % held out for validation
  assert len(split['labelled']) == labelled and len(split['labelled']) + len(split['unlabelled']) == 72
  assert not set(split['labelled']) & set(split['unlabelled'])
  assert not set(split['val']) & set(split['labelled'])
  assert sets.make_split(splits, config.data) == split            # deterministic
  assert sets.load_or_create_split(splits, config.data, path) == split  # read back
  config.data.split_seed = 1
  assert sets.make_split(splits, config.data)['labelled'] != split['labelled']
  with open(path, 'w') as handle:
    json.dump(dict(split, labelled=split['labelled'] + ['train_999.bmp']), handle)
  with pytest.raises(DatasetError, match='train_999.bmp'):
    sets.load_or_create_split(splits, config.data, path)


def test_kpi_and_ebhi_layouts(tmp_path):
  kpi = tmp_path / 'kpi'
  for split in ('train', 'validation'):
    for i in range(2):
      _write(f'{kpi}/{split}/DN/case{i}/img/DN_{i}_4096_0_img.jpg', np.full((8, 8, 3), 120))
      _write(f'{kpi}/{split}/DN/case{i}/mask/DN_{i}_4096_0_mask.jpg', np.full((8, 8), 250))
  splits = sets.list_kpi(str(kpi))
  assert len(splits['train']) == 2 and len(splits['val']) == 2 and 'test' not in splits
  assert splits['train'][0].mask.endswith('DN_0_4096_0_mask.jpg')
  config = _config('kpi', str(kpi))
  config.data.mask_threshold = 127
  assert sets.load_pair(splits['train'][0], config.data)[1].all()

  ebhi = tmp_path / 'ebhi'
  for category, n in (('Adenocarcinoma', 5), ('Polyp', 10), ('Normal', 5)):
    for i in range(n):
      _write(f'{ebhi}/{category}/image/{i}.png', np.zeros((4, 4, 3)))
      _write(f'{ebhi}/{category}/label/{i}.png', np.zeros((4, 4)))
  gland, cancer = sets.list_ebhi(str(ebhi), 'gland', 0), sets.list_ebhi(str(ebhi), 'cancer', 0)
  assert len(gland['train']) + len(gland['test']) == 15 and len(gland['test']) == 3
  assert all(p.id.startswith('Adenocarcinoma/') for p in cancer['train'] + cancer['test'])
  os.remove(f'{ebhi}/Polyp/label/3.png')
  with pytest.raises(DatasetError, match=r'Polyp/image/3.png: no annotation'):
    sets.list_ebhi(str(ebhi), 'gland', 0)


def test_synthetic_set_is_written_once_reused_and_never_mixed(tmp_path):
  data_config = get_config().data
  data_config.synthetic.update(num_train=3, num_val=1, num_test=1, render_size=16, foreground_values=(0,))
  root = str(tmp_path / 'synth')
  os.makedirs(root + '.partial/train')                    # left over by a killed run
  assert sets.write_synthetic(root, data_config) == root
  assert not os.path.exists(root + '.partial')
  names = sorted(os.listdir(os.path.join(root, 'train', 'images')))
  stamps = {name: os.stat(os.path.join(root, 'train', 'images', name)).st_mtime_ns for name in names}
  with open(os.path.join(root, 'synthetic.json')) as manifest:
    assert len(names) == 3 and json.load(manifest)['num_train'] == 3
  assert sets.write_synthetic(root, data_config) == root       # the same set: reused, nothing rewritten
  assert {name: os.stat(os.path.join(root, 'train', 'images', name)).st_mtime_ns for name in names} == stamps
  data_config.synthetic.num_train = 4
  with pytest.raises(DatasetError, match=rf'^{root} already holds other data \(a different synthetic set or a '
                     r'real one\); choose an empty folder or set config.data.root$'):
    sets.write_synthetic(root, data_config)


def test_semi_batches_are_deterministic_and_pad_with_ignore():
  rng = np.random.default_rng(0)
  labelled = [(rng.integers(0, 256, (6, 7, 3)).astype(np.uint8), np.ones((6, 7), np.uint8))]
  unlabelled = [rng.integers(0, 256, (20, 20, 3)).astype(np.uint8) for _ in range(3)]
  batches = data.SemiBatches(labelled, unlabelled, 2, 4, window=8, seed=3)
  first, again = batches.batch(5), batches.batch(5)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert first['x'].shape == (2, 8, 8, 3) and first['u'].shape == (4, 8, 8, 3)
  assert (first['y'][:, 6:] == 255).all() and (first['y'][:, :, 7:] == 255).all()
  assert (first['y'][:, :6, :7] == 1).all()
  assert (first['u_ignore'] == 0).all()  # 20 x 20 images: windows never need padding
  seen = {int(np.asarray(batches.batch(s)['u'][i]).sum()) for s in range(3) for i in range(4)}
  assert len(seen) > 3  # different windows / images over steps


def test_sliding_window_reassembles_the_whole_image():
  image = np.random.default_rng(0).integers(0, 256, (37, 50, 3)).astype(np.uint8)

  def scores_call(windows, labels):  # "scores" that encode the pixel itself: exact reassembly check
    assert windows.shape == (4, 16, 16, 3) and labels.shape == (4, 2)
    return windows.astype(np.float32)

  assert inference.window_starts(50, 16, 11) == [0, 11, 22, 33, 34]
  assert inference.window_starts(10, 16, 11) == [0]
  (index, out), = inference.stitched_scores(scores_call, [image], np.full((1, 2), -1, np.int32), 16, 11, 4)
  assert index == 0 and out.shape == image.shape
  np.testing.assert_allclose(out, image.astype(np.float32), rtol=1e-6)


def test_summarize_puts_background_first():
  confusion = np.asarray([[50, 10], [5, 35]])
  # Two images: one holding all the foreground (Dice 70 / 85), one with no foreground in either the mask or
  # the prediction (Dice 0 / 0: skipped by the image-wise Dice).
  per_image = np.stack([np.asarray([[30, 10], [5, 35]]), np.asarray([[20, 0], [0, 0]])])
  assert (per_image.sum(axis=0) == confusion).all()
  result = method_lib.summarize(confusion, per_image, ('background tissue', 'colorectal gland'))
  assert result['mDice'] == pytest.approx(70 / 85)            # foreground Dice = 2*35 / (70 + 10 + 5)
  assert result['mIoU'] == pytest.approx(35 / 50)
  assert result['mIoU_all'] == pytest.approx((35 / 50 + 50 / 65) / 2)
  assert result['image_Dice'] == pytest.approx(70 / 85)       # the empty second image is skipped


@pytest.mark.slow
def test_cli_train_eval_predict_round_trip(tmp_path):
  """Supervised variant (fastest to compile) through `protoseg_jax.main`: train, eval, predict, export."""
  workdir = str(tmp_path / 'run')
  tiny = [f'--config={ROOT}/configs/mpamatch_demo.py', f'--workdir={workdir}',
          '--config.data.synthetic.num_train=8', '--config.data.synthetic.num_val=2',
          '--config.data.synthetic.num_test=2', '--config.data.synthetic.render_size=40',
          '--config.data.image_size=32', '--config.data.train_window=32', '--config.eval.stride=16',
          '--config.eval.batch_size=4', '--config.model.vit.width=16', '--config.model.vit.depth=1',
          '--config.model.vit.taps=(0,)', '--config.model.vit.pos_embed_grid=4',
          '--config.model.bottleneck_channels=8', '--config.model.decoder_channels=(4,4,4)',
          '--config.model.text.width=8', '--config.model.text.depth=1', '--config.model.text.embed_dim=8',
          '--config.model.embed_dim=8', '--config.model.embed_hidden=8', '--config.loss.variant=supervised',
          '--config.train.steps=2', '--config.train.eval_every_steps=2', '--config.train.log_every_steps=1',
          '--config.train.labelled_batch_size=2']
  run = lambda *extra: subprocess.run([sys.executable, '-m', 'protoseg_jax.main', *tiny, *extra],
                                      capture_output=True, text=True, cwd=ROOT)
  result = run('--mode=train')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'final val metrics (step 2)' in result.stdout and 'mIoU' in result.stdout
  records = [json.loads(line) for line in open(os.path.join(workdir, 'train_metrics.jsonl'))]
  assert [r['step'] for r in records] == [1, 2]
  result = run('--mode=eval', '--checkpoint=last')
  assert result.returncode == 0, result.stderr[-2000:]
  scores = json.load(open(os.path.join(workdir, 'eval_test.json')))
  assert scores['split'] == 'test' and scores['examples'] == 2 and 0.0 <= scores['mIoU_all'] <= 1.0
  test_images = os.path.join(workdir, 'synthetic_seg', 'test', 'images')
  result = run('--mode=predict', f'--input={test_images}')
  assert result.returncode == 0, result.stderr[-2000:]
  masks = sorted(os.listdir(os.path.join(workdir, 'predictions', 'masks')))
  assert masks == sorted(os.listdir(test_images))
  mask = Image.open(os.path.join(workdir, 'predictions', 'masks', masks[0]))
  assert mask.mode == 'P' and mask.size == (40, 40) and np.asarray(mask).max() < 5
  result = run('--mode=export', f'--out={workdir}/exported')
  assert result.returncode == 0, result.stderr[-2000:]
  from safetensors.numpy import load_file
  exported = load_file(os.path.join(workdir, 'exported', 'mpamatch.safetensors'))
  assert exported['segmentation_head.0.weight'].shape == (5, 4, 3, 3)  # OIHW, 5 synthetic classes
  assert exported['decoder.conv_more.1.running_var'].shape == (8,)
  assert set(load_file(os.path.join(workdir, 'exported', 'encoder_timm.safetensors'))) == {
      key[len('encoder.'):] for key in exported if key.startswith('encoder.')}
  result = run('--mode=eval', '--checkpoint=nope')
  assert result.returncode == 2 and '--checkpoint must be' in result.stderr and "'nope'" in result.stderr


def test_published_config_presets():
  sys.path.insert(0, ROOT)
  from configs import glas_semi
  from protoseg_jax.methods.mpamatch import train

  for preset in glas_semi.PRESETS:
    config = glas_semi.get_config(preset)
    assert config.method == 'mpamatch' and len(config.data.class_names) == 2
    model_config = train.segmenter_config(config)
    assert model_config.vit.width == 1024 and model_config.vit.depth == 24 and model_config.embed_stride == 4
  assert glas_semi.get_config('ebhi_cancer').data.class_names[1] == 'colorectal adenocarcinoma'
  with pytest.raises(ValueError, match='config'):
    glas_semi.get_config('camelyon')
