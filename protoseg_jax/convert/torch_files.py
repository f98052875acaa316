"""Reads PyTorch checkpoint files into `{name: np.ndarray}` without importing torch.

Supported: safetensors files, and `torch.save` zip archives (`pytorch_model.bin`, `.pt`, `.pth`, the format
of every torch release since 1.6). The pickle inside a zip archive is read by a restricted unpickler that
only rebuilds tensors, parameters and ordered dicts (like `torch.load(weights_only=True)`): a checkpoint
that asks to import anything else is refused, so loading a file never runs its code.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

# torch storage class name -> NumPy dtype.
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class CheckpointFileError(ValueError):
  """A weights file cannot be read; the message names the file."""


class _StorageType:
  def __init__(self, name: str):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *unused) -> np.ndarray:
  itemsize = storage.dtype.itemsize
  if not size:
    return storage[offset:offset + 1].reshape(()).copy()
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)  # own, contiguous memory


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
  return data


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds tensors from the archive's storages; refuses every other global."""

  _ALLOWED = {
      ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
      ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
      ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
      ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
      ('collections', 'OrderedDict'): collections.OrderedDict,
  }

  def __init__(self, handle, archive: zipfile.ZipFile, prefix: str, path: str):
    super().__init__(handle)
    self._archive, self._prefix, self._path = archive, prefix, path
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in self._ALLOWED:
      return self._ALLOWED[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise CheckpointFileError(f'{self._path}: refusing to load {module}.{name} from the checkpoint '
                              '(only tensors and dicts are read; re-save it as a plain state dict)')

  def persistent_load(self, pid) -> np.ndarray:
    kind, storage_type, key, _location, numel = pid[:5]
    if kind != 'storage' or not isinstance(storage_type, _StorageType):
      raise CheckpointFileError(f'{self._path}: unsupported storage record {pid[:2]!r}')
    if key not in self._storages:
      raw = self._archive.read(f'{self._prefix}data/{key}')
      self._storages[key] = np.frombuffer(raw, dtype=storage_type.dtype, count=numel)
    return self._storages[key]


def _load_torch_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    pickles = [name for name in archive.namelist() if name.endswith('data.pkl')]
    if len(pickles) != 1:
      raise CheckpointFileError(f'{path}: not a torch.save archive (no single data.pkl inside)')
    prefix = pickles[0][:-len('data.pkl')]
    if f'{prefix}byteorder' in archive.namelist() and archive.read(f'{prefix}byteorder') != b'little':
      raise CheckpointFileError(f'{path}: big-endian checkpoints are not supported')
    with archive.open(pickles[0]) as handle:
      return _RestrictedUnpickler(handle, archive, prefix, path).load()


def load_state_dict(path: str, key: str = '') -> dict[str, np.ndarray]:
  """`{parameter name: array}` from a safetensors file or a torch zip checkpoint.

  `key` selects a nested state dict (e.g. 'state_dict', 'model'); '' unwraps a lone 'state_dict' /
  'model' entry when the file holds no arrays at its top level.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'weights file {path} does not exist')
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    try:
      return dict(load_file(path))
    except Exception as error:  # safetensors raises its own error types
      raise CheckpointFileError(f'{path}: not a readable safetensors file ({error})') from None
  if not zipfile.is_zipfile(path):
    raise CheckpointFileError(f'{path}: neither safetensors nor a torch.save zip archive (legacy '
                              'pre-1.6 torch files: re-save with torch.save or convert to safetensors)')
  try:
    tree = _load_torch_zip(path)
  except (pickle.UnpicklingError, KeyError, EOFError, zipfile.BadZipFile) as error:
    raise CheckpointFileError(f'{path}: corrupt torch checkpoint ({error})') from None
  if key:
    if not isinstance(tree, Mapping) or key not in tree:
      raise CheckpointFileError(f'{path}: no entry {key!r} (config.backbone.checkpoint_key)')
    tree = tree[key]
  elif isinstance(tree, Mapping) and not any(isinstance(v, np.ndarray) for v in tree.values()):
    for candidate in ('state_dict', 'model'):
      if candidate in tree:
        tree = tree[candidate]
        break
  if not isinstance(tree, Mapping):
    raise CheckpointFileError(f'{path}: holds a {type(tree).__name__}, not a state dict')
  arrays = {str(name): value for name, value in tree.items() if isinstance(value, np.ndarray)}
  if not arrays:
    raise CheckpointFileError(f'{path}: no tensors at the top level (nested under one of '
                              f'{sorted(map(str, tree))[:5]}? set config.backbone.checkpoint_key)')
  return arrays
