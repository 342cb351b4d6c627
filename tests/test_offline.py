"""The offline tiny model: deterministic, loadable by diffusers, with a working tokenizer."""

from __future__ import annotations

import hashlib

import pytest


def _digest(directory):
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.safetensors"))
    }


def test_tiny_model_is_deterministic(tiny_dir, tmp_path):
    from sd_backend.offline import write_offline_model

    again = write_offline_model("tiny", tmp_path / "tiny")
    assert _digest(again) == _digest(tiny_dir)
    assert len(_digest(tiny_dir)) == 3  # unet, vae, text_encoder


def test_tokenizer_round_trips_and_truncates(reference_pipeline):
    tokenizer = reference_pipeline.tokenizer
    ids = tokenizer("a photo of an astronaut").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[1:-1]).strip() == "a photo of an astronaut"
    padded = tokenizer("cat " * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77


def test_stages_load_the_weights_diffusers_loads(tiny_dir, reference_pipeline):
    import torch
    from sd_backend.config import DeploymentConfig
    from sd_backend.stages import UNetStage

    stage = UNetStage.from_config(DeploymentConfig(model=str(tiny_dir), device="cpu"))
    ours = stage.unet.state_dict()
    theirs = reference_pipeline.unet.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert stage.family.native_size == 64


def test_unknown_model_spec_is_a_clear_error():
    from sd_backend.config import DeploymentConfig
    from sd_backend.loading import resolve_model

    with pytest.raises(ValueError, match="neither an offline model"):
        resolve_model(DeploymentConfig(model="no-such-model"))


def test_vae_warm_up_decodes_every_batch_size_the_batcher_can_form(tiny_dir):
    from sd_backend.config import DeploymentConfig
    from sd_backend.stages import VAEStage

    config = DeploymentConfig(model=str(tiny_dir), device="cpu", batch_buckets=(1, 2, 4))
    stage = VAEStage.from_config(config)  # CPU: no warm-up at load
    seen = []
    decode = stage.vae.decode
    stage.vae.decode = lambda latents, **kw: seen.append(tuple(latents.shape)) or decode(latents, **kw)
    assert stage.warm_up(config) == [4, 3, 2, 1]
    assert [s[0] for s in seen] == [4, 3, 2, 1]
    assert len({s[1:] for s in seen}) == 1 and seen[0][1] == stage.vae.config.latent_channels
    assert seen[0][2] * 2 ** (len(stage.vae.config.block_out_channels) - 1) == stage.vae.config.sample_size
