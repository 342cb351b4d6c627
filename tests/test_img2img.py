"""Image-to-image through `stable_diffusion_img2img` on a real tritonserver (the tiny model):
INIT_IMAGE -> vae_encoder beside the text encoder, the UNet's loop from the step STRENGTH
gives. Against diffusers' StableDiffusionImg2ImgPipeline on the same weights, image, prompt,
seed, strength and scheduler: the final latents to the bit (the stages in one process), the
served image within one level. Why not the image to the bit: diffusers' latents keep the
channels-last layout its encoder gave them (the stages keep it too) and its VAE decodes them
so; between the served models they travel as dense NCHW tensors, and the decoder's
convolutions round by the layout they get."""

from __future__ import annotations

import concurrent.futures
import math

import numpy as np
import pytest

from tests.servers import is_invalid_arg
from tests.utils import assert_same_image

STEPS = 6


@pytest.fixture(scope="module")
def img2img_pipeline(tiny_dir):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def init_image(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth RGB picture with some detail (what a VAE encodes meaningfully), uint8."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rng = np.random.default_rng(seed)
    channels = [np.sin(6 * x + p) * np.cos(4 * y - p) for p in rng.uniform(0, math.pi, 3)]
    return ((np.stack(channels, -1) * 0.5 + 0.5) * 255).round().astype(np.uint8)


def reference(pipe, image, prompt, *, seed, strength, scheduler, guidance=7.5, negative=None, steps=STEPS, output_type="np"):
    import torch
    from PIL import Image

    from sd_backend.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    out = pipe(
        prompt, image=Image.fromarray(image), strength=strength, negative_prompt=negative, num_inference_steps=steps,
        guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type=output_type,
    ).images
    return out if output_type == "latent" else (out[0] * 255).round().astype(np.uint8)


CASES = [("pndm", 0.5), ("euler_a", 0.8), ("ddim", 1.0), ("dpmpp_2m", 0.3), ("euler", 0.75)]


@pytest.fixture(scope="module")
def stages(tiny_dir):
    from sd_backend.config import DeploymentConfig
    from sd_backend.stages import TextEncoderStage, UNetStage, VAEEncoderStage

    config = DeploymentConfig(model=str(tiny_dir), device="cpu")
    return TextEncoderStage.from_config(config), VAEEncoderStage.from_config(config), UNetStage.from_config(config)


@pytest.mark.parametrize("scheduler, strength", CASES)
def test_image_to_image_latents_equal_diffusers(stages, img2img_pipeline, scheduler, strength):
    from sd_backend.stages import DenoiseJob

    text, encoder, unet = stages
    image = init_image(seed=1)
    e = text(["a watercolor fox"], [None])[0]
    params = encoder.check(image, seed=4, steps=STEPS, scheduler=scheduler, strength=strength)
    job = DenoiseJob(params, e.prompt_embeds, e.negative_embeds, e.pooled, e.negative_pooled, init_moments=encoder([image])[0])
    ours = unet([job])[0]
    theirs = reference(img2img_pipeline, image, "a watercolor fox", seed=4, strength=strength, scheduler=scheduler, output_type="latent")
    assert ours.shape == theirs.shape == (1, 4, 8, 8)
    assert (ours == theirs).all(), float((ours - theirs).abs().max())


@pytest.mark.parametrize("scheduler, strength", CASES)
def test_image_to_image_matches_diffusers(grpc, img2img_pipeline, scheduler, strength):
    image = init_image(seed=1)
    result = grpc.generate("a watercolor fox", init_image=image, strength=strength, seed=4, steps=STEPS, scheduler=scheduler)
    expected = reference(img2img_pipeline, image, "a watercolor fox", seed=4, strength=strength, scheduler=scheduler)
    assert result.image.shape == (64, 64, 3)
    assert_same_image(result.image, expected)  # one level: see the module docstring
    assert result.parameters["strength"] == pytest.approx(strength)


def test_the_image_sets_the_size_and_the_default_strength_is_diffusers(grpc, img2img_pipeline):
    image = init_image(96, 128, seed=2)
    result = grpc.generate("a lighthouse", init_image=image, negative_prompt="blurry", seed=9, steps=STEPS, scheduler="pndm")
    assert result.image.shape == (96, 128, 3) and result.parameters["strength"] == pytest.approx(0.8)
    expected = reference(img2img_pipeline, image, "a lighthouse", seed=9, strength=0.8, scheduler="pndm", negative="blurry")
    assert_same_image(result.image, expected)
    weaker = grpc.generate("a lighthouse", init_image=image, negative_prompt="blurry", seed=9, steps=STEPS, scheduler="pndm", strength=0.4)
    assert_same_image(weaker.image, reference(img2img_pipeline, image, "a lighthouse", seed=9, strength=0.4, scheduler="pndm", negative="blurry"))
    assert not np.array_equal(weaker.image, result.image)


def test_a_mixed_batch_of_text_and_image_requests_gives_each_its_image(grpc, img2img_pipeline, reference_pipeline):
    """Text-to-image and image-to-image share the unet and vae models' batchers; grouped,
    nothing refused, each image its own (one level where a batch size changes rounding)."""
    from tests.conftest import reference_image

    image = init_image(seed=3)
    jobs = [dict(seed=20 + i, init_image=image if i % 2 else None, strength=0.6 if i % 2 else None) for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: grpc.generate("a red cube", steps=STEPS, scheduler="pndm", **j), jobs))
    for job, result in zip(jobs, results):
        if job["init_image"] is None:
            expected = reference_image(reference_pipeline, "a red cube", seed=job["seed"], steps=STEPS, guidance=7.5, scheduler="pndm")
        else:
            expected = reference(img2img_pipeline, image, "a red cube", seed=job["seed"], strength=0.6, scheduler="pndm")
        assert_same_image(result.image, expected)


