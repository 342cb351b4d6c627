"""Real weights the way users have them, offline: a hub id downloaded once by the launcher (a
local stand-in for the hub), a single-file checkpoint (SD's LDM layout and SDXL's), and the
one-line errors for what cannot be served."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sd_backend.checkpoints import CLIP_L, OPEN_CLIP, REFINER_CLIP, converted_checkpoint, family_of, read_state, write_checkpoint
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


def family_config(tmp_path, family: str, repo: str, directory: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """_family_config(family) in a process of its own whose hub is a local stand-in serving `directory`
    as `repo`; the process, and the paths of the files it asked for."""
    hub = StandInHub(repo, directory)
    code = (
        "import sys; from pathlib import Path; from sd_backend.checkpoints import _family_config;"
        "print(_family_config(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[2]) / 'scratch'))"
    )
    done = subprocess.run([sys.executable, "-c", code, family, str(tmp_path)], env=dict(os.environ, HF_ENDPOINT=hub.url),
                          capture_output=True, text=True, timeout=120)
    hub.close()
    return done, [path for _, path in hub.requests if "/resolve/" in path]


def test_an_sd1_checkpoint_gets_sd15s_configs_offline_and_its_tokenizer_from_the_hub_once(tmp_path, tiny_dir):
    """What converting a real SD 1.x checkpoint needs besides its tensors: SD 1.5's component
    configs, written here without building weights, and CLIP's tokenizer, which a checkpoint
    does not carry, fetched once from the hub (a local stand-in serving a tokenizer here)."""
    import json

    done, asked = family_config(tmp_path, "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", tiny_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    config = Path(done.stdout.strip().splitlines()[-1])
    unet = json.loads((config / "unet" / "config.json").read_text())
    assert unet["block_out_channels"] == [320, 640, 1280, 1280] and unet["cross_attention_dim"] == 768
    assert json.loads((config / "text_encoder" / "config.json").read_text())["hidden_size"] == 768
    assert (config / "tokenizer" / "vocab.json").is_file() and (config / "model_index.json").is_file()
    assert not list(config.rglob("*.safetensors"))  # configs only: no weights were built
    assert asked and all("/tokenizer/" in path or path.endswith("model_index.json") for path in asked), asked


@pytest.fixture(scope="module")
def tiny_xl_dir(cache_dir) -> Path:
    from sd_backend.offline import write_offline_model

    return write_offline_model("tiny-xl", cache_dir / "tiny-xl")


@pytest.fixture(scope="module")
def tiny_xl_checkpoint(tmp_path_factory, cache_dir, tiny_xl_dir) -> tuple[Path, Path]:
    """tiny-xl as one .safetensors in the layout of Stability's sd_xl_base_1.0, and the diffusers
    directory converted from it (what serving the file converts it to, once)."""
    path = write_checkpoint("tiny-xl", tmp_path_factory.mktemp("sdxl") / "tiny-xl.safetensors", cache_dir)
    return path, converted_checkpoint(path, cache_dir)


def test_an_sdxl_single_file_converts_back_to_every_tensor_of_its_directory(tiny_xl_dir, tiny_xl_checkpoint):
    """tiny-xl written as an SDXL single file and converted back offline by diffusers' single-file
    loader: every tensor of the UNet, the VAE and both text encoders equal to the directory's, in
    the same dtype. Its two text encoders are equally wide: there diffusers alone would give
    text_encoder_2 the first encoder's weights (sd_backend.checkpoints._text_encoder_2)."""
    from diffusers import StableDiffusionXLPipeline

    from sd_backend.family import read_family

    path, converted = tiny_xl_checkpoint
    state = read_state(path)
    assert {key.split(".")[0] for key in state} == {"model", "first_stage_model", "conditioner"}
    assert any(key.startswith(CLIP_L) for key in state) and any(key.startswith(OPEN_CLIP) for key in state)
    theirs, ours = (StableDiffusionXLPipeline.from_pretrained(str(directory)) for directory in (tiny_xl_dir, converted))
    assert theirs.text_encoder.config.hidden_size == theirs.text_encoder_2.config.hidden_size  # the case diffusers gets wrong
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        expected, got = getattr(theirs, name).state_dict(), getattr(ours, name).state_dict()
        assert got.keys() == expected.keys(), f"{name}: {sorted(got.keys() ^ expected.keys())[:5]}"
        differ = [key for key in expected if got[key].dtype != expected[key].dtype or not torch.equal(got[key], expected[key])]
        assert not differ, f"{name}: {len(differ)} of {len(expected)} tensors differ, e.g. {differ[:3]}"
    assert dict(ours.scheduler.config) == dict(theirs.scheduler.config)
    for tokenizer in ("tokenizer", "tokenizer_2"):
        mine, reference = getattr(ours, tokenizer), getattr(theirs, tokenizer)
        assert mine.pad_token == reference.pad_token and mine("a photo of a cat", padding="max_length").input_ids == reference(
            "a photo of a cat", padding="max_length").input_ids, tokenizer
    assert ours.tokenizer_2.pad_token == "!"
    assert read_family(str(converted)) == read_family(str(tiny_xl_dir))


