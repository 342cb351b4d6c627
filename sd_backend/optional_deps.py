"""Import transformers and diffusers even where an optional package they probe is broken.

Both libraries import optional packages (scipy, scikit-learn, ...) when those are
installed. Inside tritonserver 2.51's Python-backend stub numpy must be 1.x (the stub
cannot exchange numpy 2 arrays), and a host whose scipy or scikit-learn were built for
numpy 2 then fails `from transformers import CLIPTextModel` although neither package
is needed here. Such a package is hidden (`sys.modules[name] = None`, which makes
`importlib.util.find_spec` report it absent) and the import is tried again, with a
warning naming it.
"""

from __future__ import annotations

import importlib
import logging
import re
import sys
import traceback
import warnings
from typing import Callable, TypeVar

log = logging.getLogger("sd_backend")

T = TypeVar("T")

# never hidden: what the models need to run at all
REQUIRED = frozenset({"torch", "numpy", "transformers", "diffusers", "tokenizers", "safetensors", "huggingface_hub", "importlib"})
_PACKAGE_IN_PATH = re.compile(r"[/\\](?:site|dist)-packages[/\\]([A-Za-z_][A-Za-z0-9_]*)")


def hide(package: str) -> None:
    """Make `package` look not installed to later imports and `find_spec` checks.

    transformers and diffusers note at import which optional packages exist, so they
    are unloaded too and take the new view when imported again."""
    for root in (package, "transformers", "diffusers"):
        for name in [m for m in sys.modules if m == root or m.startswith(root + ".")]:
            del sys.modules[name]
    sys.modules[package] = None  # type: ignore[assignment]


def broken_optional_package(error: BaseException) -> str | None:
    """The installed package whose import raised `error`, unless it is a required one."""
    frames: list[str] = []
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        frames = [f.filename for f in traceback.extract_tb(error.__traceback__)] + frames
        error = error.__cause__ or error.__context__
    for filename in reversed(frames):  # the deepest frame names the package that failed
        match = _PACKAGE_IN_PATH.search(filename)
        if match and match.group(1) not in REQUIRED:
            return match.group(1)
    return None


def import_tolerant(load: Callable[[], T], attempts: int = 5) -> T:
    """`load()`, hiding each broken optional package it trips over (at most `attempts`)."""
    for _ in range(attempts):
        try:
            return load()
        except Exception as err:  # ImportError, or the ABI errors of a mismatched extension
            package = broken_optional_package(err)
            if package is None or sys.modules.get(package, 0) is None:
                raise
            log.warning("optional package %s fails to import (%s: %s); continuing without it", package, type(err).__name__, err)
            hide(package)
    return load()


# installed optional packages that transformers imports, found built for numpy 2 inside the
# numpy-1 stub on the GPU host (its restart log: each one cost a failed import of transformers)
PROBED = ("scipy", "sklearn")
# what a package warns at import when the installed numpy is outside the range it was built
# for (SciPy: "A NumPy version >=2.0.0 and <2.8.0 is required for this version of SciPy
# (detected version 1.26.4)"). Its top level then imports, but its compiled submodules fail
# later inside transformers' import, which is what the probe exists to avoid.
_NUMPY_UNSUPPORTED = re.compile(r"NumPy version .* is required", re.IGNORECASE)


def _numpy_unsupported(caught: list[warnings.WarningMessage]) -> str | None:
    for warning in caught:
        if _NUMPY_UNSUPPORTED.search(str(warning.message)):
            return str(warning.message)
    return None


def hide_broken(packages=PROBED) -> list[str]:
    """Hide each installed package of `packages` that fails to import on its own, or that
    warns at import that the installed numpy is not one it supports; returns those hidden.
    Alone each is found in a fraction of a second, where finding it through a failed import
    of transformers costs that import again (5-6 s each on the GPU host)."""
    import importlib.util

    hidden = []
    for package in packages:
        if package in sys.modules or importlib.util.find_spec(package) is None:
            continue  # imported, hidden already, or not installed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                importlib.import_module(package)
                reason = _numpy_unsupported(caught)
            except Exception as err:  # ImportError, or the ABI errors of a mismatched extension
                reason = f"{type(err).__name__}: {err}"
        if reason is not None:
            log.warning("optional package %s fails to import (%s); continuing without it", package, reason)
            hide(package)
            hidden.append(package)
    return hidden


def model_libraries() -> None:
    """Import the transformers and diffusers classes the stages use. Under numpy 1 (the
    Python-backend stub's) the packages known to break there are tried alone first."""
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        hide_broken()

    def load() -> None:
        transformers = importlib.import_module("transformers")
        diffusers = importlib.import_module("diffusers")
        for module, names in ((transformers, ("CLIPTextModel", "CLIPTokenizer")), (diffusers, ("UNet2DConditionModel", "AutoencoderKL", "PNDMScheduler"))):
            for name in names:
                getattr(module, name)

    import_tolerant(load)
