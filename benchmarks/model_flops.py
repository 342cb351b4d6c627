"""The arithmetic of one image for each offline model's architecture: FLOPs of one UNet call
at the CFG batch of one image (2), of the whole loop, and of the VAE's decode, counted by
torch's FlopCounterMode on meta tensors (no weights, no GPU; matmuls, convolutions and
attention, the ops that bound a step), with the time they take at a given rate.

    python benchmarks/model_flops.py [--models sd15-random,sd21-random,sdxl-random] [--tflops 745]
        [--rates conv=580,attention=460,gemm=480]

745 TFLOP/s is the H200's dense fp16 GEMM rate at 8192³ (../shared/gpu-host/README.md): a
floor under any exact fp16 engine's time per image on that card, whatever its kernels.
The second table splits the UNet loop's FLOPs by op family and prices each at the rate that
family reaches at SD's shapes on that card (the same README's table of achievable rates: 3×3
convolutions 415–630 TFLOP/s, SDPA at head_dim 64 450–476, the UNet's GEMMs 291–622): a
ceiling for an engine whose every op ran at its family's rate and nothing else ran.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (model, native latent side, steps and guidance its benchmark runs: bench_e2e's defaults for it)
RUNS = {"sd15-random": (64, 50), "sd21-random": (96, 50), "sdxl-random": (128, 30)}


# FlopCounterMode's ops by family: on meta tensors SDPA runs as its math path (bmm)
FAMILIES = {"aten.convolution": "conv", "aten.bmm": "attention", "aten.baddbmm": "attention",
            "aten.mm": "gemm", "aten.addmm": "gemm"}


def by_family(counter) -> dict[str, float]:
    """TFLOP per op family of a FlopCounterMode's global counts."""
    split: dict[str, float] = {}
    for op, flops in counter.get_flop_counts()["Global"].items():
        family = FAMILIES.get(str(op).split(".default")[0], "other")
        split[family] = split.get(family, 0.0) + flops / 1e12
    return split


def count(name: str) -> tuple[dict[str, float], float]:
    """({family: TFLOP} of one UNet call at batch 2, TFLOP of one VAE decode at batch 1) for `name`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from sd_backend.offline import _VAE_BLOCKS, ARCHITECTURES

    arch, (side, _) = ARCHITECTURES[name], RUNS[name]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch["unet"]).half()
        vae = AutoencoderKL(latent_channels=4, **_VAE_BLOCKS, **arch["vae"])
        extra = {}
        if arch["unet"].get("addition_embed_type") == "text_time":
            pooled = arch["unet"]["projection_class_embeddings_input_dim"] - 6 * arch["unet"]["addition_time_embed_dim"]
            extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(2, pooled, dtype=torch.half), "time_ids": torch.zeros(2, 6, dtype=torch.half)}
        sample = torch.zeros(2, 4, side, side, dtype=torch.half)
        context = torch.zeros(2, 77, arch["unet"]["cross_attention_dim"], dtype=torch.half)
        with FlopCounterMode(display=False) as unet_flops:
            unet(sample, torch.tensor([10.0]), encoder_hidden_states=context, **extra)
        with FlopCounterMode(display=False) as vae_flops:
            vae.decode(torch.zeros(1, 4, side, side))
    return by_family(unet_flops), vae_flops.get_total_flops() / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(RUNS))
    parser.add_argument("--tflops", type=float, default=745.0, help="the rate the floor is computed at (TFLOP/s)")
    parser.add_argument("--rates", default="conv=580,attention=460,gemm=480",
                        help="TFLOP/s per op family for the ceiling table (the UNet loop only)")
    args = parser.parse_args()
    rates = {k: float(v) for k, v in (item.split("=") for item in args.rates.split(","))}
    rows = []
    print(f"| model | size | steps | UNet call, CFG batch 2, TFLOP | loop TFLOP | VAE decode TFLOP | floor at {args.tflops:g} TFLOP/s, s/image |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        families, vae = count(name)
        unet = sum(families.values())
        side, steps = RUNS[name]
        total = unet * steps + vae
        rows.append((name, families, steps))
        print(f"| {name} | {side * 8}² | {steps} | {unet:.2f} | {unet * steps:.1f} | {vae:.2f} | {total / args.tflops:.3f} |")
    print(f"\n| model | UNet call TFLOP by family | UNet loop at {args.rates} TFLOP/s, s/image |")
    print("| --- | --- | --- |")
    for name, families, steps in rows:
        seconds = sum(tflop / rates.get(family, args.tflops) for family, tflop in families.items()) * steps
        split = ", ".join(f"{family} {tflop:.2f}" for family, tflop in sorted(families.items()))
        print(f"| {name} | {split} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
