"""Host input throughput: decoded (+ augmented) tiles per second, Grain over records vs the loose-PNG reader.

  python -m protoseg_jax.data.bench --folder=/tmp/bench_bcss --synthetic_train=256 --image_size=224

writes (once) a synthetic set of `--synthetic_train` training tiles to `--folder`, converts it to
`--records` (default `<folder>_records`), then times each pipeline for `--batches` batches after one
warm-up batch (which absorbs worker start-up). Without `--synthetic_train`, `--folder` must be a BCSS-WSSS
folder. Columns: img/s is wall-clock throughput; img/s per core is tiles per CPU-second spent by the
pipeline's process and its worker processes (worker CPU needs psutil; '-' without it).
"""

from __future__ import annotations

import os
import time
from typing import Optional

import ml_collections
from absl import app, flags

from protoseg_jax.data import bcss, convert, grain_pipeline, input_pipeline, records, synthetic, tile_sets

def _define_flags() -> dict:
  """The CLI's flags, defined only when run as a program (the module is also imported as a library)."""
  return {
      'folder': flags.DEFINE_string('folder', None, 'BCSS-WSSS folder (written there with '
                                    '--synthetic_train > 0).'),
      'records': flags.DEFINE_string('records', None, 'Converted records (default <folder>_records; '
                                     'converted from --folder if absent).'),
      'synthetic_train': flags.DEFINE_integer('synthetic_train', 0, 'Write a synthetic set with this many '
                                              'training tiles to --folder first.'),
      'image_size': flags.DEFINE_integer('image_size', 224, 'Tile size.'),
      'batch_size': flags.DEFINE_integer('batch_size', 32, 'Batch size.'),
      'batches': flags.DEFINE_integer('batches', 8, 'Timed batches per pipeline (after one warm-up batch).'),
      'threads': flags.DEFINE_list('threads', ['1', str(os.cpu_count() or 1)], 'Decode thread counts to time.'),
      'workers': flags.DEFINE_list('workers', ['2'], 'Grain worker-process counts to time (records, 1 thread '
                                   'each).'),
      'augment_on': flags.DEFINE_list('augment_on', ['host'], "'host' = decode + flips/rot90 + normalise on "
                                      "the host; 'device' = decode only (uint8 out)."),
  }


def _cpu_seconds(include_children: bool) -> Optional[float]:
  """CPU time of this process (all threads) plus, if psutil is importable, its live child processes."""
  total = time.process_time()
  if include_children:
    try:
      import psutil  # pylint: disable=g-import-not-at-top
    except ImportError:
      return None
    for child in psutil.Process().children(recursive=True):
      try:
        times = child.cpu_times()
        total += times.user + times.system
      except psutil.Error:
        pass
  return total


def data_config(image_size: int) -> ml_collections.ConfigDict:
  """A BCSS-WSSS tile-set data block (the keys `tile_sets` and `grain_pipeline.HostAugment` read)."""
  return ml_collections.ConfigDict(dict(
      kind='folder', root='', class_names=bcss.CLASS_NAMES, background_name=bcss.BACKGROUND_NAME,
      image_size=image_size, mean=(0.66791496, 0.47791372, 0.70623304),
      std=(0.1736589, 0.22564577, 0.19820057),
      channel_order='rgb', decode_threads=1, cache_in_memory=False, augment_on='device',
      synthetic=dict(num_train=0, num_val=0, num_test=0, seed=0, format='folder'),
      augment=dict(hflip=True, vflip=True, rot90=True, rot90_prob=0.5),
      grain=dict(read_threads=1, prefetch_buffer_size=2, worker_count=0, worker_buffer_size=2)))


def time_pipeline(config: ml_collections.ConfigDict, root: str, batch_size: int, batches: int,
                  workers: int) -> tuple[float, Optional[float]]:
  """-> (images per wall second, images per CPU second) over `batches` batches after one warm-up batch,
  through the training input of every tile method: `tile_sets.train_source` + `input_pipeline`."""
  source, decode, _ = tile_sets.train_source(config, root)
  host_transform = grain_pipeline.HostAugment.from_config(config) if config.augment_on == 'host' else None
  build = lambda start: input_pipeline.element_batches(
      source, decode, seed=0, global_batch=batch_size, last_batch='drop', process_index=0, process_count=1,
      options=config.grain, start_step=start, host_transform=host_transform)
  iterator = input_pipeline.TrainIterator(build, workers)
  try:
    next(iterator)
    wall, cpu = time.perf_counter(), _cpu_seconds(workers > 0)
    for _ in range(batches):
      next(iterator)
    wall = time.perf_counter() - wall
    cpu_end = _cpu_seconds(workers > 0)
  finally:
    iterator.close()
  images = batches * batch_size
  per_cpu = None if cpu is None or cpu_end is None else images / max(cpu_end - cpu, 1e-9)
  return images / wall, per_cpu


def main(argv, cli: dict):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  folder = cli['folder'].value
  if not folder:
    raise app.UsageError('--folder is required')
  if cli['synthetic_train'].value > 0:
    synthetic.write_bcss_layout(folder, num_train=cli['synthetic_train'].value, num_val=0, num_test=0,
                                size=cli['image_size'].value, seed=0)
  records_root = cli['records'].value or folder.rstrip('/') + '_records'
  if not records.is_records_dir(records_root):
    convert.convert_dataset(folder, records_root, splits=('train',))
  base = data_config(cli['image_size'].value)
  batches = cli['batches'].value
  needed = (batches + 1) * cli['batch_size'].value
  rows = []
  for augment_on in cli['augment_on'].value:
    runs = [('records (Grain)', 'records', threads, 0) for threads in map(int, cli['threads'].value)]
    runs += [('records (Grain)', 'records', 1, workers) for workers in map(int, cli['workers'].value)]
    runs += [('loose PNG', 'folder', threads, 0) for threads in map(int, cli['threads'].value)]
    for name, kind, threads, workers in runs:
      config = base.copy_and_resolve_references()
      config.kind, config.augment_on = kind, augment_on
      config.decode_threads = threads
      config.grain.update(read_threads=threads, prefetch_buffer_size=max(2 * threads, 2),
                          worker_count=workers)
      root = records_root if kind == 'records' else folder
      wall, per_cpu = time_pipeline(config, root, cli['batch_size'].value, batches, workers)
      rows.append((name, augment_on, threads, workers, wall, per_cpu))
  size, batch_size = cli['image_size'].value, cli['batch_size'].value
  print(f'{needed} tiles of {size}x{size} per pipeline ({batch_size} x {batches} timed + 1 warm-up batch), '
        f'{os.cpu_count()} CPU cores visible')
  print('| pipeline | augment on | threads | workers | img/s | img/s per core |')
  print('| --- | --- | --- | --- | --- | --- |')
  for name, augment_on, threads, workers, wall, per_cpu in rows:
    per_core = '-' if per_cpu is None else f'{per_cpu:.0f}'
    print(f'| {name} | {augment_on} | {threads} | {workers} | {wall:.0f} | {per_core} |')


if __name__ == '__main__':
  from protoseg_jax import logs  # pylint: disable=g-import-not-at-top
  logs.quiet_library_info()
  _CLI = _define_flags()
  app.run(lambda argv: main(argv, _CLI))
