"""Model families beyond SD 1.x, read from the model directory itself: SD 2.x (v-prediction,
linear projections; `tiny-v` offline) and SDXL (two text encoders, pooled embedding, time
ids; `tiny-xl` offline) served by a real tritonserver, their images equal to diffusers'
StableDiffusionPipeline and StableDiffusionXLPipeline on the same weights, seed and
scheduler, to the bit."""

from __future__ import annotations

import numpy as np
import pytest

from sd_backend.config import SCHEDULER_NAMES
from tests.servers import client, running_server
from tests.utils import assert_same_image


def _offline(cache_dir, name: str):
    from sd_backend.offline import write_offline_model

    return write_offline_model(name, cache_dir / name)


def _serving(cache_dir, tmp_path_factory, name: str):
    """A gRPC client of a real tritonserver serving offline model `name` (for a fixture to yield from)."""
    with running_server(cache_dir, tmp_path_factory.mktemp(name), env={"SD_MODEL": name}) as server:
        c = client(server.grpc_url)
        yield c
        c.close()


@pytest.fixture(scope="module")
def tiny_v_dir(cache_dir):
    return _offline(cache_dir, "tiny-v")


@pytest.fixture(scope="module")
def tiny_v(cache_dir, tiny_v_dir, tmp_path_factory):
    yield from _serving(cache_dir, tmp_path_factory, "tiny-v")


