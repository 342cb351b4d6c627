"""Stable Diffusion engines side by side: one process, one GPU, the same weights.

    python benchmarks/bench_e2e.py [--model sd15-random] [--systems eager,triton,compile]

Systems: `eager` (diffusers' own pipeline for the model as it is: StableDiffusionPipeline,
or StableDiffusionXLPipeline for SDXL), `compile` (the same with
a channels-last UNet under torch.compile(mode="reduce-overhead")), `graphs` (this
project's stages with the whole-loop CUDA graphs, no custom kernels), `triton` (the same
plus this project's Triton kernels, in the UNet and the VAE, where the per-shape dispatch
picks them) and `inductor` (the whole-loop graphs around a UNet compiled by
torch.compile's default mode, without its own CUDA graphs). Suffixes on `triton`,
combinable, turn one part off for an A/B row: `-always` takes our kernel at every shape
it supports instead of timing it against torch's op, `-nofuse` keeps separate q/k/v
projections, `-copies` keeps diffusers' layout copies around the attention and the
transformer blocks' 1x1 projections, `-nohoist` computes the time embedding and the
cross-attention keys and values at every step, `-nosplit` pads attention's head_dim to
one power of two, `-plainvae` leaves the VAE as diffusers has it, `-search` turns on cuDNN's
timed algorithm search (`cudnn.benchmark`), `-unetperstep` records the UNet into every step's graph, `-gnlooped` turns on
`fast_path.group_norm_looped`.

For each: seconds per image at batch 1 (median and min of --repeats), images/s at
--batch, time from start to first image (load + compile/capture + one image; for the
process's first system also from process start, imports and CUDA's start included), peak GPU
memory while generating at batch 1, the relative L2 distance of its final latents from
diffusers eager fp16 on the same seed, and how far its VAE's image of eager's latents is
from eager's image (uint8 levels). Writes benchmarks/results/<gpu>-<date>-e2e.json and .md.

--skipping adds rows of a stages system (graphs, triton) with GUIDANCE_CUTOFF:CACHE_INTERVAL
settings, on the same engine after its exact row. --tome adds rows with ToMe (token merging,
the `tomesd` package 0.1.3: `tomesd.apply_patch(unet, ratio, use_rand=False)`, its defaults
otherwise: self-attention tokens merged in the highest-resolution transformer blocks only)
on eager (diffusers + tomesd, the package's own setting) and the stages systems, where the
patched modules, the step constants and the whole-loop graphs run under it unchanged (the
loops are captured again with ToMe on); --tome-skipping adds ToMe with skipping settings
there. Every such row gives its distance from the same system in exact mode, same seed.
`--device cpu` runs all of it on the CPU in float32, for a smoke run on the tiny model.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
import traceback
from pathlib import Path

PROCESS_T0 = time.perf_counter()  # before numpy, torch and diffusers: the first system's cold start counts them

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2e_systems import (  # noqa: E402  (benchmarks/, the script's own folder)
    PROMPT,
    SUFFIXES,
    build,
    diffusers_pipeline,
    peak_memory,
    psnr,
    rel_l2,
    reset_peak_memory,
    setting_key,
    skipping_label,
    sync_time,
    timings,
)
from e2e_tome import check_tomesd, parse_ratios, tome_rows  # noqa: E402  (benchmarks/)
from record import result_path  # noqa: E402  (benchmarks/, the script's own folder)


def measure(name: str, args, reference, first: bool = False) -> dict:
    """One system's rows; `first`: the process's first system, whose start is a cold process's."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    reset_peak_memory()
    start = sync_time()
    system = build(name, args)
    system.run(1, seed=0)
    first_image_at = sync_time()
    first_image_s = first_image_at - start
    load_peak = peak_memory()

    result = {"system": name} | timings(system, args)
    result |= {"start_to_first_image_s": first_image_s, "peak_mem_load_gib": load_peak / 2**30}
    if first:  # a cold process's whole start: imports, CUDA's start, load, compile, first image
        result["process_start_to_first_image_s"] = first_image_at - PROCESS_T0 - args.model_write_s
    latents = system.latents(seed=1)
    if name.startswith("triton"):
        engine = system.engine
        result["kernel_dispatch"] = [
            dict(d, stage=stage.__class__.__name__)
            for stage in (engine.unet, engine.vae)
            if stage.fast_path is not None
            for d in stage.fast_path.decisions()
        ]
    if reference is not None:
        result["latents_rel_l2_vs_eager_fp16"] = rel_l2(latents, reference["latents"])
        # the VAE alone: eager's latents through this system's decoder against eager's image
        diff = np.abs(system.decode(reference["latents"]).astype(np.int16) - reference["image"].astype(np.int16))
        result["vae_image_abs_diff_vs_eager"] = {"max": int(diff.max()), "mean": float(diff.mean())}
    else:
        result["_reference"] = {"latents": latents, "image": system.decode(latents), "tome": {}}
    own = {(): latents}  # this system's final latents (seed 1) by skipping setting, for the ToMe rows
    stages = hasattr(system, "capture")
    settings = [skipping_row(name, system, args, reference, latents, setting, own) for setting in args.skipping] if stages else []
    if args.tome:
        eager_tome = reference["tome"] if reference is not None else result["_reference"]["tome"]
        settings += tome_rows(name, system, args, reference, own, eager_tome)
    del system
    return [result] + settings


