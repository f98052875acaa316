"""Fully annotated segmentation sets (GlaS, EBHI-SEG, KPI, a generic folder layout, the synthetic set):
readers, the seeded labelled / unlabelled split file, and evaluation splits as `method.EvalSet`.

Layouts (class 0 = background in every mask after reading):
  glas      <root>/train_XX.bmp + train_XX_anno.bmp, testA_XX(.bmp, _anno.bmp), testB_XX(...) (Warwick QU);
            instance masks, foreground = value > config.data.mask_threshold. Splits: train, test (A + B),
            testA, testB.
  ebhi      <root>/<Category>/image/*.png + <Category>/label/*.png (EBHI-Seg); subset 'gland' = every
            category but Adenocarcinoma, 'cancer' = Adenocarcinoma [DEC]. No official split: a seeded 80/20
            train/test split of the subset's images [DEC].
  kpi       <root>/{train,validation|val,test}/**/img/<name>_img.<ext> + **/mask/<name>_mask.<ext>
            (KPIs 2024 task 1 patches). JPEG masks: set config.data.mask_threshold = 127.
  folder    <root>/{train,val,test}/{images|image|img}/ + {masks|mask|labels|label}/, masks matched by stem
            (a `_mask`/`_anno`/`_label` suffix is allowed); config.data.mask_mode 'binary' or 'index'.
  synthetic the procedural H&E set (protoseg_jax.data.synthetic), written once in the `folder` layout.
Every user-facing problem raises `DatasetError` naming the file or folder.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import os
from typing import Sequence

import ml_collections
import numpy as np
from PIL import Image

from protoseg_jax.data import synthetic
from protoseg_jax.data import images as images_lib
from protoseg_jax.data.bcss import IMAGE_EXTENSIONS
from protoseg_jax.errors import ConfigError, DatasetError
from protoseg_jax.method import EvalSet

IGNORE = 255
EBHI_CANCER_CATEGORY = 'Adenocarcinoma'
MASK_SUFFIXES = ('_mask', '_anno', '_label', '_labels', '_gt')
FOLDER_IMAGE_DIRS = ('images', 'image', 'img')
FOLDER_MASK_DIRS = ('masks', 'mask', 'labels', 'label')
FOLDER_SPLIT_DIRS = {'train': ('train', 'training'), 'val': ('val', 'valid', 'validation'), 'test': ('test',)}
EBHI_TEST_FRACTION = 0.2


@dataclasses.dataclass(frozen=True)
class Pair:
  """One annotated image: `id` is its path relative to the dataset root (stable across machines)."""

  id: str
  image: str
  mask: str


# --- listing ---------------------------------------------------------------------------------------

def _images_in(folder: str, recursive: bool = False) -> list[str]:
  pattern = os.path.join(folder, '**', '*') if recursive else os.path.join(folder, '*')
  return sorted(path for path in glob.glob(pattern, recursive=recursive)
                if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(path))


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _match_masks(root: str, images: Sequence[str], masks: Sequence[str], where: str) -> list[Pair]:
  """Pairs images with masks by stem (mask stem may carry one of MASK_SUFFIXES)."""
  by_stem = {}
  for mask in masks:
    stem = _stem(mask)
    by_stem[stem] = mask
    for suffix in MASK_SUFFIXES:
      if stem.endswith(suffix):
        by_stem.setdefault(stem[:-len(suffix)], mask)
  pairs = []
  for image in images:
    stem = _stem(image)
    key = stem[:-len('_img')] if stem.endswith('_img') and stem not in by_stem else stem
    if key not in by_stem:
      raise DatasetError(f'{image}: no annotation found in {where} (expected {key}.png or {key}_mask.*)')
    pairs.append(Pair(os.path.relpath(image, root), image, by_stem[key]))
  return pairs


def list_glas(root: str) -> dict[str, list[Pair]]:
  files = _images_in(root)
  annotations = [path for path in files if _stem(path).endswith('_anno')]
  splits = {}
  for split, prefix in (('train', 'train_'), ('testA', 'testA_'), ('testB', 'testB_')):
    images = [path for path in files if os.path.basename(path).startswith(prefix)
              and not _stem(path).endswith('_anno')]
    splits[split] = _match_masks(root, images, [a for a in annotations
                                                if os.path.basename(a).startswith(prefix)], root)
  splits['test'] = splits['testA'] + splits['testB']
  return splits


def _seeded_split(pairs: list[Pair], fraction: float, seed: int, salt: int) -> tuple[list[Pair], list[Pair]]:
  order = np.random.default_rng([seed, salt]).permutation(len(pairs))
  count = int(round(fraction * len(pairs)))
  chosen = set(order[:count].tolist())
  return ([p for i, p in enumerate(pairs) if i not in chosen], [p for i, p in enumerate(pairs) if i in chosen])


def list_ebhi(root: str, subset: str, seed: int) -> dict[str, list[Pair]]:
  if subset not in ('gland', 'cancer'):
    raise ConfigError(f"config.data.ebhi_subset must be 'gland' or 'cancer', got {subset!r}")
  if not os.path.isdir(root):
    raise DatasetError(f'dataset folder not found: {root}')
  categories = sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name, 'image')))
  if not categories:
    raise DatasetError(f'{root}: no <Category>/image/ folders (EBHI-Seg layout)')
  wanted = [c for c in categories if (c == EBHI_CANCER_CATEGORY) == (subset == 'cancer')]
  pairs = []
  for category in wanted:
    folder = os.path.join(root, category)
    label_dir = os.path.join(folder, 'label')
    if not os.path.isdir(label_dir):
      raise DatasetError(f'{label_dir}: folder missing (every category needs image/ and label/)')
    pairs += _match_masks(root, _images_in(os.path.join(folder, 'image')), _images_in(label_dir), label_dir)
  train, test = _seeded_split(pairs, EBHI_TEST_FRACTION, seed, salt=1)
  return {'train': train, 'test': test}


def list_kpi(root: str) -> dict[str, list[Pair]]:
  splits = {}
  for split, names in FOLDER_SPLIT_DIRS.items():
    folder = next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)
    if folder is None:
      continue
    files = _images_in(folder, recursive=True)
    images = [p for p in files if os.path.basename(os.path.dirname(p)) == 'img']
    masks = [p for p in files if os.path.basename(os.path.dirname(p)) == 'mask']
    splits[split] = _match_masks(root, images, masks, folder)
  return splits


def list_folder(root: str) -> dict[str, list[Pair]]:
  splits = {}
  for split, names in FOLDER_SPLIT_DIRS.items():
    folder = next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)
    if folder is None:
      continue
    image_dir = next((os.path.join(folder, n) for n in FOLDER_IMAGE_DIRS
                      if os.path.isdir(os.path.join(folder, n))), None)
    mask_dir = next((os.path.join(folder, n) for n in FOLDER_MASK_DIRS
                     if os.path.isdir(os.path.join(folder, n))), None)
    if image_dir is None or mask_dir is None:
      raise DatasetError(f'{folder}: needs an images/ and a masks/ folder')
    splits[split] = _match_masks(root, _images_in(image_dir), _images_in(mask_dir), mask_dir)
  return splits


def resolve_root(data: ml_collections.ConfigDict, workdir: str) -> str:
  """The dataset folder; the synthetic set is written there first (once)."""
  if data.kind == 'synthetic':
    root = data.root or os.path.join(workdir, 'synthetic_seg')
    write_synthetic(root, data)
    return root
  if not data.root:
    raise DatasetError(f'config.data.root is empty: point it at the {data.kind} folder')
  if not os.path.isdir(data.root):
    raise DatasetError(f'dataset folder not found: {data.root} (config.data.root)')
  return data.root


def list_dataset(data: ml_collections.ConfigDict, root: str) -> dict[str, list[Pair]]:
  """Split name -> annotated pairs; 'train' always, 'val' / 'test' where the layout has them."""
  kind = data.kind
  if kind == 'glas':
    splits = list_glas(root)
  elif kind == 'ebhi':
    splits = list_ebhi(root, data.ebhi_subset, data.split_seed)
  elif kind == 'kpi':
    splits = list_kpi(root)
  elif kind in ('folder', 'synthetic'):
    splits = list_folder(root)
  else:
    raise ConfigError("config.data.kind must be 'glas', 'ebhi', 'kpi', 'folder' or 'synthetic', got "
                      f'{kind!r}')
  if not splits.get('train'):
    raise DatasetError(f'{root}: no training images found for the {kind} layout')
  return splits


# --- masks -----------------------------------------------------------------------------------------

def read_label(path: str, data: ml_collections.ConfigDict) -> np.ndarray:
  """`[H, W]` uint8 class ids in 0..C-1. 'binary': grey value > threshold -> 1; 'index': stored values."""
  num_classes = len(data.class_names)
  try:
    image = Image.open(path)
    image.load()
  except FileNotFoundError:
    raise DatasetError(f'{path}: annotation file not found') from None
  except (OSError, SyntaxError, ValueError) as error:
    raise DatasetError(f'{path}: unreadable annotation ({error})') from None
  if mask_mode(data) == 'binary':
    values = np.asarray(image if image.mode in ('L', 'P', 'I', 'I;16') else image.convert('L'))
    return (values > data.mask_threshold).astype(np.uint8)
  if image.mode not in ('L', 'P'):
    raise DatasetError(f'{path}: index masks must be palette or grey PNGs, got mode {image.mode!r}')
  values = np.asarray(image).astype(np.uint8)
  bad = np.unique(values[values >= num_classes])
  if bad.size:
    raise DatasetError(f'{path}: mask values {bad.tolist()} outside 0..{num_classes - 1} '
                       f'(config.data.class_names has {num_classes} classes)')
  return values


def mask_mode(data: ml_collections.ConfigDict) -> str:
  if data.kind in ('glas', 'ebhi', 'kpi'):
    return 'binary'
  if data.kind == 'synthetic':
    return 'index'
  if data.mask_mode not in ('binary', 'index'):
    raise ConfigError(f"config.data.mask_mode must be 'binary' or 'index', got {data.mask_mode!r}")
  return data.mask_mode


def resize_square(array: np.ndarray, size: int, nearest: bool) -> np.ndarray:
  if size <= 0 or array.shape[:2] == (size, size):
    return array
  return np.asarray(Image.fromarray(array).resize((size, size), Image.NEAREST if nearest else Image.BILINEAR))


def load_pair(pair: Pair, data: ml_collections.ConfigDict, resize_mask: bool = True):
  """-> (image `[H, W, 3]` uint8, mask `[h, w]` uint8), both resized to `resize_to` if set (the mask only
  with `resize_mask`; evaluation keeps the original for scoring)."""
  image = images_lib.read_image(pair.image)
  mask = read_label(pair.mask, data)
  if mask.shape != image.shape[:2]:
    raise DatasetError(f'{pair.mask}: annotation is {mask.shape[1]}x{mask.shape[0]} but its image '
                       f'{pair.image} is {image.shape[1]}x{image.shape[0]}')
  image = resize_square(image, data.resize_to, nearest=False)
  if resize_mask:
    mask = resize_square(mask, data.resize_to, nearest=True)
  return image, mask


# --- split file ------------------------------------------------------------------------------------

def split_path(data: ml_collections.ConfigDict, workdir: str) -> str:
  if data.split_file:
    return data.split_file
  return os.path.join(workdir, f'split_{data.labelled_fraction:g}_seed{data.split_seed}.json')


def make_split(splits: dict[str, list[Pair]], data: ml_collections.ConfigDict) -> dict:
  """Seeded split of the training ids: 'val' (held out, unless the layout has a val split), 'labelled'
  (round(fraction x rest), at least 1), 'unlabelled' (the rest)."""
  fraction = data.labelled_fraction
  if not 0.0 < fraction <= 1.0:
    raise ConfigError(f'config.data.labelled_fraction must be in (0, 1], got {fraction}')
  train = sorted(pair.id for pair in splits['train'])
  rng = np.random.default_rng([data.split_seed, 2])
  val = []
  if data.eval_split == 'val' and not splits.get('val'):
    order = rng.permutation(len(train))
    count = max(1, int(round(data.val_fraction * len(train))))
    val = sorted(train[i] for i in order[:count])
    train = sorted(set(train) - set(val))
  order = rng.permutation(len(train))
  count = max(1, int(round(fraction * len(train))))
  return {'kind': data.kind, 'labelled_fraction': fraction, 'seed': data.split_seed,
          'labelled': sorted(train[i] for i in order[:count]),
          'unlabelled': sorted(train[i] for i in order[count:]), 'val': val}


def load_or_create_split(splits: dict[str, list[Pair]], data: ml_collections.ConfigDict, path: str) -> dict:
  """Reads the split file at `path` (checking its ids exist), or writes a new seeded one there."""
  known = {pair.id for pair in splits['train']}
  if os.path.isfile(path):
    with open(path) as handle:
      split = json.load(handle)
    for key in ('labelled', 'unlabelled', 'val'):
      if key not in split:
        raise DatasetError(f'{path}: split file has no {key!r} list')
      missing = [i for i in split[key] if i not in known]
      if missing:
        raise DatasetError(f'{path}: {len(missing)} id(s) of the {key!r} list are not training images of '
                           f'this dataset (first: {missing[0]})')
  else:
    split = make_split(splits, data)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as handle:
      json.dump(split, handle, indent=1)
  if not split['labelled']:
    raise DatasetError(f'{path}: the labelled split is empty')
  return split


def eval_pairs(splits: dict[str, list[Pair]], split: dict, name: str) -> list[Pair]:
  """The pairs of evaluation split `name` ('val' may be the held-out part of train)."""
  if name == 'val' and split.get('val'):
    by_id = {pair.id: pair for pair in splits['train']}
    return [by_id[i] for i in split['val']]
  pairs = splits.get(name)
  if not pairs:
    raise DatasetError(f'split {name!r} is empty or absent (available: '
                       f'{", ".join(sorted(k for k, v in splits.items() if v))})')
  return pairs


# --- synthetic set ---------------------------------------------------------------------------------

def write_synthetic(root: str, data: ml_collections.ConfigDict) -> str:
  """Writes the synthetic H&E set (exact masks) in the `folder` layout, once; background = class 0.

  With `foreground_values` (BCSS values, e.g. (0,) = tumour) the masks are binary, else all five values
  are kept as (background, tumour, stroma, lymphocytes, necrosis).
  """
  synth = data.synthetic
  foreground = tuple(synth.foreground_values)
  expected = 2 if foreground else synthetic.NUM_TISSUE_CLASSES + 1
  if len(data.class_names) != expected:
    raise ConfigError(f'config.data.class_names has {len(data.class_names)} names but the synthetic set with '
                     f'foreground_values={foreground} has {expected} classes')
  params = {'generator': 'protoseg_jax.mpamatch.synthetic/1', 'num_train': synth.num_train,
            'num_val': synth.num_val, 'num_test': synth.num_test, 'size': synth.render_size,
            'seed': synth.seed, 'foreground_values': list(foreground)}
  if synthetic.existing_set(root, params):
    return root
  palette = np.asarray([(0, 0, 0), (255, 255, 255)] if foreground else
                       [(255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (153, 0, 255)], np.uint8)
  partial = synthetic.fresh_partial(root)
  for split, count in (('train', synth.num_train), ('val', synth.num_val), ('test', synth.num_test)):
    os.makedirs(os.path.join(partial, split, 'images'))
    os.makedirs(os.path.join(partial, split, 'masks'))
    for index in range(count):
      rng = np.random.default_rng(np.random.SeedSequence([synth.seed, synthetic.SPLIT_IDS[split], index]))
      image, values = synthetic.render_tile(rng, synth.render_size)
      if foreground:
        mask = np.isin(values, foreground).astype(np.uint8)
      else:
        mask = ((values.astype(np.int32) + 1) % (synthetic.NUM_TISSUE_CLASSES + 1)).astype(np.uint8)
      name = f'synth_{split}_{index:05d}.png'
      Image.fromarray(image).save(os.path.join(partial, split, 'images', name))
      images_lib.write_palette_png(os.path.join(partial, split, 'masks', name), mask, palette)
  return synthetic.publish_set(partial, root, params)


def load_eval_set(pairs: Sequence[Pair], data: ml_collections.ConfigDict, threads: int = 4) -> EvalSet:
  """Images (resized to `config.data.resize_to` if set) with their masks at the original size (scores are
  resized back to them), every host holding the whole split; labels unknown (-1)."""
  def load(pair: Pair):
    return load_pair(pair, data, resize_mask=False)

  with concurrent.futures.ThreadPoolExecutor(max(threads, 1)) as pool:
    loaded = list(pool.map(load, pairs))
  return EvalSet(names=[pair.id for pair in pairs], images=[image for image, _ in loaded],
                 masks=[mask for _, mask in loaded],
                 labels=np.full((len(pairs), len(data.class_names)), -1, np.int32), num_examples=len(pairs))