def test_an_sdxl_single_file_makes_the_images_of_its_directory(tiny_xl_checkpoint, cache_dir):
    """The served stages in one process (sd_backend.engine.Engine: text encoders, UNet loop, VAE, as
    the ensemble runs them) on the checkpoint's path and on the offline model: the same images, to
    the bit, with a negative prompt and with SDXL's zeros for none."""
    from sd_backend.config import DeploymentConfig
    from sd_backend.engine import Engine

    path, _ = tiny_xl_checkpoint

    def images(model: str) -> list:
        engine = Engine(DeploymentConfig(model=model, cache_dir=str(cache_dir), device="cpu"))
        return engine.generate(["a photo of a cat", "a dog"], ["blurry", None], seed=[1, 2], steps=3, guidance=5.0, scheduler="euler")

    ours, theirs = images(str(path)), images("tiny-xl")
    assert len(ours) == len(theirs) == 2
    for mine, reference in zip(ours, theirs):
        assert mine.shape == (64, 64, 3)
        assert_same_image(mine, reference, max_diff=0)


def full_size_sdxl() -> dict:
    """sdxl-random's tensors on the meta device (shapes, no data) in the single-file layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd_backend.checkpoints import sdxl_to_ldm
    from sd_backend.offline import _VAE_BLOCKS, ARCHITECTURES

    arch = ARCHITECTURES["sdxl-random"]
    with torch.device("meta"):
        return sdxl_to_ldm(
            UNet2DConditionModel(**arch["unet"]), AutoencoderKL(latent_channels=4, **_VAE_BLOCKS, **arch["vae"]),
            CLIPTextModel(CLIPTextConfig(max_position_embeddings=77, **arch["text"])),
            CLIPTextModelWithProjection(CLIPTextConfig(max_position_embeddings=77, **arch["text_2"])),
        )


def test_the_sdxl_family_is_read_from_its_tensors_and_a_refiner_is_refused(tiny_xl_checkpoint):
    """SDXL's signature: an added embedding (label_emb) of 6 time ids x 256 + the pooled width, the
    two text encoders at conditioner.embedders.0/1, linear projections and the UNet's widths."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    path, _ = tiny_xl_checkpoint
    tiny_xl = read_state(path)
    assert family_of(tiny_xl, path) == "tiny-xl"
    sdxl = full_size_sdxl()
    # shapes of Stability's sd_xl_base_1.0.safetensors, which diffusers' own detection takes it for
    assert tuple(sdxl["model.diffusion_model.label_emb.0.0.weight"].shape) == (1280, 2816)
    assert tuple(sdxl[OPEN_CLIP + "text_projection"].shape) == (1280, 1280)
    assert tuple(sdxl[OPEN_CLIP + "transformer.resblocks.31.attn.in_proj_weight"].shape) == (3840, 1280)
    assert infer_diffusers_model_type(sdxl) == "xl_base"
    assert family_of(sdxl, Path("sd_xl_base_1.0.safetensors")) == "sdxl"
    # the refiner keeps only OpenCLIP, as embedders.0
    refiner = {key.replace(OPEN_CLIP, REFINER_CLIP): value for key, value in sdxl.items() if not key.startswith(CLIP_L)}
    with pytest.raises(ModelUnavailable, match=re.escape(f"refiner.safetensors is an SDXL refiner (its text encoders: {REFINER_CLIP};")):
        family_of(refiner, Path("refiner.safetensors"))
    one_encoder = {key: value for key, value in tiny_xl.items() if not key.startswith(OPEN_CLIP)}
    with pytest.raises(ModelUnavailable, match=re.escape(f"but not SDXL's text encoders (its text encoders: {CLIP_L};")):
        family_of(one_encoder, path)


def test_an_sdxl_checkpoint_gets_sdxls_configs_offline_and_both_tokenizers_from_the_hub_once(tmp_path, tiny_xl_dir, tiny_dir):
    """A real SDXL base checkpoint: SDXL's configs written without weights, and both CLIP tokenizers
    from stabilityai/stable-diffusion-xl-base-1.0 (a stand-in serving tiny-xl's); a repository
    without tokenizer_2/ is refused rather than read as transformers' 2-token fallback."""
    import json

    from sd_backend.family import read_family

    repo = "stabilityai/stable-diffusion-xl-base-1.0"
    done, asked = family_config(tmp_path / "xl", "sdxl", repo, tiny_xl_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    config = Path(done.stdout.strip().splitlines()[-1])
    family = read_family(str(config))
    assert (family.name, family.native_size, family.pooled_dim, family.zero_negative, family.scheduler) == ("sdxl", 1024, 1280, True, "euler")
    unet = json.loads((config / "unet" / "config.json").read_text())
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["cross_attention_dim"] == 2048
    text_2 = json.loads((config / "text_encoder_2" / "config.json").read_text())
    assert (text_2["hidden_size"], text_2["num_hidden_layers"], text_2["architectures"]) == (1280, 32, ["CLIPTextModelWithProjection"])
    assert json.loads((config / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert json.loads((config / "tokenizer_2" / "tokenizer_config.json").read_text())["pad_token"] == "!"
    assert (config / "tokenizer" / "vocab.json").is_file() and (config / "tokenizer_2" / "merges.txt").is_file()
    assert not list(config.rglob("*.safetensors"))  # configs only: no weights were built
    assert any("/tokenizer_2/" in path for path in asked), asked
    assert all(re.search("/tokenizer(_2)?/", path) or path.endswith("model_index.json") for path in asked), asked
    done, _ = family_config(tmp_path / "sd", "sdxl", repo, tiny_dir)  # an SD 1.x repository: one tokenizer
    assert done.returncode != 0 and f"model: cannot take the tokenizer from {repo}: it has no tokenizer_2/tokenizer_config.json" in done.stderr, done.stderr[-3000:]
