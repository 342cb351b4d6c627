"""The project's other packages, when it runs from a source checkout that was not installed.

pyproject.toml installs the folder `client/` as `sd_client` (`sd_kernels/` is its own name).
Where only the checkout is on sys.path (the GPU host, a model repository served from a plain
checkout) this finder maps the same names to the same folders, as setuptools' editable
installs do. It comes after every other finder, so an installed package always wins.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed name -> its folder in the checkout (the same mapping as pyproject.toml's package-dir)
PACKAGE_FOLDERS = {"sd_client": "client"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        folder = PACKAGE_FOLDERS.get(name)
        init = ROOT / folder / "__init__.py" if folder else None
        if init is None or not init.is_file():
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


def install() -> None:
    if not any(isinstance(finder, _CheckoutFinder) for finder in sys.meta_path):
        sys.meta_path.append(_CheckoutFinder())