def skipping_row(name: str, system, args, reference, exact_latents, setting: dict, own: dict | None = None) -> dict:
    """One --skipping setting on a stages system already measured in exact mode: its loops
    captured, timed alike, and its distance from exact mode on the same seed (the system's
    own exact latents and image; eager's too, where eager ran). Its latents go into `own`."""
    label = f"{name} {skipping_label(setting)}"
    print(f"--- {label}", flush=True)
    try:
        capture_s = system.capture(args.batch, **setting)
        row = {"system": label, "skipping": setting, "capture_s": capture_s} | timings(system, args, **setting)
        latents = system.latents(seed=1, **setting)
        if own is not None:
            own[setting_key(setting)] = latents
        row["latents_rel_l2_vs_exact"] = rel_l2(latents, exact_latents)
        row["image_psnr_vs_exact_db"] = psnr(system.decode(latents), system.decode(exact_latents))
        if reference is not None:
            row["latents_rel_l2_vs_eager_fp16"] = rel_l2(latents, reference["latents"])
    except Exception as err:  # noqa: BLE001 - one setting failing must not lose the others
        traceback.print_exc()
        row = {"system": label, "error": f"{type(err).__name__}: {err}"[:2000]}
    print(json.dumps(row), flush=True)
    return row


def fp32_floor(args, reference_latents) -> float:
    """How far diffusers eager fp32 lands from eager fp16: the noise floor of the check."""
    pipe = diffusers_pipeline(args.model_dir, torch.float32, args.scheduler, args.device)
    out = pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size,
               generator=[torch.Generator().manual_seed(1)], output_type="latent").images[0]
    del pipe
    return rel_l2(out, reference_latents)