def _raw_request(server, inputs: dict):
    import tritonclient.grpc as tg

    tensors = []
    for name, (array, dtype) in inputs.items():
        tensor = tg.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    raw = tg.InferenceServerClient(server.grpc_url)
    try:
        return raw.infer("stable_diffusion_img2img", tensors)
    finally:
        raw.close()


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(strength=0.0), ["STRENGTH", "0.0", "out of range"]),
        (dict(strength=1.5), ["STRENGTH", "1.5", "out of range"]),
        (dict(strength=float("nan")), ["STRENGTH", "nan"]),
        (dict(strength=0.1), ["STRENGTH", "int(6 x 0.1) = 0 steps"]),
        (dict(height=128), ["HEIGHT", "128", "INIT_IMAGE's 64x64"]),
        (dict(image=init_image(60, 64)), ["INIT_IMAGE's height", "60", "multiple of 8"]),
        (dict(image=np.zeros((64, 64, 4), np.uint8)), ["INIT_IMAGE", "[1,64,64,4]"]),
        (dict(image=None), ["INIT_IMAGE", "missing"]),
        (dict(image=np.zeros((64, 64, 3), np.float32)), ["INIT_IMAGE", "FP32", "UINT8"]),
    ],
    ids=["strength-0", "strength-1.5", "strength-nan", "no-steps-left", "height-mismatch", "odd-size", "rgba", "no-image", "float-image"],
)
def test_bad_image_to_image_inputs_name_the_field(server, grpc, change, words):
    from tritonclient.utils import InferenceServerException

    image = change["image"] if "image" in change else init_image()
    inputs = {
        "PROMPT": (np.array([[b"a cat"]], dtype=object), "BYTES"),
        "STEPS": (np.array([[STEPS]], np.int32), "INT32"),
        "STRENGTH": (np.array([[change.get("strength", 0.5)]], np.float32), "FP32"),
    }
    if image is not None:
        inputs["INIT_IMAGE"] = (image[None], {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32"}[image.dtype])
    if "height" in change:
        inputs["HEIGHT"] = (np.array([[change["height"]]], np.int32), "INT32")
    with pytest.raises(InferenceServerException) as info:
        _raw_request(server, inputs)
    message = info.value.message()
    assert is_invalid_arg(info.value), message
    assert all(w in message for w in words), message
    assert grpc.generate("after the bad one", init_image=init_image(), strength=0.5, seed=1, steps=2).image.shape == (64, 64, 3)


def test_sd_client_writes_an_image_to_image_png(server, tmp_path):
    from PIL import Image

    from sd_client.cli import main

    start = tmp_path / "start.png"
    Image.fromarray(init_image(64, 96)).save(start)
    out = tmp_path / "out.png"
    code = main(["a boat", "--init-image", str(start), "--strength", "0.7", "--steps", "3", "--seed", "5", "-o", str(out), "--url", server.grpc_url])
    assert code == 0
    made = Image.open(out)
    assert made.size == (96, 64) and made.text["strength"] == "0.7"
    assert main(["a boat", "--strength", "0.7", "--url", server.grpc_url]) == 2  # --strength alone


def test_the_streaming_model_runs_image_to_image_as_the_ensemble(grpc):
    image = init_image(64, 96, seed=5)
    seen = []
    streamed = grpc.stream("a paper boat", init_image=image, strength=0.5, seed=8, steps=STEPS, scheduler="pndm", on_progress=seen.append)
    plain = grpc.generate("a paper boat", init_image=image, strength=0.5, seed=8, steps=STEPS, scheduler="pndm")
    assert_same_image(streamed.image, plain.image, max_diff=0)
    assert streamed.parameters["strength"] == 0.5
    assert [p.total for p in seen][:1] == [STEPS // 2 + 1]  # PNDM's steps from the start step (one extra, as diffusers)


def test_image_to_image_with_deepcache_equals_deepcaches_helper(stages, img2img_pipeline):
    """CACHE_INTERVAL where the loop starts part way: the helper counts from the loop's first step too."""
    import torch

    from sd_backend.stages import DenoiseJob
    from tests.test_deepcache import deep_cache_helper

    text, encoder, unet = stages
    image = init_image(seed=6)
    params = encoder.check(image, seed=3, steps=STEPS, scheduler="pndm", strength=0.7, cache_interval=2)
    e = text(["a red fox"], [None])[0]
    ours = unet([DenoiseJob(params, e.prompt_embeds, e.negative_embeds, init_moments=encoder([image])[0])])[0]
    with deep_cache_helper(img2img_pipeline, 2):
        expected = reference(img2img_pipeline, image, "a red fox", seed=3, strength=0.7, scheduler="pndm", output_type="latent")
    assert torch.equal(ours, expected), (ours - expected).abs().max()
