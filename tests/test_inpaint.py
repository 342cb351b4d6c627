"""Inpainting through `stable_diffusion_inpaint` on a real tritonserver: INIT_IMAGE and
MASK_IMAGE -> vae_encoder beside the text encoder, then the UNet inpaints by the kind of
UNet the model has. Against diffusers' StableDiffusionInpaintPipeline on the same weights,
image, mask, prompt, seed, strength and scheduler, for both kinds: an inpainting UNet
(`tiny-inpaint`, 9 input channels) and a plain one (`tiny`, the masked-latent blend). The
final latents to the bit (the stages in one process); the served image to the bit where
the latents reach the decoder in diffusers' layout, within one level where they do not
(see tests/test_img2img.py)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.servers import is_invalid_arg
from tests.test_img2img import init_image
from tests.utils import assert_same_image

STEPS = 6
CASES = [("pndm", 1.0), ("euler_a", 0.6), ("ddim", 0.75), ("dpmpp_2m", 1.0)]


def a_mask(height: int = 64, width: int = 64) -> np.ndarray:
    """255 (repaint) over a rectangle with a soft edge (values around the 0.5 threshold too)."""
    mask = np.zeros((height, width), np.float32)
    mask[height // 4 : 3 * height // 4, width // 3 : width - 4] = 1.0
    mask[height // 4 - 2 : height // 4, :] = np.linspace(0.3, 0.7, width)  # binarized at 0.5
    return (mask * 255).round().astype(np.uint8)


def inpaint_pipeline(model_dir):
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe, image, mask, prompt, *, seed, strength, scheduler, guidance=7.5, output_type="np", **extra):
    import torch
    from PIL import Image

    from sd_backend.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    out = pipe(
        prompt, image=Image.fromarray(image), mask_image=Image.fromarray(mask), strength=strength, num_inference_steps=STEPS,
        guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type=output_type, **extra,
    ).images
    return out if output_type == "latent" else (out[0] * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def plain_pipeline(tiny_dir):
    return inpaint_pipeline(tiny_dir)


@pytest.fixture(scope="module")
def inpainting_dir(cache_dir):
    from sd_backend.offline import write_offline_model

    return write_offline_model("tiny-inpaint", cache_dir / "tiny-inpaint")


@pytest.fixture(scope="module")
def inpainting_pipeline(inpainting_dir):
    return inpaint_pipeline(inpainting_dir)


@pytest.fixture(scope="module")
def inpainting_server(cache_dir, inpainting_dir, tmp_path_factory):
    from tests.test_families import _serving

    yield from _serving(cache_dir, tmp_path_factory, "tiny-inpaint")


@pytest.mark.parametrize("model", ["tiny-inpaint", "tiny"])
@pytest.mark.parametrize("scheduler, strength", CASES)
def test_inpainting_latents_equal_diffusers(cache_dir, model, scheduler, strength):
    """In one process, both UNet kinds: the loop's latents equal the pipeline's to the bit."""
    import torch

    from sd_backend.config import DeploymentConfig
    from sd_backend.offline import write_offline_model
    from sd_backend.stages import DenoiseJob, TextEncoderStage, UNetStage, VAEEncoderStage

    model_dir = write_offline_model(model, cache_dir / model)
    config = DeploymentConfig(model=str(model_dir))
    text, encoder, unet = (stage.from_config(config) for stage in (TextEncoderStage, VAEEncoderStage, UNetStage))
    image, mask = init_image(seed=3), a_mask()
    params = encoder.check(image, mask, seed=5, steps=STEPS, scheduler=scheduler, strength=strength)
    e = text(["a red fox"], [None])[0]
    moments, masked, latent_mask = encoder.encode(image, mask)
    ours = unet([DenoiseJob(params, e.prompt_embeds, e.negative_embeds, init_moments=moments, masked_moments=masked, latent_mask=latent_mask)])[0]
    expected = reference(inpaint_pipeline(model_dir), image, mask, "a red fox", seed=5, strength=strength, scheduler=scheduler, output_type="latent")
    assert torch.equal(ours, expected), (ours - expected).abs().max()


@pytest.mark.parametrize("scheduler, strength", CASES[:2])
def test_an_inpainting_unet_serves_diffusers_images(inpainting_server, inpainting_pipeline, scheduler, strength):
    image, mask = init_image(seed=1), a_mask()
    result = inpainting_server.generate("a red fox", seed=9, steps=STEPS, scheduler=scheduler, init_image=image, mask_image=mask, strength=strength)
    expected = reference(inpainting_pipeline, image, mask, "a red fox", seed=9, strength=strength, scheduler=scheduler)
    # at strength 1 the latents start as noise (dense NCHW, as served): to the bit
    assert_same_image(result.image, expected, max_diff=0 if strength == 1.0 else 1)
    assert result.parameters["strength"] == pytest.approx(strength)


def test_an_inpainting_unet_refuses_text_to_image_naming_the_mask(inpainting_server):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        inpainting_server.generate("a red fox", seed=1, steps=2)
    assert is_invalid_arg(info.value) and "MASK_IMAGE: missing" in info.value.message(), info.value.message()


@pytest.mark.parametrize("scheduler, strength", CASES[1:3])
def test_a_plain_unet_blends_as_diffusers(grpc, plain_pipeline, scheduler, strength):
    image, mask = init_image(seed=2), a_mask()
    result = grpc.generate("a blue boat", seed=4, steps=STEPS, scheduler=scheduler, init_image=image, mask_image=mask, strength=strength)
    expected = reference(plain_pipeline, image, mask, "a blue boat", seed=4, strength=strength, scheduler=scheduler)
    assert_same_image(result.image, expected, max_diff=1)


def test_the_default_strength_is_diffusers_inpainting_default(grpc, plain_pipeline):
    image, mask = init_image(seed=2), a_mask()
    result = grpc.generate("a blue boat", seed=6, steps=STEPS, scheduler="pndm", init_image=image, mask_image=mask)
    assert result.parameters["strength"] == 1.0
    assert_same_image(result.image, reference(plain_pipeline, image, mask, "a blue boat", seed=6, strength=1.0, scheduler="pndm"), max_diff=1)


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(mask_image=np.zeros((32, 64), np.uint8)), "MASK_IMAGE: 32x64 does not match INIT_IMAGE's 64x64"),
        (dict(mask_image=np.zeros((64, 64, 3), np.uint8)), "MASK_IMAGE"),  # Triton's own shape check
        (dict(strength=1.5), "STRENGTH: 1.5 is out of range"),
    ],
)
def test_bad_inpainting_inputs_name_the_field(grpc, change, words):
    from tritonclient.utils import InferenceServerException

    request = dict(seed=1, steps=2, init_image=init_image(), mask_image=a_mask()) | change
    with pytest.raises(InferenceServerException) as info:
        grpc.generate("a cat", **request)
    assert is_invalid_arg(info.value) and words in info.value.message(), info.value.message()


def test_sd_client_inpaints_with_a_mask_file(server, grpc, tmp_path):
    from PIL import Image

    from sd_client.cli import main

    start, mask, out = tmp_path / "start.png", tmp_path / "mask.png", tmp_path / "out.png"
    Image.fromarray(init_image(seed=2)).save(start)
    Image.fromarray(a_mask()).save(mask)
    args = ["a boat", "--init-image", str(start), "--mask", str(mask), "--steps", "3", "--seed", "5", "--url", server.grpc_url]
    assert main(args + ["-o", str(out)]) == 0
    expected = grpc.generate("a boat", seed=5, steps=3, init_image=init_image(seed=2), mask_image=a_mask())
    assert_same_image(np.asarray(Image.open(out).convert("RGB")), expected.image, max_diff=0)
    assert Image.open(out).text["strength"] == "1.0"
    assert main(["a boat", "--mask", str(mask), "--url", server.grpc_url]) == 2  # --mask alone


@pytest.mark.parametrize("model", ["tiny-inpaint", "tiny"])
def test_inpainting_with_computation_skipping_equals_diffusers(cache_dir, model):
    """CACHE_INTERVAL (DeepCache's own helper on the pipeline) and GUIDANCE_CUTOFF (diffusers'
    cutoff callback, here also keeping the conditional half of the pipeline's mask and masked
    latents, as the served loop does) on both UNet kinds, in one process: to the bit."""
    import torch
    from diffusers.callbacks import SDCFGCutoffCallback

    from sd_backend.config import DeploymentConfig
    from sd_backend.offline import write_offline_model
    from sd_backend.stages import DenoiseJob, TextEncoderStage, UNetStage, VAEEncoderStage
    from tests.test_deepcache import deep_cache_helper

    class KeepMaskHalves(SDCFGCutoffCallback):
        tensor_inputs = ["prompt_embeds", "mask", "masked_image_latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
                for name in ("mask", "masked_image_latents"):
                    callback_kwargs[name] = callback_kwargs[name].chunk(2)[1]
            return super().callback_fn(pipeline, step_index, timestep, callback_kwargs)

    model_dir = write_offline_model(model, cache_dir / model)
    text, encoder, unet = (stage.from_config(DeploymentConfig(model=str(model_dir))) for stage in (TextEncoderStage, VAEEncoderStage, UNetStage))
    pipe = inpaint_pipeline(model_dir)
    image, mask = init_image(seed=4), a_mask()
    e = text(["a red fox"], [None])[0]
    moments, masked, latent_mask = encoder.encode(image, mask)
    for skipping in (dict(cache_interval=2), dict(guidance_cutoff=0.5), dict(cache_interval=3, guidance_cutoff=0.5)):
        params = encoder.check(image, mask, seed=8, steps=STEPS, scheduler="ddim", strength=0.8, **skipping)
        ours = unet([DenoiseJob(params, e.prompt_embeds, e.negative_embeds, init_moments=moments, masked_moments=masked, latent_mask=latent_mask)])[0]
        extra = {}
        if "guidance_cutoff" in skipping:
            callback = KeepMaskHalves(cutoff_step_ratio=skipping["guidance_cutoff"])
            extra = dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs)
        with deep_cache_helper(pipe, skipping.get("cache_interval", 1)):
            expected = reference(pipe, image, mask, "a red fox", seed=8, strength=0.8, scheduler="ddim", output_type="latent", **extra)
        assert torch.equal(ours, expected), (skipping, (ours - expected).abs().max())


def test_the_streaming_model_inpaints_as_the_ensemble(grpc):
    image, mask = init_image(seed=7), a_mask()
    streamed = grpc.stream("a blue boat", seed=2, steps=STEPS, scheduler="euler", init_image=image, mask_image=mask, strength=0.9)
    plain = grpc.generate("a blue boat", seed=2, steps=STEPS, scheduler="euler", init_image=image, mask_image=mask, strength=0.9)
    assert_same_image(streamed.image, plain.image, max_diff=0)
    assert streamed.parameters["strength"] == pytest.approx(0.9)