def parse_skipping(text: str) -> list[dict]:
    settings = []
    for item in filter(None, text.split(",")):
        try:
            cutoff, interval = item.split(":")
            settings.append({"guidance_cutoff": float(cutoff), "cache_interval": int(interval)})
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not GUIDANCE_CUTOFF:CACHE_INTERVAL (e.g. 0.4:3)") from None
    return settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15-random", help="sd15-random or a diffusers directory")
    parser.add_argument("--systems", default="eager,graphs,triton,compile")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scheduler", default="pndm", help="a SCHEDULER name (sd_backend.config.SCHEDULER_NAMES)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--guidance-cutoff", type=float, default=1.0, help="GUIDANCE_CUTOFF for every system (diffusers: its CFG cutoff callback); 1 = off")
    parser.add_argument(
        "--skipping", default="", type=parse_skipping,
        help="comma list of GUIDANCE_CUTOFF:CACHE_INTERVAL settings each stages system is also measured with, "
        "on the same engine after its exact row (e.g. 0.4:1,1:3,0.4:3)",
    )
    parser.add_argument(
        "--tome", default="", type=parse_ratios,
        help="comma list of ToMe merge ratios (tomesd, use_rand=False) eager and each stages system are also measured with, "
        "after their exact and --skipping rows (e.g. 0.3,0.5)",
    )
    parser.add_argument(
        "--tome-skipping", default="", type=parse_skipping,
        help="GUIDANCE_CUTOFF:CACHE_INTERVAL settings each --tome ratio is also measured with on the stages systems (e.g. 0.4:3)",
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: float32, for a smoke run on the tiny model")
    parser.add_argument("--no-floor", action="store_true", help="skip the eager fp32 run (the noise floor of the check)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--cache-dir", default="/tmp/sd-triton-cache")
    args = parser.parse_args()
    systems = args.systems.split(",")
    for name in systems:  # before any GPU time is spent
        base, *options = name.split("-")
        unknown = [o for o in options if o not in SUFFIXES] if base in ("triton", "graphs") else options
        if base not in ("eager", "compile", "graphs", "triton", "inductor") or unknown:
            raise SystemExit(
                f"--systems: {name!r} is not eager, compile, graphs, triton or inductor with suffixes from "
                f"{', '.join(SUFFIXES)} (triton and graphs only)"
            )
    if args.tome_skipping and not args.tome:
        raise SystemExit("--tome-skipping: give the ratios it combines with in --tome")
    args.tomesd = check_tomesd() if args.tome else None

    from sd_backend.offline import OFFLINE_MODELS, write_offline_model

    args.model_write_s = 0.0
    if args.model in OFFLINE_MODELS:
        t0 = time.perf_counter()
        args.model_dir = str(write_offline_model(args.model, Path(args.cache_dir) / args.model))
        args.model_write_s = time.perf_counter() - t0  # not part of any system's start: users have weights on disk
        print(f"model {args.model} ready in {args.model_write_s:.1f} s", flush=True)
    else:
        args.model_dir = args.model

    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    results, reference = [], None
    if "eager" in systems:  # the reference comes first
        systems.remove("eager")
        systems.insert(0, "eager")
    for index, name in enumerate(systems):
        print(f"--- {name}", flush=True)
        try:
            result, *settings = measure(name, args, reference, first=index == 0)
        except Exception as err:  # noqa: BLE001 - one system failing must not lose the others
            traceback.print_exc()
            result, settings = {"system": name, "error": f"{type(err).__name__}: {err}"[:2000]}, []
        if name == "eager" and "_reference" in result:
            reference = result.pop("_reference")
            result["latents_rel_l2_vs_eager_fp16"] = 0.0
        result.pop("_reference", None)
        print(json.dumps(result), flush=True)
        results += [result] + settings
        save(args, gpu, results, None, final=False)  # a run cut short keeps what it measured
    floor = None
    # the fp32 run has no cutoff: its distance from a cut-off fp16 run would not be the noise floor
    if reference is not None and not args.no_floor and args.guidance_cutoff >= 1.0:
        try:
            floor = fp32_floor(args, reference["latents"])
        except Exception as err:  # noqa: BLE001
            floor = f"{type(err).__name__}: {err}"

    save(args, gpu, results, floor)
    return 0


def save(args, gpu: str, results: list, floor, final: bool = True) -> None:
    record = {
        "gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "model": args.model,
        "dtype": "float16" if args.device == "cuda" else "float32",
        "steps": args.steps,
        "size": args.size,
        "guidance": args.guidance,
        "guidance_cutoff": args.guidance_cutoff,
        "scheduler": args.scheduler,
        "batch": args.batch,
        "eager_fp32_vs_fp16_latents_rel_l2": floor,
        "tome": {"ratios": args.tome, "skipping": args.tome_skipping, "tomesd": args.tomesd, "use_rand": False} if args.tome else None,
        "command": "python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:]),
        "results": results,
    }
    result_path(args.out, gpu, "e2e", ".json").write_text(json.dumps(record, indent=2))
    result_path(args.out, gpu, "e2e", ".md").write_text(markdown(record))
    if final:
        print(markdown(record))


def markdown(record: dict) -> str:
    b = record["batch"]
    dtype = {"float16": "fp16", "float32": "fp32"}[record.get("dtype", "float16")]
    lines = [
        f"{record['gpu']}, {record['date']}, torch {record['torch']}, {record['model']}, {dtype}, "
        f"{record['size']}x{record['size']}, {record['steps']} {record.get('scheduler', 'pndm')} steps, guidance {record.get('guidance', 7.5)}"
        + (f", guidance cutoff {record['guidance_cutoff']}" if record.get("guidance_cutoff", 1.0) < 1.0 else ""),
        "",
        f"| system | batch 1 s/image (median / min) | batch {b} images/s | start to first image s | peak GiB at batch 1 "
        "| latents rel L2 vs eager | VAE image vs eager, uint8 levels (max / mean) | vs exact mode: latents rel L2 / image PSNR dB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in record["results"]:
        if "error" in r:
            lines.append(f"| {r['system']} | error: {r['error'][:120]} | | | | | | |")
            continue
        vae = r.get("vae_image_abs_diff_vs_eager")
        vae = f"{vae['max']} / {vae['mean']:.3f}" if vae else ""
        # a skipping row: its loops' capture time in place of start to first image
        start = f"{r['start_to_first_image_s']:.1f}" if "start_to_first_image_s" in r else ""
        if r.get("capture_s") is not None:
            start = f"capture {r['capture_s']:.1f}"
        exact = f"{r['latents_rel_l2_vs_exact']:.4f} / {r['image_psnr_vs_exact_db']:.1f}" if "latents_rel_l2_vs_exact" in r else ""
        lines.append(
            f"| {r['system']} | {r['batch1_s_median']:.3f} / {r['batch1_s_min']:.3f} | {r[f'batch{b}_images_per_s']:.2f} "
            f"| {start} | {r['peak_mem_batch1_gib']:.2f} | {r.get('latents_rel_l2_vs_eager_fp16', float('nan')):.4f} "
            f"| {vae} | {exact} |"
        )
    extra = [
        f"- {r['system']}: " + "; ".join(
            text for key, text in (
                ("latents_rel_l2_vs_eager_same_tome", "latents rel L2 vs eager with the same ToMe ratio {:.4f}"),
                ("latents_rel_l2_vs_same_skipping", "vs the same skipping without ToMe: latents rel L2 {:.4f}"),
                ("image_psnr_vs_same_skipping_db", "image PSNR {:.1f} dB"),
            ) if key in r for text in [text.format(r[key])]
        )
        for r in record["results"]
        if "latents_rel_l2_vs_eager_same_tome" in r or "latents_rel_l2_vs_same_skipping" in r
    ]
    if record.get("tome"):
        lines += ["", f"ToMe rows: tomesd {record['tome']['tomesd']}, use_rand=False, its defaults otherwise "
                  "(self-attention in the highest-resolution blocks, sx = sy = 2)"] + extra
    lines += [
        f"\n{r['system']} (the process's first system): process start to first image "
        f"{r['process_start_to_first_image_s']:.1f} s (imports, CUDA's start, load, compile, first image; the offline model's write excluded)"
        for r in record["results"] if "process_start_to_first_image_s" in r
    ]
    lines += ["", f"eager fp32 vs eager fp16 latents rel L2 (noise floor): {record['eager_fp32_vs_fp16_latents_rel_l2']}",
              "", f"command: `{record['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
