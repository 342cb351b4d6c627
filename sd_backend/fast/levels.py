"""A deployment's `opt_level` applied to a loaded stage, on a GPU.

- `compile`: channels-last UNet under `torch.compile(mode="reduce-overhead")`, the
  baseline this project measures itself against.
- `triton`: this project's kernels patched into the UNet and the VAE decoder
  (sd_backend.fast.modules, per shape where they time faster than torch's op),
  channels-last, and the whole denoising loop captured as CUDA graphs (graphs.py), with
  the step-invariant work done once per loop (step_constants.py).
- `deepspeed`: DeepSpeed-Inference's kernel injection into the UNet (the seed tutorial's
  engine), inside the same whole-loop graphs.
"""

from __future__ import annotations

import logging
import os

from ..config import DeploymentConfig
from .graphs import LoopGraphs
from .load_caches import fast_path_for, remember

log = logging.getLogger("sd_backend")

_VAE_OPS = ("attention", "group_norm")  # the VAE has no LayerNorm or GEGLU


def optimize_unet_stage(stage, capture: bool = True) -> None:
    """Apply `stage.config.opt_level` to a loaded UNetStage (a no-op on the CPU); with
    `capture`, the default request's loop is captured at every batch bucket."""
    import torch

    config: DeploymentConfig = stage.config
    level = config.opt_level
    if stage.device.type != "cuda":
        log.warning("opt_level %s needs a GPU; running eager on %s", level, stage.device)
        return
    torch.backends.cudnn.benchmark = config.fast_path.cudnn_search
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    stage.unet.to(memory_format=torch.channels_last)
    hoist = False
    if level == "compile":
        stage.unet = torch.compile(stage.unet, mode="reduce-overhead")
    elif level == "triton":
        options = config.fast_path
        ops = tuple(op for op in options.kernels if op != "inductor")
        if ops:
            from .modules import patch_model

            stage.fast_path = fast_path_for(options, config.cache_dir, "unet", stage.device)
            log.info("patched UNet with Triton kernels: %s", patch_model(stage.unet, stage.fast_path, ops))
        if "inductor" in options.kernels:  # inductor's fusions inside our whole-loop graphs (its own graphs off)
            stage.unet = torch.compile(stage.unet, mode="default", dynamic=False)
        # the tables need the patched modules; inductor would trace their bindings
        hoist = bool(ops) and options.loop_constants and "inductor" not in options.kernels
    elif level == "deepspeed":
        stage.unet = inject_deepspeed(stage.unet)
    if level in ("triton", "deepspeed"):
        stage.graphs = LoopGraphs(stage, hoist, config.fast_path.step_graphs, config.fast_path.unet_graph)
        if capture:
            stage.graphs.capture_defaults()
            remember(stage.fast_path)  # every shape of the default loops met: a restart reuses them


def optimize_vae_stage(stage, config: DeploymentConfig) -> None:
    """The `triton` level's VAE decoder: channels-last, with this project's GroupNorm (+SiLU,
    fused ResnetBlock2D tails) and attention wherever the options name them and the dispatch
    picks them. No-op off the GPU, on other levels, or with fast_path.optimize_vae off."""
    import torch

    options = config.fast_path
    if stage.device.type != "cuda" or config.opt_level != "triton" or not options.optimize_vae:
        return
    torch.backends.cudnn.benchmark = options.cudnn_search
    stage.vae.to(memory_format=torch.channels_last)
    ops = tuple(op for op in options.kernels if op in _VAE_OPS)
    if ops:
        from .modules import patch_model

        stage.fast_path = fast_path_for(options, config.cache_dir, "vae", stage.device)
        log.info("patched VAE with Triton kernels: %s", patch_model(stage.vae, stage.fast_path, ops))


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
    import torch

    if unet.dtype != torch.float16:
        raise ValueError(f"opt_level deepspeed: DeepSpeed's diffusers kernels run in float16 only, not {unet.dtype}; set dtype float16")
    # DeepSpeed's op builder reads the arch list from the environment when it compiles, at load
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
