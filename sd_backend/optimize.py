"""GPU optimization levels for the UNet stage.

- `compile`: channels-last UNet under `torch.compile(mode="reduce-overhead")`, the
  baseline this project measures itself against.
- `triton`: this project's OpenAI-Triton kernels patched into the UNet and the VAE
  decoder (where they time faster than torch's op, per shape: kernels/dispatch.py),
  channels-last, and the **whole denoising loop** (UNet calls, the
  classifier-free-guidance combine and the scheduler arithmetic) captured as one CUDA
  graph per (batch bucket, height, width, steps, scheduler, guidance on/off). Inside the
  graph, work that is the same at every step (the time embedding of every step, the
  cross-attention keys and values of the text) runs once per loop (kernels/loop_constants.py).
- `deepspeed`: DeepSpeed-Inference kernel injection into the UNet (the seed tutorial's
  engine: its fused attention and transformer-block kernels), inside the same
  whole-loop graphs.

How the loop becomes a graph: the scheduler runs on CPU timesteps, so its per-step
coefficients are CPU scalars that the capture bakes into the kernels' arguments (they
are fixed for a graph key: that is the precomputed coefficient table); the UNet gets
its timesteps from a device tensor made before capture. Initial latents, embeddings,
guidance scales and (for Euler ancestral) every step's noise are static device
buffers, filled before each replay; the noise is drawn on the CPU from the request's
own generator in the order diffusers draws it, so a seed gives the same image on the
graph path as on the eager one.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Sequence

from .params import GenerationParams
from .schedulers import make_scheduler
from .stages import denoise

log = logging.getLogger("sd_backend")

# Schedulers whose step() draws noise it actually uses (eta 0 for DDIM, s_churn 0 for Euler).
_NOISY = {"euler_a"}


def optimize_unet_stage(stage, capture: bool = True) -> None:
    """Apply `stage.config.opt_level` to a loaded UNetStage (a no-op on the CPU); with
    `capture`, the default request's loop is captured at every batch bucket."""
    import torch

    level = stage.config.opt_level
    if stage.device.type != "cuda":
        log.warning("opt_level %s needs a GPU; running eager on %s", level, stage.device)
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    stage.unet.to(memory_format=torch.channels_last)
    if level == "compile":
        stage.unet = torch.compile(stage.unet, mode="reduce-overhead")
    elif level == "triton":
        from kernels.patch import patch_model

        ops = _kernel_ops(stage.config)
        inductor = "inductor" in ops
        ops = [op for op in ops if op != "inductor"]
        if ops:
            counts = patch_model(stage.unet, ops=tuple(ops))
            log.info("patched UNet with Triton kernels: %s", counts)
        if inductor:  # inductor's fusions inside our whole-loop graphs (its own graphs off)
            stage.unet = torch.compile(stage.unet, mode="default", dynamic=False)
    elif level == "deepspeed":
        stage.unet = inject_deepspeed(stage.unet)
    if level in ("triton", "deepspeed"):
        stage.graphs = LoopGraphs(stage)
        if capture:
            stage.graphs.capture_defaults()


def _kernel_ops(config) -> list[str]:
    """The deployment's `kernels` setting as a list of names."""
    return [op for op in config.kernels.replace(" ", "").split(",") if op]


def optimize_vae_stage(stage, config) -> None:
    """The `triton` level's VAE decoder: channels-last, with this project's GroupNorm (+SiLU,
    fused ResnetBlock2D tails) and attention kernels wherever `kernels` names them and the
    dispatch picks them (kernels/dispatch.py). torch's GroupNorm is the VAE's slow op: at
    the decoder's 256x256 and 512x512 activations it took 0.5-2.5 ms a call on an H200,
    ours 0.04-0.3 ms (benchmarks/results, kernels table). No-op off the GPU, on other
    levels, or with SD_OPTIMIZE_VAE=0 (A/B runs)."""
    import os

    import torch

    if stage.device.type != "cuda" or config.opt_level != "triton" or os.environ.get("SD_OPTIMIZE_VAE", "1") == "0":
        return
    torch.backends.cudnn.benchmark = True
    stage.vae.to(memory_format=torch.channels_last)
    ops = [op for op in _kernel_ops(config) if op in ("attention", "group_norm")]  # the VAE has no LayerNorm or GEGLU
    if ops:
        from kernels.patch import patch_model

        log.info("patched VAE with Triton kernels: %s", patch_model(stage.vae, ops=tuple(ops)))


