"""Adapters chosen per request on the `triton` level: a switch rewrites the weights the
captured loops read (and the fast path's fused projection copies), so a replay after a
switch gives the latents of a deployment with that adapter fused at load, and switching
back gives the weights at load's. Skips without CUDA."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from sd_backend.config import DeploymentConfig  # noqa: E402
from sd_backend.stages import DenoiseJob, UNetStage  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def setup(cache_dir, tmp_path_factory):
    from sd_backend.offline import write_offline_lora, write_offline_model

    model_dir = write_offline_model("tiny", cache_dir / "tiny")
    folder = tmp_path_factory.mktemp("gpu-lora")
    files = (
        write_offline_lora(model_dir, folder / "a.safetensors", "diffusers", seed=1),
        write_offline_lora(model_dir, folder / "b.safetensors", "kohya", seed=2),
    )

    def stage(**settings):
        config = DeploymentConfig(model=str(model_dir), opt_level="triton", batch_buckets=(1, 2), default_steps=STEPS, **settings)
        built = UNetStage.from_config(config, capture=False)
        built.graphs.capture(built.check(seed=0), (1, 2))
        return built

    return files, stage


def _run(stage, seeds, **ask):
    hidden = stage.unet.config.cross_attention_dim
    jobs = []
    for s in seeds:
        gen = torch.Generator().manual_seed(s)
        params = stage.check(seed=s, **ask)
        assert stage.graphs.find(params, len(seeds)) is not None  # the captured loop runs it
        jobs.append(DenoiseJob(params, *(torch.randn(77, hidden, generator=gen).cuda().half() for _ in range(2))))
    return torch.cat(stage(jobs))


def test_a_switch_gives_the_fused_deployments_latents_and_back(setup):
    files, make = setup
    choosing = make(lora_choices=(f"a={files[0]}", f"b={files[1]}"))
    plain = _run(choosing, [3, 4])
    for name, file, scale in (("a", files[0], 0.6), ("b", files[1], 1.3)):
        switched = _run(choosing, [3, 4], lora=name, lora_scale=scale)
        fused = _run(make(lora=(f"{file}:{scale}",)), [3, 4])
        assert torch.equal(switched, fused), name
        assert (switched.float() - plain.float()).abs().max().item() > 1e-2  # the adapter changed the image
    assert torch.equal(_run(choosing, [3, 4]), plain)  # back to the weights at load
