"""Where one SD UNet call spends its GPU time: kernels grouped by kind, torch ops vs
this project's patched UNet (after the per-shape dispatch has measured), alone and as a
step of a denoising loop (step-invariant work done once for the loop).

    python benchmarks/profile_unet.py [--batch 2,16] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sd_backend  # noqa: E402,F401  (the checkout's packages, installed or not)
from record import result_path  # noqa: E402  (benchmarks/, the script's own folder)

KINDS = [
    ("attention", ("flash", "fmha", "attention", "_attn", "sdpa")),
    ("conv", ("conv", "implicit", "cudnn", "xmma_fprop", "sm90_xmma", "nhwc")),
    ("gemm", ("gemm", "cutlass", "cublas", "matmul", "sm90_")),
    ("norm", ("norm", "welford", "group", "layer")),
    ("copy/layout", ("copy", "transpose", "cat", "contiguous", "nchw", "to_")),
]


def kind(name: str) -> str:
    low = name.lower()
    for label, needles in KINDS:
        if any(n in low for n in needles):
            return label
    return "elementwise/other"


def profile(unet, batch: int, hidden: int, in_loop: bool = False) -> dict:
    """One UNet call; `in_loop`: a step of a denoising loop, whose step-invariant work
    (sd_backend.fast.step_constants) was done once for the loop, as in the graphs."""
    from sd_backend.fast.step_constants import StepConstants

    x = torch.randn(batch, 4, 64, 64, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    timesteps = torch.tensor([500, 499], device="cuda")
    e = torch.randn(batch, 77, hidden, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        constants = StepConstants(unet, timesteps, e) if in_loop else None

        def call():
            if constants is not None:
                return constants.unet_step(1, x)
            return unet(x, timesteps[1], encoder_hidden_states=e)

        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
    by_kind: dict[str, float] = collections.defaultdict(float)
    top = []
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0)
        if us <= 0:
            continue
        by_kind[kind(evt.key)] += us
        top.append((us, evt.count, evt.key[:90]))
    top.sort(reverse=True)
    total = sum(by_kind.values())
    return {
        "batch": batch,
        "gpu_ms": total / 1000,
        "by_kind_ms": {k: v / 1000 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [{"ms": us / 1000, "calls": n, "kernel": name} for us, n, name in top[:15]],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="/tmp/sd-triton-cache/sd15-random")
    parser.add_argument("--batch", default="2,16")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    from sd_backend.fast.modules import patch_model
    from sd_backend.fast.runtime import FastPath
    from sd_backend.offline import write_offline_model

    if not Path(args.model).exists():
        write_offline_model("sd15-random", args.model)
    torch.backends.cudnn.benchmark = True
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", torch_dtype=torch.float16)
    unet = unet.to("cuda", memory_format=torch.channels_last).eval()
    hidden = unet.config.cross_attention_dim
    record = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "profiles": []}
    fast = FastPath()  # the deployment defaults: `measure` dispatch
    for label in ("torch", "patched", "patched-in-loop"):
        if label == "patched":
            record["patch_counts"] = patch_model(unet, fast)
        for batch in (int(b) for b in args.batch.split(",")):
            result = profile(unet, batch, hidden, in_loop=label == "patched-in-loop") | {"unet": label}
            record["profiles"].append(result)
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in result["by_kind_ms"].items())
            print(f"{label:8s} batch {batch:2d}: {result['gpu_ms']:.2f} ms GPU  ({kinds})", flush=True)
            for row in result["top"][:8]:
                print(f"    {row['ms']:7.3f} ms  x{row['calls']:<4d} {row['kernel']}")
    record["dispatch"] = fast.decisions()
    used = sum(d["uses_triton"] for d in record["dispatch"])
    print(f"dispatch: Triton kernel chosen at {used} of {len(record['dispatch'])} shapes")
    for d in record["dispatch"]:
        print(f"    {'triton' if d['uses_triton'] else 'torch '} {d['triton_ms']:.4f} vs {d['torch_ms']:.4f} ms  {d['key'][:100]}")
    result_path(args.out, record["gpu"], "unet-profile", ".json", dated=False).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
