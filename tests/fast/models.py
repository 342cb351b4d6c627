"""Seeded tiny diffusers models and inputs for the fast path's tests."""

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from sd_backend.config import FastPathOptions
from sd_backend.fast.runtime import FastPath


def tiny_unet():
    from sd_backend.offline import ARCHITECTURES

    torch.manual_seed(0)
    return UNet2DConditionModel(**ARCHITECTURES["tiny"]["unet"]).eval()  # the offline tiny model's UNet


def tiny_xl_unet():
    from sd_backend.offline import ARCHITECTURES

    torch.manual_seed(0)
    return UNet2DConditionModel(**ARCHITECTURES["tiny-xl"]["unet"]).eval()  # the offline tiny-xl model's UNet


def sdxl_added_cond(batch: int, device, dtype) -> dict:
    """SDXL's added_cond_kwargs for tiny-xl: pooled text embeddings and the six time ids."""
    g = torch.Generator().manual_seed(5)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1)
    return {"text_embeds": torch.randn(batch, 32, generator=g).to(device, dtype), "time_ids": time_ids.to(device, dtype)}


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def cpu_kernels(options=None, attention_dtypes=()):
    """A FastPath whose kernels take CPU tensors (run under Triton's interpreter); attention
    on torch's SDPA unless `attention_dtypes` names fp32."""
    return FastPath(options or FastPathOptions(), kernel_devices=("cpu", "cuda"), attention_dtypes=attention_dtypes)


def unet_inputs(device, dtype):
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=g).to(device, dtype)  # (batch, 4, 8, 8)
    context = torch.randn(2, 77, 32, generator=g).to(device, dtype)  # (batch, 77, cross_attention_dim)
    return sample, torch.tensor(10, device=device), context


def run_unet(unet, inputs):
    sample, timestep, context = inputs
    with torch.no_grad():
        return unet(sample, timestep, encoder_hidden_states=context).sample


def run_vae(vae, latents):
    with torch.no_grad():
        return vae.decode(latents).sample


def latents(device, dtype):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)).to(device, dtype)