class _TextEncoderStandIn:
    """What DeepSpeed's generic injection wraps as the text encoder, which it always
    wraps: its CLIP wrapper reaches for `text_model`, which transformers 5 removed, so
    the real encoder is kept out of the injection."""

    def __init__(self, unet):
        self.text_model = type("TextModel", (), {})()
        self.device, self.dtype, self.config = unet.device, unet.dtype, None


class _InjectionTarget:
    """A pipeline-shaped object holding only the UNet, for DeepSpeed's generic injection."""

    def __init__(self, unet):
        self.unet = unet
        self.text_encoder = _TextEncoderStandIn(unet)


def deepspeed_arch_list(value: str | None) -> str | None:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed's op builder parses it: `9.0a` -> `9.0`
    (it reads each entry as a number and fails on the arch-specific suffix)."""
    if not value:
        return value
    entries = value.replace(";", " ").replace(",", " ").split()
    return " ".join(e.rstrip("af") if e[:1].isdigit() else e for e in entries)


def inject_deepspeed(unet):
    """The UNet with DeepSpeed-Inference's diffusers kernels injected (fp16 only)."""
    import os

    import torch

    if unet.dtype != torch.float16:
        raise ValueError(f"opt_level deepspeed: DeepSpeed's diffusers kernels run in float16 only, not {unet.dtype}; set dtype float16")
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if deepspeed_arch_list(arch) != arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = deepspeed_arch_list(arch)
    try:
        from deepspeed.module_inject.replace_module import generic_injection
    except ImportError as err:
        raise ImportError(f"opt_level deepspeed needs DeepSpeed (pip install 'sd-triton[deepspeed]'): {err}") from err
    target = _InjectionTarget(unet)
    # the graphs are ours (whole loop, per bucket): DeepSpeed's own UNet graph holds one shape
    generic_injection(target, dtype=torch.float16, enable_cuda_graph=False)
    injected = getattr(target.unet, "unet", target.unet)  # unwrap DeepSpeed's DSUNet
    # the new blocks keep some parameters on the CPU; init_inference would move the model after
    injected.to(unet.device)
    log.info("DeepSpeed kernels injected into the UNet")
    return injected


@contextlib.contextmanager
def _noise_from(scheduler, buffers: list):
    """Make the scheduler's `randn_tensor` hand out the prepared noise buffers in order."""
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    queue = iter(buffers)

    def prepared(shape, generator=None, device=None, dtype=None, layout=None):
        buffer = next(queue)
        if tuple(buffer.shape) != tuple(shape):
            raise RuntimeError(f"noise buffer {tuple(buffer.shape)} != requested {tuple(shape)}")
        return buffer

    if original is not None:
        module.randn_tensor = prepared
    try:
        yield
    finally:
        if original is not None:
            module.randn_tensor = original


