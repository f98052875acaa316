"""The shape of the code: the core knows no method (nothing outside `protoseg_jax/methods/` imports a method
package, by any import form) and the method packages do not import each other."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       'protoseg_jax')


def imported_modules(path: str) -> set[str]:
  tree = ast.parse(open(path).read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def python_files(root: str):
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith('.py'):
        yield os.path.join(folder, name)


def test_core_never_imports_a_method_package():
  methods_dir = os.path.join(PACKAGE, 'methods')
  offenders = []
  for path in python_files(PACKAGE):
    if path.startswith(methods_dir + os.sep):
      continue
    for name in imported_modules(path):
      if name == 'protoseg_jax.methods' or name.startswith('protoseg_jax.methods.'):
        offenders.append(f'{os.path.relpath(path, PACKAGE)} imports {name}')
  assert not offenders, offenders


def test_method_packages_do_not_import_each_other():
  methods_dir = os.path.join(PACKAGE, 'methods')
  packages = [name for name in os.listdir(methods_dir) if os.path.isdir(os.path.join(methods_dir, name))
              and not name.startswith('_')]
  assert {'dualprotoseg', 'mpamatch'} <= set(packages)
  offenders = []
  for package in packages:
    for path in python_files(os.path.join(methods_dir, package)):
      for name in imported_modules(path):
        for other in packages:
          if other != package and name.startswith(f'protoseg_jax.methods.{other}'):
            offenders.append(f'{os.path.relpath(path, PACKAGE)} imports {name}')
  assert not offenders, offenders


def test_the_check_can_fail(tmp_path):
  """The scanner sees every import form (a guard that the tests above are not vacuous)."""
  probe = tmp_path / 'probe.py'
  probe.write_text('import protoseg_jax.methods.dualprotoseg\nfrom protoseg_jax.methods import mpamatch\n'
                   'def f():\n  from protoseg_jax.methods.mpamatch import train\n')
  names = imported_modules(str(probe))
  assert {'protoseg_jax.methods.dualprotoseg', 'protoseg_jax.methods.mpamatch',
          'protoseg_jax.methods.mpamatch.train'} <= names
