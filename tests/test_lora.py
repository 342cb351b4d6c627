"""LoRA adapters fused at load (deployment setting `lora`), in both formats users have
(diffusers/PEFT and kohya): served images equal diffusers' pipeline with the same adapters
loaded (`load_lora_weights`), weighted (`set_adapters`) and fused (`fuse_lora`), to the bit;
one adapter alone equals `fuse_lora(lora_scale=...)`; with two, both are in the weights."""

from __future__ import annotations

import numpy as np
import pytest

from tests.utils import assert_same_image

STEPS = 4


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    """(diffusers-format file, kohya-format file): two random LoRAs for `tiny`."""
    from sd_backend.offline import write_offline_lora

    folder = tmp_path_factory.mktemp("lora")
    return (
        write_offline_lora(tiny_dir, folder / "fox-diffusers.safetensors", "diffusers", seed=1),
        write_offline_lora(tiny_dir, folder / "fox-kohya.safetensors", "kohya", seed=2),
    )


@pytest.fixture(scope="module")
def lora_server(cache_dir, tmp_path_factory, adapters):
    from tests.servers import client, running_server

    lora = f"{adapters[0]}:0.7,{adapters[1]}"  # the second at scale 1
    with running_server(cache_dir, tmp_path_factory.mktemp("lora-server"), env={"SD_LORA": lora}) as server:
        c = client(server.grpc_url)
        yield c
        c.close()


def lora_reference(tiny_dir, adapters, prompt, *, seed, scheduler="pndm"):
    import torch
    from diffusers import StableDiffusionPipeline

    from sd_backend.schedulers import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    for name, path in zip(("a", "b"), adapters):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 1.0])
    pipe.fuse_lora(lora_scale=1.0, adapter_names=["a", "b"])
    out = pipe(prompt, num_inference_steps=STEPS, height=64, width=64, generator=torch.Generator().manual_seed(seed), output_type="np")
    return (out.images[0] * 255).round().astype(np.uint8)


def test_fused_adapters_serve_diffusers_images(lora_server, tiny_dir, adapters, reference_pipeline):
    from tests.conftest import reference_image

    result = lora_server.generate("a red fox", seed=3, steps=STEPS, scheduler="pndm")
    assert_same_image(result.image, lora_reference(tiny_dir, adapters, "a red fox", seed=3), max_diff=0)
    plain = reference_image(reference_pipeline, "a red fox", seed=3, steps=STEPS, guidance=7.5, scheduler="pndm")
    assert np.abs(result.image.astype(int) - plain.astype(int)).max() > 8  # the adapters really changed the model


def test_each_format_alone_equals_diffusers_in_process(tiny_dir, adapters):
    """Each file on its own (the UNet's and the text encoder's parts), through the stages."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sd_backend.config import DeploymentConfig
    from sd_backend.engine import Engine

    for path in adapters:
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(path), adapter_name="x")
        pipe.fuse_lora(lora_scale=0.5, adapter_names=["x"])
        expected = pipe("a boat", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(2), output_type="latent").images
        ours = Engine(DeploymentConfig(model=str(tiny_dir), lora=(f"{path}:0.5",), default_steps=STEPS)).latents(["a boat"], seed=2)[0]
        assert torch.equal(ours, expected), path.name


def test_two_adapters_are_both_in_the_fused_weights(tiny_dir, adapters):
    """Fused(a, b) = W + scale_a x dW_a + scale_b x dW_b, to float32's rounding of two additions
    (loading an adapter into a model with a fused one would unfuse it: the order matters)."""
    import torch
    from diffusers import UNet2DConditionModel

    from sd_backend.lora import fuse_loras, parse_loras

    def weight(entries):
        unet = UNet2DConditionModel.from_pretrained(str(tiny_dir), subfolder="unet")
        fuse_loras(unet, "unet", parse_loras(entries), sdxl=False)
        return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach()

    base, a, b = weight([]), weight([f"{adapters[0]}:0.7"]), weight([str(adapters[1])])
    both = weight([f"{adapters[0]}:0.7", str(adapters[1])])
    expected = base + (a - base) + (b - base)
    ulp = torch.finfo(torch.float32).eps * max(base.abs().max().item(), both.abs().max().item())
    assert (both - expected).abs().max().item() <= 8 * ulp  # a few roundings of each sum
    assert (both - b).abs().max().item() > 1000 * ulp and (both - a).abs().max().item() > 1000 * ulp


def test_a_missing_adapter_file_fails_the_deployment_naming_it(tmp_path):
    from sd_backend.config import DeploymentConfig

    with pytest.raises(ValueError, match=r"lora: '.*nowhere.safetensors:0.5': no such file"):
        DeploymentConfig(lora=(f"{tmp_path}/nowhere.safetensors:0.5",))


def test_scales_are_read_after_the_last_colon(tmp_path):
    from sd_backend.lora import LoraSpec, parse_loras

    path = tmp_path / "a:b.safetensors"  # a ':' in the file name is part of the name
    path.write_bytes(b"")
    assert parse_loras([f"{path}", f"{path}:0.25"]) == (LoraSpec(str(path), 1.0), LoraSpec(str(path), 0.25))
