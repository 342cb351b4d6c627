"""ToMe (token merging, tomesd 0.1.3) on the `triton` level on a GPU.

tomesd swaps each BasicTransformerBlock's class for a ToMeBlock whose forward merges the
self-attention's tokens and unmerges its output; the modules it calls (norms, attention
processor, feed-forward) are still the fast path's, its merge has static shapes (the number
merged is a Python int of the token count and the ratio) and no host syncs, and the step
constants' tables (time embedding, cross-attention keys and values of the text) do not
depend on the image tokens. So a whole-loop graph captured with ToMe on gives what the eager
loop with ToMe gives: with the step constants (exact mode) and with DeepCache and a guidance
cutoff. Skips without CUDA or tomesd.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
tomesd = pytest.importorskip("tomesd")

from sd_backend.config import DeploymentConfig, FastPathOptions  # noqa: E402
from sd_backend.stages import DenoiseJob, UNetStage  # noqa: E402

STEPS, SIZE, RATIO = 10, 128, 0.5  # 128 px: 16 x 16 latents, 256 tokens in the top-level blocks
SETTINGS = [{}, dict(cache_interval=3), dict(cache_interval=2, guidance_cutoff=0.5)]


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def stage(cache_dir):
    from sd_backend.offline import write_offline_model

    model_dir = write_offline_model("tiny", cache_dir / "tiny")
    config = DeploymentConfig(model=str(model_dir), opt_level="triton", fast_path=FastPathOptions(), batch_buckets=(1, 4))
    stage = UNetStage.from_config(config, capture=False)
    tomesd.apply_patch(stage.unet, ratio=RATIO, use_rand=False)
    # tomesd reads the latent size from a pre-hook on the UNet's forward, which DeepCache's steps never call
    stage.unet._tome_info["size"] = (SIZE // stage.vae_scale, SIZE // stage.vae_scale)
    for setting in SETTINGS:
        stage.graphs.capture(stage.check(seed=0, steps=STEPS, height=SIZE, width=SIZE, **setting), (1, 4))
    yield stage
    tomesd.remove_patch(stage.unet)


def _jobs(stage, seeds, **setting):
    hidden = stage.unet.config.cross_attention_dim
    jobs = []
    for s in seeds:
        gen = torch.Generator().manual_seed(s)
        params = stage.check(seed=s, steps=STEPS, height=SIZE, width=SIZE, **setting)
        jobs.append(DenoiseJob(params, *[torch.randn(77, hidden, generator=gen) for _ in range(2)]))
    return jobs


def _eager(stage, jobs, ratio=RATIO):
    """The eager loop (graphs set aside) at ToMe `ratio` (0: tomesd merges nothing)."""
    graphs, stage.graphs = stage.graphs, None
    args = stage.unet._tome_info["args"]
    saved, args["ratio"] = args["ratio"], ratio
    try:
        return stage.run_group(jobs)
    finally:
        stage.graphs, args["ratio"] = graphs, saved


@pytest.mark.parametrize("setting", SETTINGS, ids=["exact", "deepcache", "deepcache-cutoff"])
def test_tome_graph_loop_matches_eager_loop(stage, setting):
    jobs = _jobs(stage, [11, 12, 13], **setting)  # 3 in the bucket of 4
    loop = stage.graphs.find(jobs[0].params, 3)
    assert loop is not None
    assert loop.hoist == (not setting), "exact mode should run with the step constants"
    graphed = torch.cat(stage(jobs))
    eager = _eager(stage, jobs)
    assert torch.isfinite(graphed).all()
    assert rel_l2(graphed, eager) < 2e-2, rel_l2(graphed, eager)
    assert rel_l2(eager, _eager(stage, jobs, ratio=0.0)) > 1e-3  # ToMe really changed the loop
