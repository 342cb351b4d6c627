"""Loading survives optional packages that are installed but cannot be imported (what a
host's numpy-2 scipy does inside the numpy-1 Python-backend stub)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

BROKEN = 'raise ImportError("numpy.core.multiarray failed to import (module built for numpy 2)")\n'


def run(code: str, site, **env) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.getcwd()]), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def broken_site(tmp_path):
    """A site-packages folder, first on the path, whose scipy and sklearn fail to import."""
    site = tmp_path / "site-packages"
    for name in ("scipy", "sklearn"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(BROKEN)
    return site


def test_unguarded_import_fails_with_a_broken_optional_package(broken_site):
    # the failure the guard exists for: if this starts passing, the guard may be unneeded
    result = run("from transformers import CLIPTextModel", broken_site)
    assert result.returncode != 0
    assert "numpy.core.multiarray failed to import" in result.stderr


def test_model_libraries_hide_the_broken_package_and_load(broken_site):
    result = run(
        """
        import sys
        from sd_backend.optional_deps import model_libraries
        model_libraries()
        from transformers import CLIPTextModel
        from diffusers import UNet2DConditionModel
        print("hidden:", sorted(k for k, v in sys.modules.items() if v is None and k in ("scipy", "sklearn")))
        """,
        broken_site,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hidden: ['scipy'" in result.stdout
    assert "optional package scipy fails to import" in result.stderr


def test_broken_packages_tried_alone_are_hidden_before_transformers_imports(broken_site):
    # what model_libraries does first under numpy 1: transformers then imports at the first try
    result = run(
        """
        from sd_backend.optional_deps import hide_broken
        print("hidden:", hide_broken(("scipy", "sklearn", "not_installed_anywhere")))
        from transformers import CLIPTextModel
        """,
        broken_site,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hidden: ['scipy', 'sklearn']" in result.stdout


def test_a_broken_required_package_is_not_hidden(tmp_path):
    site = tmp_path / "site-packages"
    (site / "transformers").mkdir(parents=True)
    (site / "transformers" / "__init__.py").write_text(BROKEN)
    result = run("from sd_backend.optional_deps import model_libraries; model_libraries()", site)
    assert result.returncode != 0
    assert "numpy.core.multiarray failed to import" in result.stderr


WARNS = (
    "import warnings\n"
    'warnings.warn("A NumPy version >=2.0.0 and <2.8.0 is required for this version of SciPy (detected version 1.26.4)", UserWarning)\n'
)


def test_a_package_that_warns_numpy_is_unsupported_is_hidden_before_transformers_imports(tmp_path):
    # the GPU host's scipy under the numpy-1 stub: its top level imports with this warning and
    # its compiled submodules fail later, inside transformers' import (5-6 s lost to the retry)
    site = tmp_path / "site-packages"
    (site / "scipy").mkdir(parents=True)
    (site / "scipy" / "__init__.py").write_text(WARNS)
    (site / "scipy" / "special.py").write_text(BROKEN)
    (site / "healthy").mkdir()
    (site / "healthy" / "__init__.py").write_text("VALUE = 1\n")
    result = run(
        """
        from sd_backend.optional_deps import hide_broken
        print("hidden:", hide_broken(("scipy", "healthy")))
        from transformers import CLIPTextModel
        """,
        site,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hidden: ['scipy']" in result.stdout
    assert "optional package scipy fails to import (A NumPy version >=2.0.0" in result.stderr
