"""What LoRA adapters chosen per request cost on the captured loops: the UNet stage
(sd15-random, 512², 50 PNDM steps, guidance 7.5, `triton` level) at batch 1 and 8 with no
adapter, with one adapter for every batch, and alternating between two adapters (a switch
before every batch), and the time of one switch alone (UNet weights and the fast path's
fused copies rewritten, synchronized).

    python benchmarks/bench_lora.py [--model sd15-random] [--rank 64] [--repeats 5] [--out DIR]

The adapters are random (offline, `write_offline_lora`), on the UNet's attention projections
(to_q, to_k, to_v, to_out.0: 128 layers of SD 1.5); the time per request does not depend on
their values, a switch's on their number of layers and rank.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e_systems import sync_time  # noqa: E402
from record import result_path  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "sd-triton"))
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    from sd_backend.config import DeploymentConfig
    from sd_backend.offline import write_offline_lora, write_offline_model
    from sd_backend.stages import DenoiseJob, UNetStage

    model_dir = write_offline_model(args.model, Path(args.cache_dir) / args.model)
    files = [write_offline_lora(model_dir, Path(args.cache_dir) / f"bench-lora-{i}.safetensors", seed=i, rank=args.rank) for i in (1, 2)]
    batches = [int(b) for b in args.batches.split(",")]
    config = DeploymentConfig(
        model=str(model_dir), opt_level="triton", dtype="float16", default_steps=args.steps, batch_buckets=tuple(batches),
        lora_choices=(f"a={files[0]}:0.05", f"b={files[1]}:0.05"),
    )
    start = sync_time()
    stage = UNetStage.from_config(config)  # captures the default request at every bucket
    load_s = sync_time() - start
    hidden = stage.unet.config.cross_attention_dim

    def jobs(n, lora):
        return [DenoiseJob(stage.check(seed=i, lora=lora), torch.randn(77, hidden).cuda().half(), torch.randn(77, hidden).cuda().half()) for i in range(n)]

    def timed(n, loras):
        stage(jobs(n, loras[0]))  # warm (and the first switch)
        times = []
        for r in range(args.repeats):
            batch = jobs(n, loras[r % len(loras)])
            start = sync_time()
            stage(batch)
            times.append(sync_time() - start)
        return statistics.median(times)

    rows = []
    for n in batches:
        base = timed(n, [""])
        same = timed(n, ["a"])
        alternating = timed(n, ["a", "b"])
        rows.append({"batch": n, "none_s": base, "same_adapter_s": same, "alternating_s": alternating})
        print(f"batch {n}: none {base:.4f} s, one adapter {same:.4f} s ({same / base - 1:+.1%}), "
              f"alternating {alternating:.4f} s ({alternating / base - 1:+.1%})", flush=True)
    switches = []
    for r in range(10):
        start = sync_time()
        stage._select_adapter(stage.check(seed=0, lora="ab"[r % 2]))
        switches.append(sync_time() - start)
    switch_s = statistics.median(switches)
    print(f"one switch (UNet, {len(stage.adapters._adapted)} layers, rank {args.rank}): {switch_s * 1000:.1f} ms; load {load_s:.1f} s")
    device = torch.cuda.get_device_name()
    record = {"device": device, "model": args.model, "steps": args.steps, "rank": args.rank, "rows": rows,
              "switch_s": switch_s, "adapted_layers": len(stage.adapters._adapted), "load_s": load_s, "command": " ".join(sys.argv)}
    path = result_path(args.out, device, "lora-choices", ".json")
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
