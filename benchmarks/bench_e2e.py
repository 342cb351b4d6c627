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
import contextlib
import datetime
import gc
import importlib.metadata
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
TOMESD_VERSION = "0.1.3"  # tome_applied sets its `_tome_info["size"]`, an internal of this version


def sync_time() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> int:
    """Peak bytes of GPU memory since the last reset (0 without CUDA)."""
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def rel_l2(a, b) -> float:
    a, b = a.float().flatten(), b.float().flatten().to(a.device)
    return float((a - b).norm() / b.norm())


def diffusers_pipeline(model_dir: str, dtype, scheduler: str, device: str = "cuda"):
    """diffusers' own pipeline class for the model (model_index.json names it), with `scheduler`."""
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    from sd_backend.schedulers import make_scheduler

    pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype)
    if isinstance(pipe, StableDiffusionPipeline):
        pipe.safety_checker = None
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


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

    def __init__(
        self, model_dir: str, variant: str, steps: int, size: int, scheduler: str, guidance: float, cutoff: float = 1.0,
        device: str = "cuda",
    ):
        from diffusers import StableDiffusionXLPipeline

        self.steps, self.size, self.guidance, self.cutoff = steps, size, guidance, cutoff
        # fp16 on the GPU; float32 on the CPU, as the stages' `auto` dtype
        self.pipe = diffusers_pipeline(model_dir, torch.float16 if device != "cpu" else torch.float32, scheduler, device)
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
        vae.to(self.pipe.unet.dtype)
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()[0]
        return (image * 255).round().astype("uint8")


