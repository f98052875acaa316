"""`python -m protoseg_jax.data.bench` runs end to end on a small synthetic set and prints one row per
pipeline; throughput itself is measured, never asserted (see BUILD_NOTES)."""

import re
import types

from protoseg_jax.data import bench, records


def test_data_bench_writes_converts_and_prints_every_pipeline(tmp_path, capsys):
  folder = str(tmp_path / 'bcss')
  values = {'folder': folder, 'records': None, 'synthetic_train': 12, 'image_size': 32, 'batch_size': 4,
            'batches': 2, 'threads': ['1', '2'], 'workers': [], 'augment_on': ['host', 'device']}
  bench.main(['bench'], {name: types.SimpleNamespace(value=value) for name, value in values.items()})
  assert records.is_records_dir(folder + '_records')
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith('12 tiles of 32x32 per pipeline (4 x 2 timed + 1 warm-up batch)')
  rows = [line.split(' | ') for line in lines[3:]]
  assert [(row[0].lstrip('| '), row[1], row[2]) for row in rows] == [
      (name, augment_on, threads) for augment_on in ('host', 'device')
      for name, threads in [('records (Grain)', '1'), ('records (Grain)', '2'), ('loose PNG', '1'),
                            ('loose PNG', '2')]]
  assert all(re.fullmatch(r'[0-9]+', row[4]) and int(row[4]) > 0 for row in rows)
