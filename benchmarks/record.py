"""Where a benchmark writes its results: <out>/<device>-<date>-<name><suffix>, the device
as the driver names it with spaces made dashes (e.g. NVIDIA-H200-2026-11-27-e2e.json)."""

from __future__ import annotations

import datetime
from pathlib import Path


def result_path(out, device: str, name: str, suffix: str, dated: bool = True) -> Path:
    """The file for one result; creates `out`. dated=False leaves the date out of the name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    date = f"-{datetime.date.today().isoformat()}" if dated else ""
    return out / f"{device.replace(' ', '-')}{date}-{name}{suffix}"
