"""Real weights the way users have them, offline: a hub id downloaded once by the launcher (a
local stand-in for the hub), a single-file checkpoint, and the one-line errors for what
cannot be served."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sd_backend.checkpoints import family_of
from sd_backend.launcher import free_port
from sd_backend.model_files import ModelUnavailable
from tests.hub import StandInHub
from tests.servers import Serve, client, running_server
from tests.utils import assert_same_image


def serve_fails(tmp_path, model: str, **env) -> tuple[int, str, float]:
    """`sd-triton serve --model ...` that should fail before tritonserver starts."""
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "sd_backend.cli", "serve", "--model", model, "--health-port", "0",
         "--http-port", str(free_port()), "--grpc-port", str(free_port()), "--metrics-port", str(free_port())],
        env=dict(os.environ, SD_CACHE_DIR=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"), **env),
        capture_output=True, text=True, timeout=120,
    )
    assert "starting tritonserver" not in done.stdout, done.stdout
    return done.returncode, done.stderr.strip(), time.monotonic() - began


def test_a_hub_id_without_network_fails_in_seconds_with_one_line(tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens: as a machine cut off from the hub
    code, stderr, seconds = serve_fails(tmp_path, "someone/some-model", HF_ENDPOINT=nowhere)
    lines = [line for line in stderr.splitlines() if line.startswith("sd-triton:")]
    assert code == 2 and seconds < 30, (code, seconds, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"sd-triton: model: cannot download someone/some-model: {nowhere} cannot be reached"), stderr[-2000:]
    assert "pass a local directory or .safetensors or .ckpt checkpoint" in lines[0]


@pytest.mark.parametrize("case", ["unknown", "gated"])
def test_an_unknown_or_gated_hub_id_says_what_to_do(tmp_path, tiny_dir, case):
    hub = StandInHub("someone/tiny-sd", tiny_dir, gated=case == "gated")
    repo = "someone/no-such-model" if case == "unknown" else "someone/tiny-sd"
    done = subprocess.run(
        [sys.executable, "-m", "sd_backend.cli", "fetch", "--model", repo, "--cache-dir", str(tmp_path / "cache")],
        env=dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf")), capture_output=True, text=True, timeout=120,
    )
    hub.close()
    assert done.returncode == 2, done.stdout + done.stderr
    expected = {
        "unknown": f"sd-triton: model: the Hugging Face hub has no model {repo} (or it is private: set HF_TOKEN)",
        "gated": f"sd-triton: model: {repo} is gated on the Hugging Face hub: accept its terms at {hub.url}/{repo}",
    }[case]
    assert expected in done.stderr, done.stderr[-2000:]


def test_a_directory_that_is_not_a_model_names_the_missing_files(tmp_path):
    model = tmp_path / "half-a-model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text("{}")
    code, stderr, _ = serve_fails(tmp_path, str(model))
    assert code == 2, stderr
    assert f"sd-triton: model: {model} is not a diffusers Stable Diffusion directory: missing model_index.json" in stderr
    assert "unet/diffusion_pytorch_model.safetensors (or .bin)" in stderr and "tokenizer/vocab.json" in stderr


def test_a_file_that_is_no_checkpoint_says_what_it_found(tmp_path):
    from safetensors.torch import save_file

    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.ones(1)}, str(lora))
    code, stderr, _ = serve_fails(tmp_path, str(lora))
    assert code == 2 and "is not a Stable Diffusion checkpoint" in stderr and "lora_unet_down_blocks_0" in stderr, stderr


def test_the_family_is_read_from_the_checkpoints_own_tensors(tmp_path):
    unet = "model.diffusion_model."
    sd15 = {unet + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3), unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)}
    assert family_of(sd15, tmp_path / "v1-5.safetensors") == "sd15"
    sd21 = dict(sd15, **{unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024),
                         unet + "input_blocks.1.1.proj_in.weight": torch.zeros(320, 320)})
    assert family_of(sd21, tmp_path / "v2-1.safetensors") == "sd21"
    sdxl_like = dict(sd21, **{unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 2048)})
    with pytest.raises(ModelUnavailable, match="has 320 channels, reads text of width 2048 and projects linearly; known: tiny"):
        family_of(sdxl_like, tmp_path / "xl.safetensors")


def test_a_single_file_checkpoint_serves_the_images_of_its_weights(tmp_path, cache_dir, server):
    """The tiny model as one LDM-layout .safetensors, converted once with diffusers' single-file
    loader: the images of the same seeds equal those of the diffusers directory, to the bit."""
    checkpoint = tmp_path / "tiny.safetensors"
    done = subprocess.run([sys.executable, "-m", "sd_backend.cli", "write-model", "tiny", str(checkpoint), "--cache-dir", str(cache_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and checkpoint.stat().st_size > 0, done.stderr[-2000:]
    params = dict(steps=3, guidance_scale=7.5, scheduler="euler")
    with running_server(tmp_path / "cache", tmp_path, env={"SD_MODEL": str(checkpoint)}) as from_file:
        c = client(from_file.grpc_url)
        images = [c.generate("a cat", seed=seed, **params) for seed in (1, 2)]
        c.close()
    reference = client(server.grpc_url)
    for seed, result in zip((1, 2), images):
        assert_same_image(result.image, reference.generate("a cat", seed=seed, **params).image, max_diff=0)
    reference.close()
    assert images[0].parameters["model"] == "tiny.safetensors"


def test_a_hub_id_is_downloaded_once_by_the_launcher_and_the_stubs_stay_offline(tmp_path, cache_dir, tiny_dir, server):
    hub = StandInHub("someone/tiny-sd", tiny_dir)
    serve = Serve(tmp_path / "cache", env={"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "SD_MODEL": "someone/tiny-sd"})
    try:
        assert serve.ready.wait(300), serve.output()[-3000:]
        asked_before_ready = list(hub.requests)
        c = client(f"127.0.0.1:{serve.grpc}")
        result = c.generate("a cat", seed=4, steps=3)
        c.close()
    finally:
        code = serve.stop()
        hub.close()
    output = serve.output()
    assert code == 0, output[-3000:]
    assert output.count("sd-triton: downloading someone/tiny-sd from") == 1, output[-3000:]
    assert "unet/diffusion_pytorch_model.safetensors" in "".join(path for _, path in asked_before_ready)
    assert hub.requests == asked_before_ready  # the stubs loaded the local copy and asked nothing
    downloads = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert len(downloads) == len(set(downloads)), "a file was downloaded twice"
    assert result.parameters["model"] == "someone/tiny-sd"
    reference = client(server.grpc_url)
    assert_same_image(result.image, reference.generate("a cat", seed=4, steps=3).image, max_diff=0)
    reference.close()


def test_an_sd1_checkpoint_gets_sd15s_configs_offline_and_its_tokenizer_from_the_hub_once(tmp_path, tiny_dir):
    """What converting a real SD 1.x checkpoint needs besides its tensors: SD 1.5's component
    configs, written here without building weights, and CLIP's tokenizer, which a checkpoint
    does not carry, fetched once from the hub (a local stand-in serving a tokenizer here)."""
    import json

    hub = StandInHub("stable-diffusion-v1-5/stable-diffusion-v1-5", tiny_dir)
    code = (
        "import json, sys; from pathlib import Path; from sd_backend.checkpoints import _family_config;"
        "print(_family_config('sd15', Path(sys.argv[1]), Path(sys.argv[1]) / 'scratch'))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=dict(os.environ, HF_ENDPOINT=hub.url),
                          capture_output=True, text=True, timeout=120)
    hub.close()
    assert done.returncode == 0, done.stderr[-3000:]
    config = Path(done.stdout.strip().splitlines()[-1])
    unet = json.loads((config / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert json.loads((config / "text_encoder" / "config.json").read_text())["hidden_size"] == 768
    assert (config / "tokenizer" / "vocab.json").is_file() and (config / "model_index.json").is_file()
    assert not list(config.rglob("*.safetensors"))  # configs only: no weights were built
    asked = [path for _, path in hub.requests if "/resolve/" in path]
    assert asked and all("/tokenizer/" in path or path.endswith("model_index.json") for path in asked), asked