class CapturedLoop:
    """The denoising loop of one graph key as a CUDA graph with static buffers."""

    def __init__(self, stage, bucket: int, params: GenerationParams, pool):
        import torch

        self.stage = stage
        self.bucket = bucket
        self.scheduler_name = params.scheduler
        self.steps = params.steps
        unet = stage.unet
        latent_shape = (bucket, unet.config.in_channels, params.height // stage.vae_scale, params.width // stage.vae_scale)
        device, dtype = stage.device, stage.dtype
        self.cfg = params.uses_guidance
        hidden = unet.config.cross_attention_dim
        # static inputs, filled before each replay
        self.latents = torch.randn(latent_shape, device=device, dtype=dtype)
        self.embeds = torch.randn(((2 if self.cfg else 1) * bucket, 77, hidden), device=device, dtype=dtype)
        self.guidance = torch.full((bucket, 1, 1, 1), 7.5, device=device) if self.cfg else None
        self.noise = torch.randn((params.steps,) + latent_shape, device=device, dtype=dtype)
        if self.scheduler_name not in _NOISY:
            self.noise = self.noise[:1].expand((params.steps,) + latent_shape)  # drawn but unused
        probe = make_scheduler(self.scheduler_name, stage.scheduler_config)
        probe.set_timesteps(self.steps, device="cpu")
        self.unet_timesteps = probe.timesteps.to(device)  # (steps,) on the GPU for the UNet

        # warm up (autotuning, cuDNN algorithm search, lazy inits) on a side stream, then capture
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._loop()
        torch.cuda.current_stream(device).wait_stream(side)
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = self._loop()

    def _loop(self):
        scheduler = make_scheduler(self.scheduler_name, self.stage.scheduler_config)
        scheduler.set_timesteps(self.steps, device="cpu")  # CPU: coefficients become constants
        with _noise_from(scheduler, list(self.noise.unbind(0))), self._constants() as constants:
            return denoise(
                self.stage.unet, scheduler, self.latents, self.embeds, self.guidance, None, self.unet_timesteps,
                constants=constants,
            )

    def _constants(self):
        """The loop's step-invariant work done once per replay (kernels.loop_constants), on the
        `triton` level's patched UNet; a null context elsewhere or with SD_LOOP_CONSTANTS=0."""
        if self.stage.config.opt_level != "triton" or hasattr(self.stage.unet, "_orig_mod"):
            return contextlib.nullcontext()  # DeepSpeed's UNet, or inductor's (it would trace the context)
        from kernels import loop_constants

        if not loop_constants.enabled():
            return contextlib.nullcontext()
        return loop_constants.LoopConstants(self.stage.unet, self.unet_timesteps, self.embeds)

    def run(self, latents, embeds, guidance, generators: Sequence):
        """Replay for n <= bucket images; returns (n, 4, h, w)."""
        n = latents.shape[0]
        self.latents[:n].copy_(latents)
        if n < self.bucket:  # pad the bucket with copies of the first image (their output is dropped)
            self.latents[n:].copy_(latents[:1].expand(self.bucket - n, -1, -1, -1))
        if self.cfg:
            negatives, prompts = embeds.chunk(2)
            for half, source in ((0, negatives), (1, prompts)):
                rows = self.embeds[half * self.bucket : (half + 1) * self.bucket]
                rows[:n].copy_(source)
                rows[n:].copy_(source[:1].expand(self.bucket - n, -1, -1))
            self.guidance[:n].copy_(guidance)
            self.guidance[n:].fill_(1.0)
        else:
            self.embeds[:n].copy_(embeds)
            self.embeds[n:].copy_(embeds[:1].expand(self.bucket - n, -1, -1))
        if self.scheduler_name in _NOISY:
            self.noise[:, :n].copy_(self._draw_noise(generators, n))
        self.graph.replay()
        return self.output[:n].clone()

    def _draw_noise(self, generators: Sequence, n: int):
        """Every step's noise, from each image's generator in diffusers' order."""
        import torch

        shape = (1,) + tuple(self.latents.shape[1:])
        per_step = [
            torch.cat([torch.randn(shape, generator=g, dtype=self.latents.dtype) for g in generators[:n]])
            for _ in range(self.steps)
        ]
        return torch.stack(per_step).to(self.latents.device, non_blocking=True)


class LoopGraphs:
    """Captured loops of a UNetStage, sharing one memory pool; eager for keys not captured."""

    def __init__(self, stage):
        import torch

        self.stage = stage
        self.pool = torch.cuda.graph_pool_handle()
        self.loops: dict[tuple, CapturedLoop] = {}

    def capture(self, params: GenerationParams, buckets: Sequence[int]) -> float:
        """Capture the loop of `params`' key for each bucket; returns seconds spent."""
        start = time.perf_counter()
        for bucket in sorted(buckets):
            key = (bucket,) + params.group_key()
            if key not in self.loops:
                self.loops[key] = CapturedLoop(self.stage, bucket, params, self.pool)
        return time.perf_counter() - start

    def capture_defaults(self) -> None:
        """The deployment's default request at every configured batch bucket."""
        config = self.stage.config
        params = self.stage.check(seed=0)
        seconds = self.capture(params, config.batch_buckets)
        log.info("captured %d denoising-loop graphs in %.1f s", len(self.loops), seconds)

    def find(self, params: GenerationParams, n: int) -> CapturedLoop | None:
        """The smallest captured bucket that holds n images of this key."""
        best = None
        for (bucket, *key), loop in self.loops.items():
            if tuple(key) == params.group_key() and bucket >= n and (best is None or bucket < best.bucket):
                best = loop
        return best
