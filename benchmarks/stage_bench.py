"""What the one-stage benchmarks (bench_lora.py, bench_img2img.py) share: their arguments,
the offline model, a median time and where the record goes."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e_systems import sync_time  # noqa: E402
from record import result_path  # noqa: E402


def stage_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "sd-triton"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    return parser


def offline_model(args) -> Path:
    from sd_backend.offline import write_offline_model

    return write_offline_model(args.model, Path(args.cache_dir) / args.model)


def median_seconds(fn, make, repeats: int) -> float:
    """fn(make(0)) once to warm, then the median of `repeats` synchronized fn(make(r)) calls."""
    fn(make(0))
    times = []
    for r in range(repeats):
        batch = make(r)
        start = sync_time()
        fn(batch)
        times.append(sync_time() - start)
    return statistics.median(times)


def write_record(args, name: str, record: dict) -> Path:
    import torch

    device = torch.cuda.get_device_name()
    path = result_path(args.out, device, name, ".json")
    path.write_text(json.dumps({"device": device, "model": args.model, "steps": args.steps} | record | {"command": " ".join(sys.argv)}, indent=2))
    print(f"wrote {path}")
    return path
