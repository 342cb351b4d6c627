"""CACHE_INTERVAL (issue 16): DeepCache per request, opt-in. Served images equal the DeepCache
package's own DeepCacheSDHelper (PyPI `DeepCache` 0.1.1, which runs with the pinned diffusers)
on diffusers' pipeline, same weights, seed, interval and branch, to the bit; with a guidance
cutoff too, the helper's cache keeping its conditional half as ours does; left out, nothing
changes."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from tests.conftest import reference_image
from tests.servers import is_invalid_arg
from tests.utils import assert_same_image

STEPS = 6


@contextlib.contextmanager
def deep_cache_helper(pipe, interval: int, branch: int = 0):
    """DeepCache's own helper on `pipe` for one call."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    try:
        yield helper
    finally:
        helper.disable()


def cutoff_with_cache(helper, cutoff: float, sdxl: bool = False):
    """diffusers' CFG cutoff callback that also keeps the conditional half of the helper's
    cached block outputs (negatives come first), as the served loop keeps its cache."""
    from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback

    def halves(value):
        if isinstance(value, tuple):
            return tuple(halves(v) for v in value)
        return value[value.shape[0] // 2 :]

    class KeepCache(SDXLCFGCutoffCallback if sdxl else SDCFGCutoffCallback):
        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            if step_index == int(pipeline.num_timesteps * self.config.cutoff_step_ratio):
                helper.cached_output = {key: halves(value) for key, value in helper.cached_output.items()}
            return super().callback_fn(pipeline, step_index, timestep, callback_kwargs)

    callback = KeepCache(cutoff_step_ratio=cutoff)
    return dict(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=callback.tensor_inputs)


def deepcache_reference(pipe, prompt, *, seed, interval, scheduler, cutoff=None, branch=0, steps=STEPS, guidance=7.5, output_type="np"):
    import torch

    from sd_backend.schedulers import make_scheduler

    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    with deep_cache_helper(pipe, interval, branch) as helper:
        extra = cutoff_with_cache(helper, cutoff) if cutoff is not None else {}
        out = pipe(
            prompt, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
            generator=torch.Generator().manual_seed(seed), output_type=output_type, **extra,
        ).images
    return out if output_type == "latent" else (out[0] * 255).round().astype(np.uint8)


@pytest.mark.parametrize("scheduler, interval", [("pndm", 3), ("ddim", 2), ("euler_a", 3), ("dpmpp_2m", 4)])
def test_cache_interval_matches_deepcaches_helper(grpc, reference_pipeline, scheduler, interval):
    result = grpc.generate("a red fox", seed=12, steps=STEPS, scheduler=scheduler, cache_interval=interval)
    expected = deepcache_reference(reference_pipeline, "a red fox", seed=12, interval=interval, scheduler=scheduler)
    assert_same_image(result.image, expected, max_diff=0)
    assert result.parameters["cache_interval"] == interval
    full = reference_image(reference_pipeline, "a red fox", seed=12, steps=STEPS, guidance=7.5, scheduler=scheduler)
    assert not np.array_equal(result.image, full)  # the cache really skipped work


def test_with_a_guidance_cutoff_the_cache_keeps_its_conditional_half(grpc, reference_pipeline):
    result = grpc.generate("a red fox", seed=4, steps=STEPS, scheduler="pndm", cache_interval=3, guidance_cutoff=0.4)
    expected = deepcache_reference(reference_pipeline, "a red fox", seed=4, interval=3, scheduler="pndm", cutoff=0.4)
    assert_same_image(result.image, expected, max_diff=0)


def test_left_out_or_one_it_changes_nothing(grpc, reference_pipeline):
    plain = grpc.generate("a red fox", seed=13, steps=STEPS, scheduler="euler")
    one = grpc.generate("a red fox", seed=13, steps=STEPS, scheduler="euler", cache_interval=1)
    expected = reference_image(reference_pipeline, "a red fox", seed=13, steps=STEPS, guidance=7.5, scheduler="euler")
    assert_same_image(plain.image, expected, max_diff=0)
    assert_same_image(one.image, expected, max_diff=0)
    assert plain.parameters["cache_interval"] == 1


def test_the_streaming_path_caches_alike(grpc):
    streamed = grpc.stream("a blue boat", seed=3, steps=STEPS, scheduler="ddim", cache_interval=2)
    assert_same_image(streamed.image, grpc.generate("a blue boat", seed=3, steps=STEPS, scheduler="ddim", cache_interval=2).image, max_diff=0)


@pytest.mark.parametrize("value", [0, -1, 3])
def test_bad_intervals_name_the_field(grpc, value):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        grpc.generate("a cat", seed=1, steps=2, cache_interval=value)  # 3: above the 2 steps
    assert is_invalid_arg(info.value) and "CACHE_INTERVAL" in info.value.message(), info.value.message()


def test_the_deeper_branch_matches_the_helper_in_process(tiny_dir, reference_pipeline):
    """cache_branch (a deployment setting) 1: the first down pair runs at cached steps too."""
    import torch

    from sd_backend.config import DeploymentConfig
    from sd_backend.engine import Engine

    engine = Engine(DeploymentConfig(model=str(tiny_dir), cache_branch=1))
    ours = engine.latents(["a red fox"], seed=21, steps=STEPS, scheduler="pndm", cache_interval=3)[0]
    expected = deepcache_reference(reference_pipeline, "a red fox", seed=21, interval=3, scheduler="pndm", branch=1, output_type="latent")
    assert torch.equal(ours, expected)
    # branch 0 is another computation
    assert not torch.equal(ours, deepcache_reference(reference_pipeline, "a red fox", seed=21, interval=3, scheduler="pndm", output_type="latent"))


def test_a_branch_outside_the_unet_fails_the_load(tiny_dir):
    from sd_backend.config import DeploymentConfig
    from sd_backend.stages import UNetStage

    with pytest.raises(ValueError, match="cache_branch: 9"):
        UNetStage.from_config(DeploymentConfig(model=str(tiny_dir), cache_branch=9))


def test_requests_with_other_intervals_are_other_groups():
    from sd_backend.config import DeploymentConfig
    from sd_backend.family import ModelFamily
    from sd_backend.params import check_params

    family = ModelFamily("sd1", 64, "epsilon")
    key = lambda config=DeploymentConfig(), **raw: check_params(config, family, seed=1, steps=10, **raw).group_key()  # noqa: E731
    assert key() == key(cache_interval=1) != key(cache_interval=3)
    # a deployment default above a request's steps caches the whole short loop after its first step
    assert check_params(DeploymentConfig(default_cache_interval=5), family, steps=2).cache_interval == 2
    with pytest.raises(ValueError, match="CACHE_INTERVAL: 1.5 is not an integer"):
        check_params(DeploymentConfig(), family, steps=4, cache_interval=1.5)