@pytest.fixture(scope="module")
def tiny_v_pipeline(tiny_v_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_v_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    return pipe


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_v_prediction_images_match_diffusers(tiny_v, tiny_v_pipeline, scheduler):
    import torch

    from sd_backend.schedulers import make_scheduler

    result = tiny_v.generate("a watercolor fox", negative_prompt="blurry", seed=21, steps=6, guidance_scale=7.5, scheduler=scheduler)
    tiny_v_pipeline.scheduler = make_scheduler(scheduler, dict(tiny_v_pipeline.scheduler.config))
    expected = tiny_v_pipeline(
        "a watercolor fox", negative_prompt="blurry", num_inference_steps=6, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(21), output_type="np",
    ).images[0]
    assert result.image.shape == expected.shape == (64, 64, 3)  # the model's own size: its UNet and VAE say 64
    assert_same_image(result.image, (expected * 255).round().astype(np.uint8), max_diff=0)
    assert result.parameters["model"] == "tiny-v"


def test_sd21_native_size_and_prediction_come_from_its_files(tmp_path):
    """sd21-random's configs, written without weights: 768x768, v-prediction, head_dim 64."""
    import json

    from sd_backend import loading
    from sd_backend.checkpoints import _write_configs

    _write_configs("sd21-random", tmp_path)
    assert loading.family(str(tmp_path)).native_size == 768
    unet = json.loads((tmp_path / "unet" / "config.json").read_text())
    heads = unet["attention_head_dim"]
    assert [width // count for width, count in zip(unet["block_out_channels"], heads)] == [64, 64, 64, 64]
    assert unet["use_linear_projection"] and unet["cross_attention_dim"] == 1024
    scheduler = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


@pytest.fixture(scope="module")
def tiny_xl_dir(cache_dir):
    return _offline(cache_dir, "tiny-xl")


@pytest.fixture(scope="module")
def tiny_xl(cache_dir, tiny_xl_dir, tmp_path_factory):
    yield from _serving(cache_dir, tmp_path_factory, "tiny-xl")


@pytest.fixture(scope="module")
def tiny_xl_pipeline(tiny_xl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_xl_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_reference(pipe, scheduler: str, prompt: str, negative, seed: int, steps: int, guidance: float):
    import torch

    from sd_backend.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    image = pipe(
        prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_sdxl_images_match_diffusers(tiny_xl, tiny_xl_pipeline, scheduler):
    guidance = 1.0 if scheduler == "lcm" else 5.0  # few-step: no unconditional branch
    result = tiny_xl.generate("a watercolor fox", negative_prompt="blurry", seed=8, steps=4, guidance_scale=guidance, scheduler=scheduler)
    expected = _sdxl_reference(tiny_xl_pipeline, scheduler, "a watercolor fox", "blurry", 8, 4, guidance)
    assert result.image.shape == expected.shape == (64, 64, 3)
    assert_same_image(result.image, expected, max_diff=0)


def test_sdxl_without_a_negative_prompt_is_diffusers_zeros_and_defaults_come_from_the_model(tiny_xl, tiny_xl_pipeline):
    """No NEGATIVE_PROMPT is SDXL's force_zeros_for_empty_prompt (zeros, not the embedding of
    ""); size and scheduler default to the model's own (its UNet/VAE: 64; its config: Euler)."""
    result = tiny_xl.generate("a lighthouse at night", seed=5, steps=4, guidance_scale=5.0)
    assert (result.parameters["height"], result.parameters["width"], result.parameters["scheduler"]) == (64, 64, "euler")
    assert result.parameters["model"] == "tiny-xl"
    expected = _sdxl_reference(tiny_xl_pipeline, "euler", "a lighthouse at night", None, 5, 4, 5.0)
    assert_same_image(result.image, expected, max_diff=0)
    empty = tiny_xl.generate("a lighthouse at night", negative_prompt="", seed=5, steps=4, guidance_scale=5.0)
    assert_same_image(empty.image, _sdxl_reference(tiny_xl_pipeline, "euler", "a lighthouse at night", "", 5, 4, 5.0), max_diff=0)
    assert not np.array_equal(empty.image, result.image)  # the two are different requests


def test_sdxl_batched_requests_each_get_their_own_image(tiny_xl, tiny_xl_pipeline):
    """Concurrent requests batch in the UNet (pooled embeddings and time ids stacked by row).
    Against diffusers run alone: a batch's GEMMs round differently (tests/utils.MAX_PIXEL_DIFF)."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = ["a red cube", "a blue sphere", "a green cone"]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda i: tiny_xl.generate(prompts[i], seed=30 + i, steps=3, guidance_scale=5.0), range(3)))
    for i, result in enumerate(results):
        assert_same_image(result.image, _sdxl_reference(tiny_xl_pipeline, "euler", prompts[i], None, 30 + i, 3, 5.0))


def test_sdxl_streams_the_ensembles_image(tiny_xl):
    seen = []
    streamed = tiny_xl.stream("a paper boat", seed=2, steps=3, guidance_scale=5.0, on_progress=seen.append)
    assert_same_image(streamed.image, tiny_xl.generate("a paper boat", seed=2, steps=3, guidance_scale=5.0).image, max_diff=0)
    assert len(seen) >= 3


def test_sdxl_family_is_read_from_its_files(tiny_xl_dir, tmp_path):
    import json
    import shutil

    from sd_backend.family import read_family

    family = read_family(str(tiny_xl_dir))
    assert (family.name, family.native_size, family.pooled_dim, family.zero_negative, family.scheduler) == ("sdxl", 64, 32, True, "euler")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_xl_dir, broken)
    config = json.loads((broken / "text_encoder_2" / "config.json").read_text())
    (broken / "text_encoder_2" / "config.json").write_text(json.dumps(config | {"projection_dim": 16}))
    with pytest.raises(ValueError, match="text_encoder_2 projects to 16 but the UNet's add_embedding expects a pooled embedding of 32"):
        read_family(str(broken))


def test_sdxl_guidance_cutoff_matches_diffusers_callback(tiny_xl, tiny_xl_pipeline):
    """GUIDANCE_CUTOFF on SDXL drops the unconditional rows of the embeddings, the pooled
    embeddings and the time ids alike: diffusers' SDXLCFGCutoffCallback."""
    import torch
    from diffusers.callbacks import SDXLCFGCutoffCallback

    from sd_backend.schedulers import make_scheduler

    result = tiny_xl.generate("a watercolor fox", seed=6, steps=4, guidance_scale=5.0, scheduler="euler", guidance_cutoff=0.5)
    tiny_xl_pipeline.scheduler = make_scheduler("euler", dict(tiny_xl_pipeline.scheduler.config))
    expected = tiny_xl_pipeline(
        "a watercolor fox", num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(6), output_type="np",
        callback_on_step_end=SDXLCFGCutoffCallback(cutoff_step_ratio=0.5),
        callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds", "add_time_ids"],
    ).images[0]
    assert_same_image(result.image, (expected * 255).round().astype(np.uint8), max_diff=0)


def test_sdxl_deepcache_with_a_guidance_cutoff_matches_deepcaches_helper(tiny_xl, tiny_xl_pipeline):
    """CACHE_INTERVAL on SDXL (its added embeddings at the cached steps too), with and without
    GUIDANCE_CUTOFF: DeepCache's DeepCacheSDHelper on diffusers' SDXL pipeline."""
    import torch

    from sd_backend.schedulers import make_scheduler
    from tests.test_deepcache import cutoff_with_cache, deep_cache_helper

    tiny_xl_pipeline.scheduler = make_scheduler("euler", dict(tiny_xl_pipeline.scheduler.config))
    for cutoff in (None, 0.5):
        result = tiny_xl.generate("a watercolor fox", seed=6, steps=6, guidance_scale=5.0, scheduler="euler", cache_interval=3, guidance_cutoff=cutoff)
        with deep_cache_helper(tiny_xl_pipeline, 3) as helper:
            extra = cutoff_with_cache(helper, cutoff, sdxl=True) if cutoff is not None else {}
            expected = tiny_xl_pipeline(
                "a watercolor fox", num_inference_steps=6, guidance_scale=5.0, generator=torch.Generator().manual_seed(6),
                output_type="np", **extra,
            ).images[0]
        assert_same_image(result.image, (expected * 255).round().astype(np.uint8), max_diff=0)


def test_sdxl_image_to_image_matches_diffusers(tiny_xl, tiny_xl_dir):
    """StableDiffusionXLImg2ImgPipeline on the same weights: its final latents to the bit (the
    stages in one process), the served image within one level (tests/test_img2img.py says why)."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from PIL import Image

    from sd_backend.config import DeploymentConfig
    from sd_backend.schedulers import make_scheduler
    from sd_backend.stages import DenoiseJob, TextEncoderStage, UNetStage, VAEEncoderStage
    from tests.test_img2img import init_image

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(str(tiny_xl_dir))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("euler", dict(pipe.scheduler.config))
    image = init_image(seed=7)

    def theirs(output_type):
        return pipe(
            "a watercolor fox", image=Image.fromarray(image), strength=0.6, num_inference_steps=5, guidance_scale=5.0,
            generator=torch.Generator().manual_seed(3), output_type=output_type,
        ).images

    config = DeploymentConfig(model=str(tiny_xl_dir), device="cpu")
    text, encoder, unet = (stage.from_config(config) for stage in (TextEncoderStage, VAEEncoderStage, UNetStage))
    e = text(["a watercolor fox"], [None])[0]
    params = encoder.check(image, seed=3, steps=5, guidance=5.0, scheduler="euler", strength=0.6)
    latents = unet([DenoiseJob(params, e.prompt_embeds, e.negative_embeds, e.pooled, e.negative_pooled, init_moments=encoder([image])[0])])[0]
    assert (latents == theirs("latent")).all()
    served = tiny_xl.generate("a watercolor fox", init_image=image, strength=0.6, seed=3, steps=5, guidance_scale=5.0, scheduler="euler")
    assert_same_image(served.image, (theirs("np")[0] * 255).round().astype(np.uint8))
