"""The `triton` optimization level on a GPU: whole-loop CUDA graphs give what the eager
loop gives, for every scheduler, alone and padded into a larger bucket. Skips without CUDA."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from sd_backend.config import SCHEDULER_NAMES, DeploymentConfig, FastPathOptions  # noqa: E402
from sd_backend.stages import DenoiseJob, UNetStage  # noqa: E402

STEPS = 10


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(
    scope="module",
    params=[("tiny", ()), ("tiny", FastPathOptions().kernels), ("tiny-xl", FastPathOptions().kernels)],
    ids=["graphs", "kernels", "sdxl-kernels"],
)
def stage(request, cache_dir):
    from sd_backend.offline import write_offline_model

    model, kernels = request.param
    options = FastPathOptions(kernels=kernels)
    model_dir = write_offline_model(model, cache_dir / model)
    config = DeploymentConfig(model=str(model_dir), opt_level="triton", fast_path=options, batch_buckets=(1, 4))
    stage = UNetStage.from_config(config)
    for name in SCHEDULER_NAMES:
        stage.graphs.capture(stage.check(seed=0, steps=STEPS, scheduler=name), (1, 4))
    for scheduler, skipping in SKIPPING:
        stage.graphs.capture(stage.check(seed=0, steps=STEPS, scheduler=scheduler, **skipping), (1, 4))
    for scheduler, strength in IMAGE_TO_IMAGE:
        stage.graphs.capture(stage.check(seed=0, steps=STEPS, scheduler=scheduler, strength=strength), (1, 4))
    return stage


# image-to-image captured per start step: (scheduler, strength)
IMAGE_TO_IMAGE = [("pndm", 0.6), ("euler_a", 0.5), ("dpmpp_2m", 0.8)]


# computation skipping (opt-in) captured like any other key: DeepCache alone and with a guidance cutoff
SKIPPING = [("pndm", dict(cache_interval=3)), ("euler_a", dict(cache_interval=2, guidance_cutoff=0.5))]


def _jobs(stage, scheduler, seeds, guidance=7.5, **skipping):
    hidden = stage.unet.config.cross_attention_dim
    jobs = []
    for s in seeds:
        gen = torch.Generator().manual_seed(s)  # the prompt embeddings belong to the seed too
        params = stage.check(seed=s, steps=STEPS, scheduler=scheduler, guidance=guidance, **skipping)
        embeds = [torch.randn(77, hidden, generator=gen) for _ in range(2)]
        pooled = [torch.randn(stage.family.pooled_dim, generator=gen) for _ in range(2)] if stage.family.is_sdxl else []
        jobs.append(DenoiseJob(params, *embeds, *pooled))
    return jobs


def _eager(stage, jobs):
    """The same stage with its graphs set aside: the eager loop."""
    graphs, stage.graphs = stage.graphs, None
    try:
        return stage.run_group(jobs)
    finally:
        stage.graphs = graphs


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_graph_loop_matches_eager_loop(stage, scheduler):
    jobs = _jobs(stage, scheduler, [11])
    assert stage.graphs.find(jobs[0].params, 1) is not None
    graphed = stage(jobs)[0]
    eager = _eager(stage, jobs)
    assert torch.isfinite(graphed).all()
    assert rel_l2(graphed, eager) < 2e-2, rel_l2(graphed, eager)


@pytest.mark.parametrize("scheduler, skipping", SKIPPING)
def test_graph_loop_with_computation_skipping_matches_eager_loop(stage, scheduler, skipping):
    jobs = _jobs(stage, scheduler, [11, 12, 13], **skipping)  # 3 in the bucket of 4
    assert stage.graphs.find(jobs[0].params, 3) is not None
    graphed = torch.cat(stage(jobs))
    eager = _eager(stage, jobs)
    exact = _eager(stage, _jobs(stage, scheduler, [11, 12, 13]))
    assert torch.isfinite(graphed).all()
    assert rel_l2(graphed, eager) < 2e-2, rel_l2(graphed, eager)
    assert rel_l2(eager, exact) > 1e-3  # the skipping really changed the loop


@pytest.mark.parametrize("scheduler, strength", IMAGE_TO_IMAGE)
def test_image_to_image_replays_a_loop_captured_for_its_start_step(stage, scheduler, strength):
    jobs = _jobs(stage, scheduler, [21, 22], strength=strength)  # 2 in the bucket of 4
    side = stage.family.native_size // stage.vae_scale
    for job in jobs:  # an image's latent distribution: means, then log-variances
        gen = torch.Generator().manual_seed(job.params.seed + 100)
        channels = stage.family.latent_channels
        job.init_moments = torch.cat([torch.randn(channels, side, side, generator=gen), torch.full((channels, side, side), -6.0)])
    captured = stage.graphs.find(jobs[0].params, 2)
    assert captured is not None and len(captured.unet_timesteps) < STEPS + 1
    graphed = torch.cat(stage(jobs))
    eager = _eager(stage, jobs)
    assert torch.isfinite(graphed).all()
    assert rel_l2(graphed, eager) < 2e-2, rel_l2(graphed, eager)
    text_to_image = torch.cat(stage(_jobs(stage, scheduler, [21, 22])))
    assert rel_l2(graphed, text_to_image) > 0.1  # the image really was the start


@pytest.mark.parametrize("model", ["tiny-inpaint", "tiny"])
@pytest.mark.parametrize("scheduler, strength", [("pndm", 1.0), ("euler_a", 0.6)])
def test_inpainting_replays_captured_loops(cache_dir, model, scheduler, strength):
    """tiny-inpaint (9 input channels): the mask and the masked image's latents are static
    inputs of the captured loop; tiny (a plain UNet): the mask and the blend's table. Either's
    latents match the eager loop's."""
    from sd_backend.offline import write_offline_model

    model_dir = write_offline_model(model, cache_dir / model)
    stage = UNetStage.from_config(DeploymentConfig(model=str(model_dir), opt_level="triton", batch_buckets=(1, 4), default_steps=STEPS))
    stage.graphs.capture(stage.check(seed=0, scheduler=scheduler, strength=strength, inpaint=True), (1, 4))
    jobs = _jobs(stage, scheduler, [31, 32, 33], strength=strength, inpaint=True)
    side, channels = stage.family.native_size // stage.vae_scale, stage.family.latent_channels
    for job in jobs:
        gen = torch.Generator().manual_seed(job.params.seed + 100)
        job.init_moments, job.masked_moments = (
            torch.cat([torch.randn(channels, side, side, generator=gen), torch.full((channels, side, side), -6.0)]) for _ in range(2)
        )
        job.latent_mask = (torch.rand(1, side, side, generator=gen) > 0.5).float()
    assert stage.graphs.find(jobs[0].params, 3) is not None
    graphed = torch.cat(stage(jobs))
    eager = _eager(stage, jobs)
    assert torch.isfinite(graphed).all()
    assert rel_l2(graphed, eager) < 2e-2, rel_l2(graphed, eager)
    for job in jobs:
        job.latent_mask = 1 - job.latent_mask
    assert rel_l2(torch.cat(stage(jobs)), graphed) > 1e-2  # the mask is an input of the replay, not baked in


