"""GPU memory of the VAE stage under the batch sizes a dynamic batcher forms, with and
without the warm-up at load (VAEStage.warm_up).

    python benchmarks/vae_memory.py [--model sd15-random] [--out benchmarks/results]

For each variant: torch's reserved memory after load, then after each decode of a batch
sequence in shuffled order; the warm-up works if the sequence adds nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from record import result_path  # noqa: E402  (benchmarks/, the script's own folder)

SEQUENCE = [1, 3, 2, 5, 8, 6, 4, 7, 8, 1]


def run(config, warm: bool) -> dict:
    from sd_backend import loading
    from sd_backend.stages import VAEStage

    torch.cuda.empty_cache()
    source, device, dtype = loading.placement(config, None)
    start = time.perf_counter()
    stage = VAEStage(loading.load_vae(source, device, dtype), device, dtype)
    warmed = stage.warm_up(config) if warm else []
    torch.cuda.synchronize()
    loaded = {"load_s": round(time.perf_counter() - start, 2), "reserved_mib": torch.cuda.memory_reserved() / 2**20}
    side = (config.default_height or stage.vae.config.sample_size) // 8
    after = []
    for n in SEQUENCE:
        stage([torch.randn(1, 4, side, side)] * n)
        after.append(torch.cuda.memory_reserved() / 2**20)
    del stage
    return {"warm_up": warmed, "after_load": loaded, "sequence": SEQUENCE, "reserved_mib_after_each": after,
            "growth_after_load_mib": max(after) - loaded["reserved_mib"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    from sd_backend.config import DeploymentConfig

    torch.backends.cudnn.benchmark = True  # as the served triton level sets it
    config = DeploymentConfig(model=args.model)
    record = {"gpu": torch.cuda.get_device_name(0), "model": args.model,
              "cold": run(config, warm=False), "warm": run(config, warm=True)}
    print(json.dumps(record, indent=1))
    result_path(args.out, record["gpu"], "vae-memory", ".json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
