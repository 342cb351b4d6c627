"""What capturing the UNet stage's loops costs at load, and what the captured loops then
run at: each variant in a fresh process, on the deployment's default request (sd15-random:
512², 50 PNDM steps, guidance 7.5) at every batch bucket.

    python benchmarks/bench_capture.py --variants triton,triton,triton-unetperstep,triton-search

A variant is a bench_e2e system name (`triton` with FastPathOptions suffixes, e.g.
`-unetperstep`, `-search`). The first variant also fills the deployment's caches
(Triton's kernels, the kernel-dispatch decisions), so list it twice to see a restart's
figures for it; with --cold every variant starts from empty caches instead (a cold start
each, e.g. `--cold --variants triton,triton-parcompile,triton,triton-parcompile`). Per variant: CUDA's start and the load, warm-up and recording seconds, GPU
memory once captured, batch-1 seconds and batch-8 images/s of the UNet stage alone, and how
far its latents are from those of variant number --reference (what is timed at warm-up,
Triton's autotuning and cuDNN's search, may choose otherwise in another process: equal only
where every choice was the same); --bucket-rates adds each bucket's images/s. Each child's
log goes to <out>/capture-<n>.log; --profile-buckets 1,2 adds to it where the host's time
went while those buckets were warmed up and recorded (torch.profiler's aten ops and cProfile's Python
functions, CPU side; those buckets' seconds then include the profilers' overhead, and every
bucket is captured by a call of its own, where a stage's load captures them in one). The
import column is torch, transformers and diffusers: what a stage's process imports first."""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import logging
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from record import result_path  # noqa: E402


