"""Whole-slide inference benchmark: tiles/s, seconds per slide, input-wait fraction, peak RSS.

`bench_slide(scores_fn)` segments a synthetic H&E-textured slide (written once per size and cached in
`workdir`) and returns the figures; the default `scores_fn` is a zero-cost stub (constant scores), so the
figures are those of the slide pipeline itself (reading, decoding, resizing, stitching, writing). Peak RSS
is the process's (`resource.getrusage`): run each size in a fresh process for comparable numbers, as the CLI
does:

  python -m protoseg_jax.slides.bench --sizes=8192,16384
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import ml_collections
import numpy as np

from protoseg_jax.slides import config as config_lib
from protoseg_jax.slides import run, stubs, synthetic

BENCH_CLASSES = ('TUM', 'STR', 'LYM', 'NEC', 'BACK')
BENCH_BACKGROUND = 4


def bench_slide(scores_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None, *, size_px: int = 8192,
                level0_mpp: float = 0.25, model_mpp: float = 0.5, tile_size: int = 224, batch_size: int = 32,
                config_slides: Optional[ml_collections.ConfigDict] = None, workdir: Optional[str] = None,
                class_names=BENCH_CLASSES, palette=None, background_value: int = BENCH_BACKGROUND) -> dict:
  """Runs one synthetic `size_px` x `size_px` slide through `run_slides`; -> figures (see module doc)."""
  workdir = workdir or os.path.join(tempfile.gettempdir(), 'protoseg_slides_bench')
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, f'bench_{size_px}_{level0_mpp:g}.tif')
  if not os.path.isfile(path):
    tmp = path + f'.partial-{os.getpid()}.tif'
    synthetic.write_synthetic_slide(tmp, synthetic.demo_layout(64), level0_mpp, levels=4,
                                    cell_px=size_px / 64, texture='he')
    os.replace(tmp, path)
  palette = synthetic.FLAT_COLOURS if palette is None else np.asarray(palette, np.uint8)
  scores_fn = scores_fn or stubs.constant_scores(batch_size, tile_size, len(class_names))
  c = config_slides or config_lib.slides_config()
  c = ml_collections.ConfigDict(c.to_dict())
  c.skip_complete = False
  c.progress_seconds = 1e9
  start = time.perf_counter()
  report = run.run_slides([path], scores_fn, config_slides=c, class_names=class_names, palette=palette,
                          background_value=background_value, model_mpp=model_mpp, tile_size=tile_size,
                          batch_size=batch_size, out_root=os.path.join(workdir, 'out'))
  wall = time.perf_counter() - start
  summary = report.done[0]
  return {
      'slide_px': size_px, 'level0_mpp': level0_mpp, 'model_mpp': model_mpp, 'tile_size': tile_size,
      'batch_size': batch_size, 'read_threads': int(c.read_threads), 'tiles': summary['tiles'],
      'tiles_total': summary['tiles_total'], 'tiles_per_s': summary['tiles_per_s'],
      'seconds_per_slide': wall, 'loop_seconds': summary['loop_seconds'],
      'model_seconds': summary['model_seconds'], 'input_wait_fraction': summary['input_wait_fraction'],
      'mask_size': summary['mask_size'],
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
  }


def bench_in_subprocess(size_px: int, **kwargs) -> dict:
  """`bench_slide` with the stub in a fresh Python process (its own peak RSS)."""
  args = [sys.executable, '-m', 'protoseg_jax.slides.bench', f'--sizes={size_px}', '--json']
  for key, value in kwargs.items():
    args.append(f'--{key}={value}')
  output = subprocess.run(args, check=True, capture_output=True, text=True).stdout
  return json.loads(output.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description='whole-slide inference benchmark (stub model)')
  parser.add_argument('--sizes', default='8192,16384', help='level-0 slide sides in pixels')
  parser.add_argument('--tile_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--read_threads', type=int, default=4)
  parser.add_argument('--workdir', default=None)
  parser.add_argument('--json', action='store_true', help='run in this process, print one JSON line')
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(',')]
  if args.json:
    c = config_lib.slides_config()
    c.read_threads = args.read_threads
    result = bench_slide(size_px=sizes[0], tile_size=args.tile_size, batch_size=args.batch_size,
                         config_slides=c, workdir=args.workdir)
    print(json.dumps(result))
    return
  print('| slide (level 0, px) | tiles sent / grid | tiles/s | s / slide | input wait | peak RSS MB |')
  print('| --- | --- | --- | --- | --- | --- |')
  for size in sizes:
    extra = {'tile_size': args.tile_size, 'batch_size': args.batch_size, 'read_threads': args.read_threads}
    if args.workdir:
      extra['workdir'] = args.workdir
    r = bench_in_subprocess(size, **extra)
    print(f'| {size} x {size} | {r["tiles"]} / {r["tiles_total"]} | {r["tiles_per_s"]:.1f} | '
          f'{r["seconds_per_slide"]:.1f} | {100 * r["input_wait_fraction"]:.0f} % | {r["peak_rss_mb"]:.0f} |')


if __name__ == '__main__':
  main()
