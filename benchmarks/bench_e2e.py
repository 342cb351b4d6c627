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
one power of two, `-plainvae` leaves the VAE as diffusers has it.

For each: seconds per image at batch 1 (median and min of --repeats), images/s at
--batch, time from start to first image (load + compile/capture + one image), peak GPU
memory while generating at batch 1, the relative L2 distance of its final latents from
diffusers eager fp16 on the same seed, and how far its VAE's image of eager's latents is
from eager's image (uint8 levels). Writes benchmarks/results/<gpu>-<date>-e2e.json and .md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from record import result_path  # noqa: E402  (benchmarks/, the script's own folder)

PROMPT = "a photo of an astronaut riding a horse on the moon"


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def rel_l2(a, b) -> float:
    a, b = a.float().flatten(), b.float().flatten().to(a.device)
    return float((a - b).norm() / b.norm())


def diffusers_pipeline(model_dir: str, dtype, scheduler: str):
    """diffusers' own pipeline class for the model (model_index.json names it), with `scheduler`."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from sd_backend.schedulers import make_scheduler

    pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype)
    if isinstance(pipe, StableDiffusionPipeline):
        pipe.safety_checker = None
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda")


def BatchedCFGCutoff(sdxl: bool):
    """diffusers' SDCFGCutoffCallback / SDXLCFGCutoffCallback for any batch: they keep row -1 of
    each conditioning tensor, which is the conditional half only at batch 1 (at batch 8 the UNet
    then gets one prompt row for eight latents and fails); this keeps the conditional half,
    which is the same row at batch 1."""
    from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback

    base = SDXLCFGCutoffCallback if sdxl else SDCFGCutoffCallback

    class Batched(base):
        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            ratio, index = self.config.cutoff_step_ratio, self.config.cutoff_step_index
            if step_index == (index if index is not None else int(pipeline.num_timesteps * ratio)):
                for name in self.tensor_inputs:
                    callback_kwargs[name] = callback_kwargs[name].chunk(2)[1]
                pipeline._guidance_scale = 0.0
            return callback_kwargs

    return Batched


class DiffusersSystem:
    """diffusers' pipeline, optionally with torch.compile."""

    def __init__(self, model_dir: str, variant: str, steps: int, size: int, scheduler: str, guidance: float, cutoff: float = 1.0):
        from diffusers import StableDiffusionXLPipeline

        self.steps, self.size, self.guidance, self.cutoff = steps, size, guidance, cutoff
        self.pipe = diffusers_pipeline(model_dir, torch.float16, scheduler)
        # SDXL's pipeline decodes in fp32 where the VAE config says force_upcast (as VAEStage)
        self.upcast = isinstance(self.pipe, StableDiffusionXLPipeline) and self.pipe.vae.config.force_upcast
        if variant == "compile":
            self.pipe.unet.to(memory_format=torch.channels_last)
            self.pipe.unet = torch.compile(self.pipe.unet, mode="reduce-overhead", dynamic=False)

    def run(self, batch: int, seed: int, output_type: str = "np"):
        generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        out = self.pipe(
            [PROMPT] * batch,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            height=self.size,
            width=self.size,
            generator=generators,
            output_type=output_type,
            **self._cutoff_callback(),
        )
        return out.images

    def _cutoff_callback(self) -> dict:
        """diffusers' own guidance cutoff (what GUIDANCE_CUTOFF equals), below 1 only."""
        from diffusers import StableDiffusionXLPipeline

        if self.cutoff >= 1.0:
            return {}
        sdxl = isinstance(self.pipe, StableDiffusionXLPipeline)
        callback = BatchedCFGCutoff(sdxl)(cutoff_step_ratio=self.cutoff)
        return dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs)

    def latents(self, seed: int):
        return self.run(1, seed, output_type="latent")[0]

    def decode(self, latents):
        """(h, w, 3) uint8 image of (4, h/8, w/8) latents through the pipeline's VAE, rounded as VAEStage rounds."""
        vae = self.pipe.vae.to(torch.float32) if self.upcast else self.pipe.vae
        with torch.inference_mode():
            image = vae.decode((latents[None] / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
        vae.to(torch.float16)
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()[0]
        return (image * 255).round().astype("uint8")


class StagesSystem:
    """This project's three stages in one process (what the served ensemble runs)."""

    def __init__(self, model_dir: str, options, steps: int, size: int, buckets, scheduler: str, guidance: float, cutoff: float = 1.0):
        from sd_backend.config import DeploymentConfig
        from sd_backend.engine import Engine

        self.steps, self.size, self.guidance = steps, size, guidance
        config = DeploymentConfig(
            model=model_dir,
            opt_level="triton",
            fast_path=options,
            default_steps=steps,
            default_height=size,
            default_width=size,
            default_scheduler=scheduler,
            default_guidance=guidance,
            default_guidance_cutoff=cutoff,
            batch_buckets=tuple(buckets),
        )
        self.engine = Engine(config)

    def run(self, batch: int, seed: int, **skipping):
        return self.engine.generate([PROMPT] * batch, seed=[seed + i for i in range(batch)], **skipping)

    def latents(self, seed: int, **skipping):
        return self.engine.latents([PROMPT], seed=seed, **skipping)[0][0]

    def capture(self, batch: int, **skipping) -> float:
        """Capture the loops of a request with `skipping` at batch 1 and `batch`; seconds spent."""
        unet = self.engine.unet
        return unet.graphs.capture(unet.check(seed=0, **skipping), (1, batch))

    def decode(self, latents):
        return self.engine.vae([latents[None]])[0]


# system-name suffix -> the FastPathOptions field it sets, and the value it sets it to
SUFFIXES = {
    "always": ("kernel_dispatch", "always"),  # our kernel wherever it applies, untimed
    "nofuse": ("fuse_projections", False),  # separate q/k/v GEMMs
    "copies": ("keep_layout", False),  # diffusers' layout copies around attention kept
    "nohoist": ("loop_constants", False),  # time embedding, ResNet time projections, cross-attention k/v at every step
    "nosplit": ("split_head_dim", False),  # attention head_dim padded to one power of two
    "plainvae": ("optimize_vae", False),  # diffusers' VAE as it is (NCHW, torch's ops)
}


def options_for(name: str):
    """The FastPathOptions of a `triton`/`graphs`/`inductor` system name with its suffixes."""
    from sd_backend.config import FastPathOptions

    base, *suffixes = name.split("-")
    kernels = {"graphs": (), "inductor": ("inductor",)}.get(base, FastPathOptions().kernels)
    return FastPathOptions(kernels=kernels, **dict(SUFFIXES[suffix] for suffix in suffixes))


def build(name: str, args):
    if name in ("eager", "compile"):
        return DiffusersSystem(args.model_dir, name, args.steps, args.size, args.scheduler, args.guidance, args.guidance_cutoff)
    return StagesSystem(
        args.model_dir, options_for(name), args.steps, args.size, (1, args.batch), args.scheduler, args.guidance, args.guidance_cutoff
    )


def measure(name: str, args, reference) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = sync_time()
    system = build(name, args)
    system.run(1, seed=0)
    first_image_s = sync_time() - start
    load_peak = torch.cuda.max_memory_allocated()

    result = {"system": name} | timings(system, args)
    result |= {"start_to_first_image_s": first_image_s, "peak_mem_load_gib": load_peak / 2**30}
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
        result["_reference"] = {"latents": latents, "image": system.decode(latents)}
    settings = [skipping_row(name, system, args, reference, latents, setting) for setting in args.skipping] if hasattr(system, "capture") else []
    del system
    return [result] + settings


def timings(system, args, **skipping) -> dict:
    """Seconds per image at batch 1 (--repeats runs) and images/s at --batch (best of 2)."""
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.repeats):
        t0 = sync_time()
        system.run(1, seed=100 + i, **skipping)
        times.append(sync_time() - t0)
    peak_b1 = torch.cuda.max_memory_allocated()
    system.run(args.batch, seed=200, **skipping)  # warm-up at this batch (compile re-traces, graphs exist)
    rates = []
    for i in range(2):
        t0 = sync_time()
        system.run(args.batch, seed=300 + i, **skipping)
        rates.append(args.batch / (sync_time() - t0))
    return {
        "batch1_s_median": statistics.median(times),
        "batch1_s_min": min(times),
        "batch1_s_all": times,
        f"batch{args.batch}_images_per_s": max(rates),
        "peak_mem_batch1_gib": peak_b1 / 2**30,
    }


def skipping_row(name: str, system, args, reference, exact_latents, setting: dict) -> dict:
    """One --skipping setting on a stages system already measured in exact mode: its loops
    captured, timed alike, and its distance from exact mode on the same seed (the system's
    own exact latents and image; eager's too, where eager ran)."""
    label = f"{name} " + " ".join(f"{k.replace('_', ' ')} {v}" for k, v in setting.items())
    print(f"--- {label}", flush=True)
    try:
        capture_s = system.capture(args.batch, **setting)
        row = {"system": label, "skipping": setting, "capture_s": capture_s} | timings(system, args, **setting)
        latents = system.latents(seed=1, **setting)
        row["latents_rel_l2_vs_exact"] = rel_l2(latents, exact_latents)
        row["image_psnr_vs_exact_db"] = psnr(system.decode(latents), system.decode(exact_latents))
        if reference is not None:
            row["latents_rel_l2_vs_eager_fp16"] = rel_l2(latents, reference["latents"])
    except Exception as err:  # noqa: BLE001 - one setting failing must not lose the others
        traceback.print_exc()
        row = {"system": label, "error": f"{type(err).__name__}: {err}"[:2000]}
    print(json.dumps(row), flush=True)
    return row


def psnr(image, reference) -> float:
    """PSNR in dB of two uint8 images (inf when equal)."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def fp32_floor(args, reference_latents) -> float:
    """How far diffusers eager fp32 lands from eager fp16: the noise floor of the check."""
    pipe = diffusers_pipeline(args.model_dir, torch.float32, args.scheduler)
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

    from sd_backend.offline import OFFLINE_MODELS, write_offline_model

    if args.model in OFFLINE_MODELS:
        t0 = time.perf_counter()
        args.model_dir = str(write_offline_model(args.model, Path(args.cache_dir) / args.model))
        print(f"model {args.model} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    else:
        args.model_dir = args.model

    gpu = torch.cuda.get_device_name(0)
    results, reference = [], None
    if "eager" in systems:  # the reference comes first
        systems.remove("eager")
        systems.insert(0, "eager")
    for name in systems:
        print(f"--- {name}", flush=True)
        try:
            result, *settings = measure(name, args, reference)
        except Exception as err:  # noqa: BLE001 - one system failing must not lose the others
            traceback.print_exc()
            result, settings = {"system": name, "error": f"{type(err).__name__}: {err}"[:2000]}, []
        if name == "eager" and "_reference" in result:
            reference = result.pop("_reference")
            result["latents_rel_l2_vs_eager_fp16"] = 0.0
        result.pop("_reference", None)
        print(json.dumps(result), flush=True)
        results += [result] + settings
        save(args, gpu, results, None)  # a run cut short keeps what it measured
    floor = None
    # the fp32 run has no cutoff: its distance from a cut-off fp16 run would not be the noise floor
    if reference is not None and not args.no_floor and args.guidance_cutoff >= 1.0:
        try:
            floor = fp32_floor(args, reference["latents"])
        except Exception as err:  # noqa: BLE001
            floor = f"{type(err).__name__}: {err}"

    save(args, gpu, results, floor)
    return 0


def save(args, gpu: str, results: list, floor) -> None:
    record = {
        "gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "model": args.model,
        "steps": args.steps,
        "size": args.size,
        "guidance": args.guidance,
        "guidance_cutoff": args.guidance_cutoff,
        "scheduler": args.scheduler,
        "batch": args.batch,
        "eager_fp32_vs_fp16_latents_rel_l2": floor,
        "command": "python benchmarks/bench_e2e.py " + " ".join(sys.argv[1:]),
        "results": results,
    }
    result_path(args.out, gpu, "e2e", ".json").write_text(json.dumps(record, indent=2))
    result_path(args.out, gpu, "e2e", ".md").write_text(markdown(record))
    if floor is not None or len(results) == len(args.systems.split(",")):
        print(markdown(record))


def markdown(record: dict) -> str:
    b = record["batch"]
    lines = [
        f"{record['gpu']}, {record['date']}, torch {record['torch']}, {record['model']}, fp16, "
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
        start = f"{r['start_to_first_image_s']:.1f}" if "start_to_first_image_s" in r else f"capture {r['capture_s']:.1f}"
        exact = f"{r['latents_rel_l2_vs_exact']:.4f} / {r['image_psnr_vs_exact_db']:.1f}" if "latents_rel_l2_vs_exact" in r else ""
        lines.append(
            f"| {r['system']} | {r['batch1_s_median']:.3f} / {r['batch1_s_min']:.3f} | {r[f'batch{b}_images_per_s']:.2f} "
            f"| {start} | {r['peak_mem_batch1_gib']:.2f} | {r.get('latents_rel_l2_vs_eager_fp16', float('nan')):.4f} "
            f"| {vae} | {exact} |"
        )
    lines += ["", f"eager fp32 vs eager fp16 latents rel L2 (noise floor): {record['eager_fp32_vs_fp16_latents_rel_l2']}",
              "", f"command: `{record['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
