"""Methods by name: `config.method` -> the `Method` class of a method package.

`config.method = 'dualprotoseg'` finds `protoseg_jax.methods.dualprotoseg.METHOD`; a dotted name
(`'my_lab.my_method'`) finds `METHOD` in that importable module, so a third method is a new package and a
config, never an edit of the core. `register` adds a class under a name directly (tests, notebooks).
The core imports method packages only through this lookup, by name.
"""

from __future__ import annotations

import importlib

from protoseg_jax.errors import ConfigError
from protoseg_jax.method import Method

BUILT_IN_PACKAGE = 'protoseg_jax.methods'
_REGISTERED: dict[str, type[Method]] = {}


def register(name: str, method_class: type[Method]) -> type[Method]:
  """Makes `config.method = name` resolve to `method_class` in this process; returns the class."""
  if not (isinstance(method_class, type) and issubclass(method_class, Method)):
    raise TypeError(f'registry.register({name!r}, ...): {method_class!r} is not a Method subclass')
  _REGISTERED[name] = method_class
  return method_class


def _module_name(name: str) -> str:
  return name if '.' in name else f'{BUILT_IN_PACKAGE}.{name}'


def get(name: str) -> type[Method]:
  """The `Method` class of `name` (see the module docstring); `ConfigError` naming config.method if none."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if not name or not all(part.isidentifier() for part in name.split('.')):
    raise ConfigError(f'config.method={name!r} is not a method name')
  module_name = _module_name(name)
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as error:
    if error.name and module_name.startswith(error.name):
      raise ConfigError(f'config.method={name!r}: no method package {module_name} (built in: '
                        f'{", ".join(built_in())})') from None
    raise
  method_class = getattr(module, 'METHOD', None)
  if not (isinstance(method_class, type) and issubclass(method_class, Method)):
    raise ConfigError(f'config.method={name!r}: {module_name} has no METHOD (a protoseg_jax.method.Method '
                      'subclass)')
  return method_class


def built_in() -> list[str]:
  """Names of the method packages shipped in `protoseg_jax/methods/`."""
  import pkgutil  # pylint: disable=g-import-not-at-top

  package = importlib.import_module(BUILT_IN_PACKAGE)
  return sorted(info.name for info in pkgutil.iter_modules(package.__path__) if info.ispkg)


def build(config) -> Method:
  """`get(config.method)(config)`."""
  return get(config.get('method', ''))(config)
