"""The code's shape, kept by tests: layers import only downwards, no import circles, no
environment read on a per-call path, one mapping of the installed package names, and no
source file past the size a reader takes in at once."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 450
# (module name prefix, its folder): the project's packages as they are imported
PACKAGES = {"sd_backend": ROOT / "sd_backend", "sd_kernels": ROOT / "kernels", "sd_client": ROOT / "client"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package,) + parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project's modules `name` imports, at module level or inside a function."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in modules and target != name}
    return found


def test_no_import_circles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            raise AssertionError("import circle: " + " -> ".join(trail[trail.index(name):] + [name]))
        if name in done:
            return
        for target in sorted(graph[name]):
            # a package's __init__ importing its own submodules is not a circle through them
            if not target.startswith(name + "."):
                visit(target, trail + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_layers_import_only_downwards():
    """ops (sd_kernels) <- modules (sd_backend.fast.modules) <- the loop (sd_backend.fast.*) <- stages."""
    modules = _modules()
    below = {
        "sd_kernels": ("sd_kernels",),
        "sd_backend.fast.modules": ("sd_kernels", "sd_backend.fast.modules", "sd_backend.fast.runtime", "sd_backend.fast.compat", "sd_backend.config"),
        # the loop's own helpers (denoise, inpaint: the per-step math) sit beside it
        "sd_backend.fast": (
            "sd_kernels", "sd_backend.fast", "sd_backend.config", "sd_backend.denoise", "sd_backend.inpaint", "sd_backend.params",
            "sd_backend.schedulers",
        ),
    }
    for name, path in modules.items():
        layer = max((prefix for prefix in below if name == prefix or name.startswith(prefix + ".")), key=len, default=None)
        if layer is None:
            continue
        for target in _imports(name, path, modules):
            assert target.startswith(below[layer]), f"{name} ({layer}) imports {target}"
    for path in (ROOT / "sd_kernels").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any(n.split(".")[0] == "diffusers" for n in names), f"{path} imports diffusers"


def test_no_environment_reads_in_kernels_or_patched_modules():
    """Options are arguments: only the config loader and the process edges read the environment."""
    for folder in (ROOT / "sd_kernels", ROOT / "sd_backend" / "fast"):
        for path in folder.rglob("*.py"):
            text = path.read_text()
            reads = [word for word in ("os.environ", "getenv") if word in text]
            allowed = path.name == "levels.py" and reads == ["os.environ"]  # DeepSpeed's op builder, at load
            assert not reads or allowed, f"{path.relative_to(ROOT)} reads the environment ({reads})"


def test_installed_names_match_the_checkout_finder():
    from sd_backend.checkout import PACKAGE_FOLDERS

    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert package_dir == PACKAGE_FOLDERS


def test_no_source_file_is_too_long():
    long = []
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, f"over {MAX_LINES} lines: {long}"