class StagesSystem:
    """This project's three stages in one process (what the served ensemble runs)."""

    def __init__(
        self, model_dir: str, options, steps: int, size: int, buckets, scheduler: str, guidance: float, cutoff: float = 1.0,
        device: str = "cuda",
    ):
        from sd_backend.config import DeploymentConfig
        from sd_backend.engine import Engine

        self.steps, self.size, self.guidance = steps, size, guidance
        config = DeploymentConfig(
            model=model_dir,
            device=device,
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
        """Capture the loops of a request with `skipping` at batch 1 and `batch`; seconds spent
        (0 off the GPU, where the `triton` level runs the eager loop)."""
        unet = self.engine.unet
        return unet.graphs.capture(unet.check(seed=0, **skipping), (1, batch)) if unet.graphs is not None else 0.0

    def decode(self, latents):
        return self.engine.vae([latents[None]])[0]


# system-name suffix -> the FastPathOptions field it sets, and the value it sets it to
SUFFIXES = {
    "always": ("kernel_dispatch", "always"),  # our kernel wherever it applies, untimed
    "nofuse": ("fuse_projections", False),  # separate q/k/v GEMMs
    "copies": ("keep_layout", False),  # diffusers' layout copies around attention kept
    "nohoist": ("loop_constants", False),  # time embedding, ResNet time projections, cross-attention k/v at every step
    "wholeloop": ("step_graphs", False),  # the captured loop as one graph, not one per step
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
        return DiffusersSystem(
            args.model_dir, name, args.steps, args.size, args.scheduler, args.guidance, args.guidance_cutoff, args.device
        )
    return StagesSystem(
        args.model_dir, options_for(name), args.steps, args.size, (1, args.batch), args.scheduler, args.guidance,
        args.guidance_cutoff, args.device,
    )


def measure(name: str, args, reference) -> dict:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    reset_peak_memory()
    start = sync_time()
    system = build(name, args)
    system.run(1, seed=0)
    first_image_s = sync_time() - start
    load_peak = peak_memory()

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
        result["_reference"] = {"latents": latents, "image": system.decode(latents), "tome": {}}
    own = {(): latents}  # this system's final latents (seed 1) by skipping setting, for the ToMe rows
    stages = hasattr(system, "capture")
    settings = [skipping_row(name, system, args, reference, latents, setting, own) for setting in args.skipping] if stages else []
    if args.tome:
        eager_tome = reference["tome"] if reference is not None else result["_reference"]["tome"]
        settings += tome_rows(name, system, args, reference, own, eager_tome)
    del system
    return [result] + settings


def timings(system, args, **skipping) -> dict:
    """Seconds per image at batch 1 (--repeats runs) and images/s at --batch (best of 2)."""
    reset_peak_memory()
    times = []
    for i in range(args.repeats):
        t0 = sync_time()
        system.run(1, seed=100 + i, **skipping)
        times.append(sync_time() - t0)
    peak_b1 = peak_memory()
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


def skipping_label(setting: dict) -> str:
    return " ".join(f"{k.replace('_', ' ')} {v}" for k, v in setting.items())


def setting_key(setting: dict) -> tuple:
    return tuple(sorted(setting.items()))


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


def tome_unet(system):
    """The UNet2DConditionModel that tomesd patches, or None where it cannot (torch.compile'd)."""
    unet = system.engine.unet.unet if hasattr(system, "engine") else system.pipe.unet
    return None if hasattr(unet, "_orig_mod") else unet


@contextlib.contextmanager
def tome_applied(system, ratio: float, size: int):
    """ToMe on the system's UNet for the duration: tomesd 0.1.3's apply_patch with its defaults
    (merge in self-attention only, max_downsample 1, sx = sy = 2) and use_rand=False (no random
    dst choice: the same merge on every run). A stages system's captured loops are set aside,
    so every loop of a ToMe row is captured (and its per-shape dispatch timed) with ToMe on;
    afterwards the patch is removed and the exact loops put back."""
    import tomesd

    unet = tome_unet(system)
    tomesd.apply_patch(unet, ratio=ratio, use_rand=False)
    # tomesd reads the latent size that a forward pre-hook on the UNet records; DeepCache's
    # steps call the UNet's blocks, never its forward, so the hook would not run there
    scale = system.engine.unet.vae_scale if hasattr(system, "engine") else system.pipe.vae_scale_factor
    unet._tome_info["size"] = (size // scale, size // scale)
    graphs = system.engine.unet.graphs if hasattr(system, "engine") else None
    exact_loops = None
    if graphs is not None:
        exact_loops, graphs.loops = graphs.loops, {}
    try:
        yield
    finally:
        tomesd.remove_patch(unet)
        if graphs is not None:
            graphs.loops = exact_loops


def tome_rows(name: str, system, args, reference, own: dict, eager_tome: dict) -> list[dict]:
    """The --tome rows of one system: each ratio in exact mode and, on stages systems, with each
    --tome-skipping setting; timed as the exact row, with their distance from this system
    without ToMe (exact mode, and the same skipping setting alone), same seed. Eager's ToMe
    latents go into `eager_tome` (ratio -> latents); other systems report their distance from them."""
    if tome_unet(system) is None:
        print(f"--- {name}: no ToMe rows (a torch.compile'd UNet: tomesd's class swap needs a re-trace)", flush=True)
        return []
    stages = hasattr(system, "capture")
    settings = [{}] + (args.tome_skipping if stages else [])
    rows = []
    try:
        for setting in settings:  # the no-ToMe latents of each setting, before the patch
            if setting_key(setting) not in own:
                own[setting_key(setting)] = system.latents(seed=1, **setting)
        for ratio in args.tome:
            with tome_applied(system, ratio, args.size):
                rows += [tome_row(name, system, args, reference, own, eager_tome, ratio, setting) for setting in settings]
    except Exception as err:  # noqa: BLE001 - ToMe failing must not lose the system's exact and skipping rows
        traceback.print_exc()
        rows.append({"system": f"{name} tome", "error": f"{type(err).__name__}: {err}"[:2000]})
    return rows


def tome_row(name: str, system, args, reference, own: dict, eager_tome: dict, ratio: float, setting: dict) -> dict:
    label = " ".join(filter(None, [name, f"tome {ratio}", skipping_label(setting)]))
    print(f"--- {label}", flush=True)
    try:
        row = {"system": label, "tome_ratio": ratio, "skipping": setting}
        row["capture_s"] = system.capture(args.batch, **setting) if hasattr(system, "capture") else None
        row |= timings(system, args, **setting)
        latents = system.latents(seed=1, **setting)
        exact = own[()]
        row["latents_rel_l2_vs_exact"] = rel_l2(latents, exact)
        image = system.decode(latents)
        row["image_psnr_vs_exact_db"] = psnr(image, system.decode(exact))
        if setting:  # what ToMe adds on top of the skipping setting alone
            alone = own[setting_key(setting)]
            row["latents_rel_l2_vs_same_skipping"] = rel_l2(latents, alone)
            row["image_psnr_vs_same_skipping_db"] = psnr(image, system.decode(alone))
        if reference is not None:
            row["latents_rel_l2_vs_eager_fp16"] = rel_l2(latents, reference["latents"])
            if not setting and ratio in eager_tome:  # does ToMe on this path compute what diffusers + tomesd does?
                row["latents_rel_l2_vs_eager_same_tome"] = rel_l2(latents, eager_tome[ratio])
        elif name == "eager":  # eager is the reference: its exact latents are eager fp16's
            row["latents_rel_l2_vs_eager_fp16"] = row["latents_rel_l2_vs_exact"]
            eager_tome[ratio] = latents
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


def parse_ratios(text: str) -> list[float]:
    ratios = []
    for item in filter(None, text.split(",")):
        try:
            ratio = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a ToMe ratio (e.g. 0.5)") from None
        if not 0.0 < ratio <= 0.75:  # tomesd: at most 1 - 1/(sx*sy) of the tokens, 0.75 at its sx = sy = 2
            raise argparse.ArgumentTypeError(f"{item!r}: a ToMe ratio is above 0 and at most 0.75")
        ratios.append(ratio)
    return ratios


def check_tomesd() -> str:
    """tomesd's version, before any GPU time is spent; SystemExit where it is missing or another."""
    try:
        version = importlib.metadata.version("tomesd")
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"--tome needs tomesd=={TOMESD_VERSION} (pip install tomesd=={TOMESD_VERSION}; on the offline GPU host, "
            f"in the wheelhouse: ../shared/gpu-host/make_wheelhouse.sh .whl tomesd=={TOMESD_VERSION})"
        ) from None
    if version != TOMESD_VERSION:
        raise SystemExit(f"--tome: tomesd {version} is installed; this benchmark reads internals of {TOMESD_VERSION}")
    return version


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

    if args.model in OFFLINE_MODELS:
        t0 = time.perf_counter()
        args.model_dir = str(write_offline_model(args.model, Path(args.cache_dir) / args.model))
        print(f"model {args.model} ready in {time.perf_counter() - t0:.1f} s", flush=True)
    else:
        args.model_dir = args.model

    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
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
    lines += ["", f"eager fp32 vs eager fp16 latents rel L2 (noise floor): {record['eager_fp32_vs_fp16_latents_rel_l2']}",
              "", f"command: `{record['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
