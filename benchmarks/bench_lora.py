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

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stage_bench import median_seconds, offline_model, stage_parser, sync_time, write_record  # noqa: E402


def main() -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()

    from sd_backend.config import DeploymentConfig
    from sd_backend.offline import write_offline_lora
    from sd_backend.stages import DenoiseJob, UNetStage

    model_dir = offline_model(args)
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

    def timed(n, loras):  # the r-th timed batch asks for loras[r % len]: a switch before each when they differ
        return median_seconds(stage, lambda r: jobs(n, loras[r % len(loras)]), args.repeats)

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
    write_record(args, "lora-choices", {"rank": args.rank, "rows": rows, "switch_s": switch_s,
                                        "adapted_layers": len(stage.adapters._adapted), "load_s": load_s})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