def test_a_restart_reuses_the_kernel_dispatch_decisions(cache_dir, tmp_path):
    """The second load on this machine decides every shape from the first one's file in
    cache_dir (sd_backend.fast.load_caches) and times none; its latents are the first's."""
    from sd_backend.offline import write_offline_model

    model_dir = write_offline_model("tiny", cache_dir / "tiny")
    config = DeploymentConfig(model=str(model_dir), opt_level="triton", batch_buckets=(1,), default_steps=STEPS, cache_dir=str(tmp_path))
    first = UNetStage.from_config(config)
    met = len(first.fast_path.timings())
    assert first.fast_path.reused == 0 and met > 0 and list((tmp_path / "dispatch").glob("unet-*.json"))
    second = UNetStage.from_config(config)
    assert second.fast_path.reused == met and second.fast_path.timings() == first.fast_path.timings()
    jobs = _jobs(first, "pndm", [41])
    assert torch.equal(first(jobs)[0], second(jobs)[0])


def test_image_to_image_strengths_are_captured_at_load(cache_dir):
    from sd_backend.offline import write_offline_model

    model_dir = write_offline_model("tiny", cache_dir / "tiny")
    options = FastPathOptions(image_to_image_strengths=(0.5,))
    stage = UNetStage.from_config(DeploymentConfig(model=str(model_dir), opt_level="triton", fast_path=options, batch_buckets=(1, 2), default_steps=STEPS))
    assert stage.graphs.find(stage.check(seed=1, strength=0.5), 2) is not None
    assert stage.graphs.find(stage.check(seed=1, strength=0.9), 1) is None  # another start step: the eager loop


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a"])
def test_padded_bucket_gives_each_seed_its_image(stage, scheduler):
    alone = stage(_jobs(stage, scheduler, [5]))[0]
    batch = stage(_jobs(stage, scheduler, [7, 5, 9]))  # 3 images in the bucket of 4
    assert rel_l2(batch[1], alone) < 2e-2
    assert rel_l2(batch[0], alone) > 0.1  # another seed really is another image


def test_deepspeed_level_matches_the_eager_loop(cache_dir):
    # DeepSpeed's diffusers kernels need SD-sized attention heads: on the tiny model's
    # 8-wide heads its attention fails with CUDA "invalid argument" (seen on an H200)
    pytest.importorskip("deepspeed")
    common = dict(model="sd15-random", cache_dir=str(cache_dir), dtype="float16", default_steps=STEPS, default_height=256, default_width=256)
    eager = UNetStage.from_config(DeploymentConfig(**common))
    injected = UNetStage.from_config(DeploymentConfig(**common, opt_level="deepspeed", batch_buckets=(1, 2)))
    assert injected.graphs.loops, "the default request was not captured"
    jobs = _jobs(injected, "pndm", [3, 4])
    got = torch.cat(injected(jobs))
    want = torch.cat(eager(jobs))
    assert torch.isfinite(got).all()
    assert rel_l2(got, want) < 2e-2, rel_l2(got, want)


def test_optimized_vae_matches_diffusers_vae(tiny_dir):
    """The `triton` level's VAE (channels-last, our GroupNorm and attention where dispatched)
    gives diffusers' images of the same latents, to a few uint8 levels."""
    from sd_backend.fast.modules.norms import TritonGroupNorm
    from sd_backend.stages import VAEStage

    common = dict(model=str(tiny_dir), batch_buckets=(1, 2))
    plain = VAEStage.from_config(DeploymentConfig(**common))
    fast = VAEStage.from_config(DeploymentConfig(**common, opt_level="triton"))
    assert any(isinstance(m, TritonGroupNorm) for m in fast.vae.modules())
    assert not any(isinstance(m, TritonGroupNorm) for m in plain.vae.modules())
    size = plain.vae.config.sample_size // 2 ** (len(plain.vae.config.block_out_channels) - 1)
    latents = [torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for got, want in zip(fast(latents), plain(latents), strict=True):
        diff = abs(got.astype(int) - want.astype(int))
        assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())
