"""The README's main command, run as a new user would, on a fresh clone."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands of the README's first shell block (the two set-up commands)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_the_main_and_test_commands():
    commands = readme_commands()
    assert commands[0].startswith("./demo.sh ")
    assert commands[1].startswith("./test.sh")


def test_main_command_on_a_fresh_clone_prints_the_image_path(tmp_path):
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = dict(os.environ)
    # reuse this environment's packages instead of installing them again (CI has no time for two installs)
    env["SD_TRITON_VENV"] = str(Path(sys.executable).parent.parent)
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    proc = subprocess.run(
        readme_commands()[0], shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    match = re.search(r"^wrote (.+\.png)$", proc.stdout, re.M)
    assert match, proc.stdout
    image = Path(match.group(1))
    assert image.exists() and image.read_bytes().startswith(b"\x89PNG")
    assert image.is_relative_to(clone)
