"""The systems bench_e2e.py compares, and how one is timed and compared: diffusers' own
pipeline (`eager`, `compile`) and this project's stages (`graphs`, `triton`, `inductor`, with
the FastPathOptions suffixes), each with `run`, `latents` and `decode`, on the same prompt."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

PROMPT = "a photo of an astronaut riding a horse on the moon"


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


def psnr(image, reference) -> float:
    """PSNR in dB of two uint8 images (inf when equal)."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


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
    "unetperstep": ("unet_graph", False),  # the UNet recorded into every step's graph, not once per loop
    "search": ("cudnn_search", True),  # cuDNN times its convolution algorithms per shape (cudnn.benchmark)
    "heuristics": ("cudnn_search", False),  # the default since session 13; kept for the earlier records' commands
    "nosplit": ("split_head_dim", False),  # attention head_dim padded to one power of two
    "plainvae": ("optimize_vae", False),  # diffusers' VAE as it is (NCHW, torch's ops)
    "gnlooped": ("group_norm_looped", True),  # large GroupNorms as one program per group where the batch fills the GPU
    "geglulinear": ("geglu_linear", True),  # the feed-forward's projection and gate as one GEMM
    "parcompile": ("compile_workers", 8),  # the default now; kept for the earlier records' commands
    "serialcompile": ("compile_workers", 0),  # attention's autotuning candidates compiled one by one inside the autotuner
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
