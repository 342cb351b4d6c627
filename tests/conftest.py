"""Shared fixtures: the offline tiny model, diffusers' own pipeline on it, and a real
tritonserver process serving the model repository."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import sd_backend  # noqa: F401  (its finder maps sd_client to a checkout's folder)

warnings.filterwarnings("ignore", message=".*torchvision.*")

# Without CUDA the kernel and fast-path tests run the Triton kernels under its interpreter.
# TRITON_INTERPRET must be set before triton is imported: @triton.jit reads it when a kernel
# is defined. The served tests never import triton (their models run eagerly on the CPU).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # Triton's interpreter (3.6) turns 1-element arrays into Python ints the way NumPy 1.25 deprecated
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0:DeprecationWarning")


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
    from tests.servers import running_server

    with running_server(cache_dir, tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def grpc(server):
    """An SDClient of the shared server over gRPC."""
    from tests.servers import client

    c = client(server.grpc_url)
    yield c
    c.close()