def child(args) -> dict:
    start = time.perf_counter()
    import torch
    import torch.profiler

    from sd_backend.optional_deps import model_libraries

    model_libraries()  # what a stage's process imports before its weights: torch, transformers, diffusers
    import_s = time.perf_counter() - start

    from e2e_systems import options_for, sync_time
    from sd_backend.config import DeploymentConfig
    from sd_backend.stages import DenoiseJob, UNetStage
    from stage_bench import median_seconds, offline_model

    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    model_dir = offline_model(args)
    buckets = tuple(int(b) for b in args.buckets.split(","))
    # the compiler caches and the dispatch decisions under --state-dir (a fresh one per variant
    # with --cold), the offline model's files under --cache-dir
    config = DeploymentConfig(model=str(model_dir), cache_dir=args.state_dir or args.cache_dir, opt_level="triton",
                              fast_path=options_for(args.child), batch_buckets=buckets)
    start = time.perf_counter()
    torch.zeros(1, device="cuda")
    cuda_s = time.perf_counter() - start
    start = time.perf_counter()
    stage = UNetStage.from_config(config, capture=False)
    load_s = time.perf_counter() - start
    params = stage.check(seed=0)
    per_bucket = {}
    profiled = {int(b) for b in args.profile_buckets.split(",") if b}
    if not profiled:
        stage.graphs.capture(params, buckets)  # one call, as a stage's load makes it
    for bucket in buckets if profiled else ():  # one call per bucket, the profiled ones under the profilers
        on = bucket in profiled  # where the host's time goes in this bucket's warm-up and recording
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if on else contextlib.nullcontext()
        functions = cProfile.Profile() if on else None
        with profiler as prof:
            functions and functions.enable()
            stage.graphs.capture(params, (bucket,))
            functions and functions.disable()
        if on:
            print(f"--- bucket {bucket}: aten ops by host time", file=sys.stderr)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
            print(f"--- bucket {bucket}: Python functions by cumulative time", file=sys.stderr)
            pstats.Stats(functions, stream=sys.stderr).sort_stats("cumulative").print_stats(60)
    for bucket in buckets:
        loop = stage.graphs.find(params, bucket)
        per_bucket[bucket] = {"warmup_s": round(loop.warmup_s, 3), "record_s": round(loop.record_s, 3)}
    torch.cuda.synchronize()
    hidden = stage.unet.config.cross_attention_dim

    def jobs(seeds):
        out = []
        for s in seeds:
            g = torch.Generator().manual_seed(s)
            out.append(DenoiseJob(stage.check(seed=s), *(torch.randn(77, hidden, generator=g) for _ in range(2))))
        return out

    def timed(seeds) -> float:
        t0 = sync_time()
        stage(jobs(seeds))
        return sync_time() - t0

    batch1 = median_seconds(stage, lambda r: jobs([r]), args.repeats)
    biggest = max(buckets)
    timed(list(range(biggest)))
    rate = biggest / min(timed(list(range(100 + r * biggest, 100 + (r + 1) * biggest))) for r in range(2))
    if args.bucket_rates:  # every bucket's loop full: a bucket whose convolutions run slower shows here
        for bucket in buckets:
            per_bucket[bucket]["images_per_s"] = round(bucket / min(timed(list(range(200, 200 + bucket))) for _ in range(2)), 3)
    latents = torch.cat(stage(jobs([5, 6, 7]))).cpu()
    torch.save(latents, args.latents)
    return {
        "variant": args.child, "import_s": round(import_s, 2), "cuda_s": round(cuda_s, 2), "load_s": round(load_s, 2), "buckets": per_bucket,
        "warmup_s": round(sum(b["warmup_s"] for b in per_bucket.values()), 2),
        "record_s": round(sum(b["record_s"] for b in per_bucket.values()), 2),
        "allocated_gib": round(torch.cuda.memory_allocated() / 2**30, 2), "reserved_gib": round(torch.cuda.memory_reserved() / 2**30, 2),
        "batch1_s": round(batch1, 4), f"batch{biggest}_images_per_s": round(rate, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="triton,triton,triton-unetperstep,triton-search")
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--buckets", default="1,2,3,4,5,6,7,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "sd-triton"))
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--profile-buckets", default="", help="comma-separated buckets whose capture is profiled on the host (into capture-<n>.log)")
    parser.add_argument("--bucket-rates", action="store_true", help="also time each bucket's loop full (images/s per bucket, in the JSON)")
    parser.add_argument("--profile-variant", type=int, default=-1, help="profile only this variant (by position); -1: every one")
    parser.add_argument("--reference", type=int, default=0, help="the variant (by position) whose latents the others are compared with")
    parser.add_argument("--cold", action="store_true",
                        help="every variant starts with empty compiler caches and no dispatch decisions (a cold start each)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--latents", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return

    import torch

    rows, saved = [], {}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(args.variants.split(",")):
            latents = Path(tmp) / f"{i}.pt"
            command = [sys.executable, __file__, "--child", variant, "--latents", str(latents), "--model", args.model,
                       "--buckets", args.buckets, "--repeats", str(args.repeats), "--cache-dir", args.cache_dir,
                       *(["--bucket-rates"] if args.bucket_rates else []),
                       *(["--state-dir", str(Path(tmp) / f"cold-{i}")] if args.cold else []),
                       "--profile-buckets", args.profile_buckets if args.profile_variant in (-1, i) else ""]
            start = time.perf_counter()
            with open(Path(args.out) / f"capture-{i}.log", "w") as log:
                done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                print(f"{variant}: failed (rc {done.returncode}); see capture-{i}.log", flush=True)
                rows.append({"variant": variant, "error": f"rc {done.returncode}"})
                continue
            row = json.loads(lines[-1][len("RESULT "):]) | {"process_s": round(time.perf_counter() - start, 1)}
            saved[i] = torch.load(latents).float()
            rows.append(row)
            print(json.dumps(row), flush=True)
    for i, row in enumerate(rows):
        if i in saved and args.reference in saved:
            mine, reference = saved[i], saved[args.reference]
            row["latents_equal_reference"] = bool(torch.equal(mine, reference))
            row["latents_rel_l2_reference"] = float((mine - reference).norm() / reference.norm())
    device = torch.cuda.get_device_name()
    record = {"device": device, "model": args.model, "buckets": args.buckets, "reference": args.reference, "rows": rows, "command": " ".join(sys.argv)}
    path = result_path(args.out, device, "capture", ".json")
    path.write_text(json.dumps(record, indent=2))
    rate_key = f"batch{max(int(b) for b in args.buckets.split(','))}_images_per_s"
    lines = [f"# Loop capture, {device}, {args.model}, buckets {args.buckets}", "", f"`{record['command']}`", "",
             "| # | variant | process s | imports s | CUDA start s | load s | warm-up s | recording s | allocated / reserved GiB | batch 1 s | "
             + rate_key.replace("_", " ") + f" | latents vs #{args.reference}: equal, rel. L2 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, r in enumerate(rows):
        if "error" in r or "latents_equal_reference" not in r:
            lines.append(f"| {i} | {r['variant']} | failed | | | | | | | | | |")
            continue
        lines.append(f"| {i} | {r['variant']} | {r['process_s']} | {r['import_s']} | {r['cuda_s']} | {r['load_s']} | {r['warmup_s']} | {r['record_s']} | "
                     f"{r['allocated_gib']} / {r['reserved_gib']} | {r['batch1_s']} | {r[rate_key]} | {r['latents_equal_reference']}, {r['latents_rel_l2_reference']:.2e} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
