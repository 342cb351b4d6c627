"""Model families beyond SD 1.x, read from the model directory itself: SD 2.x (v-prediction,
linear projections; `tiny-v` offline) served by a real tritonserver, its images equal to
diffusers' StableDiffusionPipeline on the same weights, seed and scheduler, to the bit."""

from __future__ import annotations

import numpy as np
import pytest

from sd_backend.config import SCHEDULER_NAMES
from tests.servers import client, running_server
from tests.utils import assert_same_image


@pytest.fixture(scope="module")
def tiny_v_dir(cache_dir):
    from sd_backend.offline import write_offline_model

    return write_offline_model("tiny-v", cache_dir / "tiny-v")


@pytest.fixture(scope="module")
def tiny_v(cache_dir, tiny_v_dir, tmp_path_factory):
    with running_server(cache_dir, tmp_path_factory.mktemp("tiny-v"), env={"SD_MODEL": "tiny-v"}) as server:
        c = client(server.grpc_url)
        yield c
        c.close()


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
    assert loading.native_size(str(tmp_path)) == 768
    unet = json.loads((tmp_path / "unet" / "config.json").read_text())
    heads = unet["attention_head_dim"]
    assert [width // count for width, count in zip(unet["block_out_channels"], heads)] == [64, 64, 64, 64]
    assert unet["use_linear_projection"] and unet["cross_attention_dim"] == 1024
    scheduler = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
