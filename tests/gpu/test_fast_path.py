"""The `triton` optimization level on a GPU: whole-loop CUDA graphs give what the eager
loop gives, for every scheduler, alone and padded into a larger bucket. Skips without CUDA."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from sd_backend.config import SCHEDULER_NAMES, DeploymentConfig  # noqa: E402
from sd_backend.stages import DenoiseJob, UNetStage, denoise, make_scheduler, prepare_latents  # noqa: E402

STEPS = 10


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module", params=["", "attention,group_norm,layer_norm,geglu"], ids=["graphs", "kernels"])
def stage(request, tiny_dir):
    config = DeploymentConfig(model=str(tiny_dir), opt_level="triton", kernels=request.param, batch_buckets=(1, 4))
    stage = UNetStage.from_config(config)
    for name in SCHEDULER_NAMES:
        stage.graphs.capture(stage.check(seed=0, steps=STEPS, scheduler=name), (1, 4))
    return stage


def _jobs(stage, scheduler, seeds, guidance=7.5):
    hidden = stage.unet.config.cross_attention_dim
    jobs = []
    for s in seeds:
        gen = torch.Generator().manual_seed(s)  # the prompt embeddings belong to the seed too
        params = stage.check(seed=s, steps=STEPS, scheduler=scheduler, guidance=guidance)
        jobs.append(DenoiseJob(params, torch.randn(77, hidden, generator=gen), torch.randn(77, hidden, generator=gen)))
    return jobs


def _eager(stage, jobs):
    params = [j.params for j in jobs]
    scheduler = make_scheduler(params[0].scheduler, stage.scheduler_config)
    scheduler.set_timesteps(params[0].steps, device=stage.device)
    latents, generators = prepare_latents(
        params, stage.unet.config.in_channels, stage.vae_scale, stage.device, stage.dtype, scheduler.init_noise_sigma
    )
    embeds = torch.stack([j.prompt_embeds for j in jobs]).to(stage.device, stage.dtype)
    negatives = torch.stack([j.negative_embeds for j in jobs]).to(stage.device, stage.dtype)
    guidance = torch.tensor([p.guidance for p in params], device=stage.device).view(-1, 1, 1, 1)
    return denoise(stage.unet, scheduler, latents, torch.cat([negatives, embeds]), guidance, generators)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_graph_loop_matches_eager_loop(stage, scheduler):
    jobs = _jobs(stage, scheduler, [11])
    assert stage.graphs.find(jobs[0].params, 1) is not None
    graphed = stage(jobs)[0]
    eager = _eager(stage, jobs)
    assert torch.isfinite(graphed).all()
    assert rel_l2(graphed, eager) < 2e-2, rel_l2(graphed, eager)


@pytest.mark.parametrize("scheduler", ["pndm", "euler_a"])
def test_padded_bucket_gives_each_seed_its_image(stage, scheduler):
    alone = stage(_jobs(stage, scheduler, [5]))[0]
    batch = stage(_jobs(stage, scheduler, [7, 5, 9]))  # 3 images in the bucket of 4
    assert rel_l2(batch[1], alone) < 2e-2
    assert rel_l2(batch[0], alone) > 0.1  # another seed really is another image
