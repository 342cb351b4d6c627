"""GUIDANCE_CUTOFF (issue 16): classifier-free guidance stops after a fraction of the steps,
per request, opt-in. Served images equal diffusers' pipeline with its SDCFGCutoffCallback
(cutoff_step_ratio) on the same weights and seed, to the bit; left out, nothing changes."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import reference_image
from tests.servers import is_invalid_arg
from tests.utils import assert_same_image

STEPS = 6


def cutoff_reference(pipe, prompt, *, seed, cutoff, scheduler, guidance=7.5):
    import torch
    from diffusers.callbacks import SDCFGCutoffCallback

    from sd_backend.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    out = pipe(
        prompt, num_inference_steps=STEPS, guidance_scale=guidance, height=64, width=64,
        generator=torch.Generator().manual_seed(seed), output_type="np",
        callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=cutoff), callback_on_step_end_tensor_inputs=["prompt_embeds"],
    ).images[0]
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("scheduler, cutoff", [("pndm", 0.5), ("euler_a", 0.3), ("ddim", 0.0), ("dpmpp_2m", 0.8)])
def test_guidance_cutoff_matches_diffusers_callback(grpc, reference_pipeline, scheduler, cutoff):
    result = grpc.generate("a red fox", seed=12, steps=STEPS, scheduler=scheduler, guidance_cutoff=cutoff)
    expected = cutoff_reference(reference_pipeline, "a red fox", seed=12, cutoff=cutoff, scheduler=scheduler)
    assert_same_image(result.image, expected, max_diff=0)
    assert result.parameters["guidance_cutoff"] == pytest.approx(cutoff)
    full = reference_image(reference_pipeline, "a red fox", seed=12, steps=STEPS, guidance=7.5, scheduler=scheduler)
    assert not np.array_equal(result.image, full)  # the cutoff really changed the loop


def test_left_out_or_one_it_changes_nothing(grpc, reference_pipeline):
    plain = grpc.generate("a red fox", seed=13, steps=STEPS, scheduler="pndm")
    one = grpc.generate("a red fox", seed=13, steps=STEPS, scheduler="pndm", guidance_cutoff=1.0)
    expected = reference_image(reference_pipeline, "a red fox", seed=13, steps=STEPS, guidance=7.5, scheduler="pndm")
    assert_same_image(plain.image, expected, max_diff=0)
    assert_same_image(one.image, expected, max_diff=0)
    assert plain.parameters["guidance_cutoff"] == 1.0


def test_the_streaming_path_cuts_guidance_off_alike(grpc):
    streamed = grpc.stream("a blue boat", seed=3, steps=STEPS, scheduler="euler", guidance_cutoff=0.5)
    assert_same_image(streamed.image, grpc.generate("a blue boat", seed=3, steps=STEPS, scheduler="euler", guidance_cutoff=0.5).image, max_diff=0)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_bad_cutoffs_name_the_field(grpc, value):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        grpc.generate("a cat", seed=1, steps=2, guidance_cutoff=value)
    assert is_invalid_arg(info.value) and "GUIDANCE_CUTOFF" in info.value.message(), info.value.message()


def test_requests_with_other_cutoffs_are_other_groups():
    from sd_backend.config import DeploymentConfig
    from sd_backend.family import ModelFamily
    from sd_backend.params import check_params

    family, config = ModelFamily("sd1", 64, "epsilon"), DeploymentConfig()
    key = lambda **raw: check_params(config, family, seed=1, steps=10, **raw).group_key()  # noqa: E731
    assert key() == key(guidance_cutoff=1.0) != key(guidance_cutoff=0.5)
    assert key(guidance=1.0) == key(guidance=1.0, guidance_cutoff=0.5)  # nothing to cut without guidance
    assert check_params(config, family, guidance_cutoff=np.float32(0.7).item()).guidance_cutoff == 0.7  # FP32 on the wire
