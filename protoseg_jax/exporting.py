"""`--mode=export`: a method's PyTorch-loadable files, written atomically by the primary process.

The method writes into a fresh temporary folder next to the destination; only when it has finished is the
folder renamed into place (an older export is moved aside first and removed after), so an interrupted
export never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from protoseg_jax import sharding
from protoseg_jax.method import Method


def export(method: Method, params: dict, extra: Any, out_dir: str) -> dict[str, str]:
  """-> {kind: path} of the written files (empty on non-primary processes, which only join the gather)."""
  params, extra = sharding.host_copy(params), sharding.host_copy(extra)  # a collective on multi-host runs
  if not sharding.is_primary():
    return {}
  out_dir = os.path.abspath(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.partial-', dir=parent)
  try:
    paths = method.export(params, extra, staging)
    old = None
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.old-', dir=parent)
      os.replace(out_dir, os.path.join(old, 'export'))
    os.replace(staging, out_dir)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return {kind: os.path.join(out_dir, os.path.relpath(path, staging)) for kind, path in paths.items()}
