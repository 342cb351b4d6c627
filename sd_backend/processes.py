"""The processes of a tritonserver, read from Linux's /proc: its Python-backend stubs, whether
one is still alive, and how much memory they hold."""

from __future__ import annotations

import re
from pathlib import Path


def processes(parent: int | None = None) -> dict[int, list[str]]:
    """{pid: argv} of the processes this user can see, or of `parent`'s children."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if parent is not None and int(_stat_fields(int(entry.name))[1]) != parent:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        found[int(entry.name)] = [arg.decode(errors="replace") for arg in argv if arg]
    return found


def stubs(parent: int | None = None) -> dict[int, list[str]]:
    """{pid: argv} of Python-backend stubs (of `parent` when given); argv is the stub,
    <repository>/<model>/<version>/model.py, its shared-memory region, ..."""
    return {
        pid: argv
        for pid, argv in processes(parent).items()
        if len(argv) > 2 and argv[0].endswith("triton_python_backend_stub")
    }


def alive(pid: int) -> bool:
    """Running, not exited: an exited stub stays a zombie until the server reaps it."""
    try:
        return _stat_fields(pid)[0] not in ("Z", "X")
    except OSError:
        return False


def rss_mib(pids) -> float:
    """Resident memory of these processes together, MiB; one gone since it was listed counts 0."""
    total_kb = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total_kb += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))
    return total_kb / 1024


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, parent pid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
