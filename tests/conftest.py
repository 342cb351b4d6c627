"""Shared fixtures: the offline tiny model, diffusers' own pipeline on it, and a real
tritonserver process serving the model repository."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sd-cache")


@pytest.fixture(scope="session")
def tiny_dir(cache_dir) -> Path:
    from sd_backend.offline import write_offline_model

    return write_offline_model("tiny", cache_dir / "tiny")


@pytest.fixture(scope="session")
def reference_pipeline(tiny_dir):
    """diffusers.StableDiffusionPipeline on the very weights the server loads."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_image(pipe, prompt, *, seed, steps, guidance, scheduler, negative=None, height=64, width=64):
    """What diffusers makes of these parameters, as uint8 (height, width, 3)."""
    import torch
    from sd_backend.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    out = pipe(
        prompt,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images[0]
    return (out * 255).round().astype(np.uint8)


@pytest.fixture(scope="session")
def server(cache_dir, tiny_dir, tmp_path_factory):
    """A real tritonserver on free loopback ports, serving the tiny model."""
    from sd_backend.demo import free_port
    from sd_backend.launcher import ServerOptions, TritonServer

    log = tmp_path_factory.mktemp("server") / "tritonserver.log"
    options = ServerOptions(
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        env={"SD_MODEL": "tiny", "SD_CACHE_DIR": str(cache_dir)},
    )
    srv = TritonServer(options, log_path=log).start_ready(300)
    yield srv
    srv.stop()
    if os.environ.get("SD_TEST_SHOW_LOG"):
        print(log.read_text())
