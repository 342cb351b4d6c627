"""Find and load the model components a deployment config names."""

from __future__ import annotations

import os
from typing import Any

from .config import DeploymentConfig

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def resolve_model(config: DeploymentConfig) -> str:
    """The local diffusers directory to load from (sd_backend.fetch: offline models written,
    checkpoints converted and hub ids downloaded on first use, into the deployment's cache)."""
    from .fetch import local_model

    return str(local_model(config))


def resolve_device(config: DeploymentConfig, instance_device: str | None = None):
    """The torch device: the Triton instance's GPU if it has one and config allows."""
    import torch

    if config.device != "auto":
        return torch.device(config.device)
    if instance_device is not None:
        return torch.device(instance_device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(config: DeploymentConfig, device) -> Any:
    import torch

    if config.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, _DTYPES[config.dtype])


def placement(config: DeploymentConfig, instance_device: str | None = None) -> tuple[str, Any, Any]:
    """(where to load from, torch device, torch dtype) for one stage of a deployment."""
    from .optional_deps import model_libraries

    model_libraries()
    source = resolve_model(config)
    device = resolve_device(config, instance_device)
    if device.type == "cuda" and device.index is not None:
        import torch

        # kernels, streams and graph captures use the current device: make it this instance's GPU
        torch.cuda.set_device(device)
    if device.type == "cuda":
        from .fast.load_caches import machine

        use_compiler_caches(config.cache_dir, machine(device))  # before the first kernel compiles
    return source, device, resolve_dtype(config, device)


def use_compiler_caches(cache_dir: str, machine_info: dict) -> None:
    """Point Triton's and inductor's caches into the deployment's cache_dir, at
    `triton/<machine>` and `inductor/<machine>`, where the environment names none. Their own
    keys hold the source, the GPU architecture and the library versions, but not the GPU
    model or the driver, and Triton's now hold timings too (the attention kernel's
    autotuning, `cache_results`): <machine> is a fingerprint of `machine_info`
    (sd_backend.fast.load_caches.machine: the GPU, the driver, torch, CUDA and Triton), so an
    H100 sharing a volume with an H200 tunes its own blocks. A restart on the same machine
    reuses them (sd_backend.fast.load_caches keeps the rest)."""
    from pathlib import Path

    from .fast.load_caches import machine_key

    key = machine_key(machine_info)
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(cache_dir) / "triton" / key))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir) / "inductor" / key))


def _hub_kwargs() -> dict[str, Any]:
    token = os.environ.get("HF_TOKEN")
    return {"token": token} if token else {}


def load_tokenizer(source: str, suffix: str = ""):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(source, subfolder=f"tokenizer{suffix}", **_hub_kwargs())


def load_text_encoder(source: str, device, dtype, suffix: str = ""):
    """`text_encoder` (CLIPTextModel), or SDXL's `text_encoder_2` (CLIPTextModelWithProjection)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kind = CLIPTextModelWithProjection if suffix == "_2" else CLIPTextModel
    model = kind.from_pretrained(source, subfolder=f"text_encoder{suffix}", dtype=dtype, **_hub_kwargs())
    return model.to(device).eval().requires_grad_(False)


def load_text_encoders(source: str, device, dtype, family) -> list[tuple[Any, Any]]:
    """(tokenizer, text encoder) of each of the family's text encoders, in diffusers' order."""
    return [(load_tokenizer(source, s), load_text_encoder(source, device, dtype, s)) for s in family.text_encoders]


def load_unet(source: str, device, dtype):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **_hub_kwargs())
    return model.to(device).eval().requires_grad_(False)


def load_vae(source: str, device, dtype):
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **_hub_kwargs())
    return model.to(device).eval().requires_grad_(False)


def load_scheduler_config(source: str) -> dict[str, Any]:
    from diffusers import PNDMScheduler

    return dict(PNDMScheduler.load_config(source, subfolder="scheduler", **_hub_kwargs()))


def family(source: str):
    """The model family of `source` (sd_backend.family), read from its own configs."""
    from .family import read_family

    return read_family(source)
