"""`--mode=slides` as a user runs it: a trained (tiny) DualProtoSeg on a synthetic pyramidal TIFF writes every
output; a folder with a corrupt slide reports it by name, finishes the others and exits 4; a rerun skips the
complete slides."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY_CONFIG_PATH
from protoseg_jax.slides import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_main(*args):
  return subprocess.run([sys.executable, '-m', 'protoseg_jax.main', f'--config={TINY_CONFIG_PATH}', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


@pytest.mark.slow
def test_demo_model_segments_a_folder_of_slides(tmp_path):
  workdir = str(tmp_path / 'run')
  trained = run_main(f'--workdir={workdir}', '--config.train.max_steps=2', '--config.train.epochs=1')
  assert trained.returncode == 0, trained.stderr[-3000:]
  slides_dir = tmp_path / 'slides_in'
  slides_dir.mkdir()
  layout = synthetic.demo_layout(16)
  synthetic.write_synthetic_slide(str(slides_dir / 'case_01.tif'), layout, level0_mpp=0.25, levels=2, tile=128,
                                  cell_px=24, texture='he')
  (slides_dir / 'broken.tif').write_bytes(b'II*\x00not a tiff at all')
  args = (f'--workdir={workdir}', '--mode=slides', f'--input={slides_dir}', '--checkpoint=last',
          '--config.eval.batch_size=4', '--config.slides.mask_downsample=4')
  first = run_main(*args)
  assert first.returncode == 4, first.stderr[-3000:]       # errors.EXIT_SOME_FAILED
  assert 'broken.tif' in first.stderr and 'Traceback' not in first.stderr
  out = os.path.join(workdir, 'slides', 'case_01')
  for name in ('mask.tif', 'overlay.png', 'case_01.geojson', 'summary.json'):
    assert os.path.isfile(os.path.join(out, name)), name
  summary = json.load(open(os.path.join(out, 'summary.json')))
  assert summary['tiles'] > 0 and summary['model_mpp'] == 0.5
  names = [c['name'] for c in summary['classes']]
  assert names == ['TUM', 'STR', 'LYM', 'NEC', 'BACK']
  geojson = json.load(open(os.path.join(out, 'case_01.geojson')))
  assert {f['properties']['classification']['name'] for f in geojson['features']} <= set(names)
  rows = list(csv.DictReader(open(os.path.join(workdir, 'slides', 'summary.csv'))))
  assert [row['slide'] for row in rows] == ['case_01']
  import tifffile  # pylint: disable=g-import-not-at-top
  with tifffile.TiffFile(os.path.join(out, 'mask.tif')) as tif:
    mask = tif.series[0].levels[0].asarray()
  assert mask.dtype == np.uint8 and mask.max() <= 4
  second = run_main(*args)
  assert second.returncode == 4 and 'already complete' in second.stdout + second.stderr
  # A model whose µm/px is unknown (the EBHI / KPI presets) is refused in one line, before any reading.
  unknown = run_main(*args, '--config.data.mpp=0.0')
  assert unknown.returncode == 2 and 'Traceback' not in unknown.stderr       # errors.EXIT_USER_ERROR
  assert ('config.data.mpp=0.0: the µm/px this model works at is not known for this dataset; set '
          '--config.data.mpp (slides are read at that resolution)') in unknown.stderr
