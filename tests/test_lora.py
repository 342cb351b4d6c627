"""LoRA adapters fused at load (deployment setting `lora`), in both formats users have
(diffusers/PEFT and kohya): served images equal diffusers' pipeline with the same adapters
loaded (`load_lora_weights`), weighted (`set_adapters`) and fused (`fuse_lora`), to the bit;
one adapter alone equals `fuse_lora(lora_scale=...)`; with two, both are in the weights."""

from __future__ import annotations

import numpy as np
import pytest

from tests.utils import assert_same_image

STEPS = 4


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    """(diffusers-format file, kohya-format file): two random LoRAs for `tiny`."""
    from sd_backend.offline import write_offline_lora

    folder = tmp_path_factory.mktemp("lora")
    return (
        write_offline_lora(tiny_dir, folder / "fox-diffusers.safetensors", "diffusers", seed=1),
        write_offline_lora(tiny_dir, folder / "fox-kohya.safetensors", "kohya", seed=2),
    )


@pytest.fixture(scope="module")
def lora_deployment(cache_dir, tmp_path_factory, adapters):
    from tests.servers import running_server

    lora = f"{adapters[0]}:0.7,{adapters[1]}"  # the second at scale 1
    choices = f"fox={adapters[0]},{adapters[1]}:0.5"  # per request, over the fused ones
    env = {"SD_LORA": lora, "SD_LORA_CHOICES": choices}
    with running_server(cache_dir, tmp_path_factory.mktemp("lora-server"), env=env) as server:
        yield server


@pytest.fixture(scope="module")
def lora_server(lora_deployment):
    from tests.servers import client

    c = client(lora_deployment.grpc_url)
    yield c
    c.close()


def lora_reference(tiny_dir, adapters, prompt, *, seed, scheduler="pndm"):
    import torch
    from diffusers import StableDiffusionPipeline

    from sd_backend.schedulers import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    for name, path in zip(("a", "b"), adapters):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 1.0])
    pipe.fuse_lora(lora_scale=1.0, adapter_names=["a", "b"])
    out = pipe(prompt, num_inference_steps=STEPS, height=64, width=64, generator=torch.Generator().manual_seed(seed), output_type="np")
    return (out.images[0] * 255).round().astype(np.uint8)


def test_fused_adapters_serve_diffusers_images(lora_server, tiny_dir, adapters, reference_pipeline):
    from tests.conftest import reference_image

    result = lora_server.generate("a red fox", seed=3, steps=STEPS, scheduler="pndm")
    assert_same_image(result.image, lora_reference(tiny_dir, adapters, "a red fox", seed=3), max_diff=0)
    plain = reference_image(reference_pipeline, "a red fox", seed=3, steps=STEPS, guidance=7.5, scheduler="pndm")
    assert np.abs(result.image.astype(int) - plain.astype(int)).max() > 8  # the adapters really changed the model


def test_each_format_alone_equals_diffusers_in_process(tiny_dir, adapters):
    """Each file on its own (the UNet's and the text encoder's parts), through the stages."""
    import torch
    from diffusers import StableDiffusionPipeline

    from sd_backend.config import DeploymentConfig
    from sd_backend.engine import Engine

    for path in adapters:
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(path), adapter_name="x")
        pipe.fuse_lora(lora_scale=0.5, adapter_names=["x"])
        expected = pipe("a boat", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(2), output_type="latent").images
        ours = Engine(DeploymentConfig(model=str(tiny_dir), lora=(f"{path}:0.5",), default_steps=STEPS)).latents(["a boat"], seed=2)[0]
        assert torch.equal(ours, expected), path.name


def test_two_adapters_are_both_in_the_fused_weights(tiny_dir, adapters):
    """Fused(a, b) = W + scale_a x dW_a + scale_b x dW_b, to float32's rounding of two additions
    (loading an adapter into a model with a fused one would unfuse it: the order matters)."""
    import torch
    from diffusers import UNet2DConditionModel

    from sd_backend.lora import fuse_loras, parse_loras

    def weight(entries):
        unet = UNet2DConditionModel.from_pretrained(str(tiny_dir), subfolder="unet")
        fuse_loras(unet, "unet", parse_loras(entries), sdxl=False)
        return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.detach()

    base, a, b = weight([]), weight([f"{adapters[0]}:0.7"]), weight([str(adapters[1])])
    both = weight([f"{adapters[0]}:0.7", str(adapters[1])])
    expected = base + (a - base) + (b - base)
    ulp = torch.finfo(torch.float32).eps * max(base.abs().max().item(), both.abs().max().item())
    assert (both - expected).abs().max().item() <= 8 * ulp  # a few roundings of each sum
    assert (both - b).abs().max().item() > 1000 * ulp and (both - a).abs().max().item() > 1000 * ulp


def test_a_missing_adapter_file_fails_the_deployment_naming_it(tmp_path):
    from sd_backend.config import DeploymentConfig

    with pytest.raises(ValueError, match=r"lora: '.*nowhere.safetensors:0.5': no such file"):
        DeploymentConfig(lora=(f"{tmp_path}/nowhere.safetensors:0.5",))


def test_scales_are_read_after_the_last_colon(tmp_path):
    from sd_backend.lora import LoraSpec, parse_loras

    path = tmp_path / "a:b.safetensors"  # a ':' in the file name is part of the name
    path.write_bytes(b"")
    assert parse_loras([f"{path}", f"{path}:0.25"]) == (LoraSpec(str(path), 1.0), LoraSpec(str(path), 0.25))


# ---- adapters chosen per request (lora_choices, LORA / LORA_SCALE) ----


def choice_reference(tiny_dir, path, prompt, *, seed, scale, fused=(), output_type="latent"):
    """diffusers' latents (or uint8 image) with `path` loaded and fused at `scale`, after the
    `fused` (file, scale) pairs were loaded, weighted, fused and unloaded, as a deployment's `lora` is."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if fused:
        names = [f"fused{i}" for i in range(len(fused))]
        for name, (file, _) in zip(names, fused):
            pipe.load_lora_weights(str(file), adapter_name=name)
        pipe.set_adapters(names, adapter_weights=[w for _, w in fused])
        pipe.fuse_lora(lora_scale=1.0, adapter_names=names)
        pipe.unload_lora_weights()
    if path is not None:
        pipe.load_lora_weights(str(path), adapter_name="x")
        pipe.fuse_lora(lora_scale=scale, adapter_names=["x"])
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompt, num_inference_steps=STEPS, height=64, width=64, generator=generator, output_type=output_type).images
    return out if output_type == "latent" else (out[0] * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def choosing_engine(tiny_dir, adapters):
    from sd_backend.config import DeploymentConfig
    from sd_backend.engine import Engine

    choices = (f"fox={adapters[0]}", f"{adapters[1]}:0.5")  # the second named by its stem, default scale 0.5
    return Engine(DeploymentConfig(model=str(tiny_dir), lora_choices=choices, default_steps=STEPS))


def test_a_chosen_adapter_equals_diffusers_fused_at_that_scale_and_switches_back_exactly(choosing_engine, tiny_dir, adapters):
    import torch

    plain = choice_reference(tiny_dir, None, "a boat", seed=2, scale=1.0)
    fox = choice_reference(tiny_dir, adapters[0], "a boat", seed=2, scale=0.6)
    kohya = choice_reference(tiny_dir, adapters[1], "a boat", seed=2, scale=0.5)
    # each switch from every other state: the weights at load come back to the bit
    for lora, scale, expected in [("fox", 0.6, fox), ("", None, plain), ("fox-kohya", None, kohya), ("fox", 0.6, fox), ("", None, plain)]:
        ours = choosing_engine.latents(["a boat"], seed=2, lora=lora, lora_scale=scale)[0]
        assert torch.equal(ours, expected), (lora, scale)
    assert not torch.equal(fox, plain) and not torch.equal(kohya, plain)


def test_a_batch_of_different_adapters_gives_each_its_own_latents(choosing_engine):
    """Grouped by adapter in both the text encoder and the UNet; each group equals that group
    run on its own (the same batch size, so the same rounding), whatever ran before it."""
    import torch

    from sd_backend.stages import DenoiseJob

    engine, asks = choosing_engine, [("fox", 0.6), ("", 1.0), ("fox", 1.0), ("fox-kohya", 0.5), ("fox", 0.6)]
    checked = [engine.unet.check(seed=i, lora=lora, lora_scale=scale) for i, (lora, scale) in enumerate(asks)]
    prompts = [f"a boat {i}" for i in range(len(asks))]
    encoded = engine.text_encoder(prompts, [None] * len(asks), [(p.lora, p.lora_scale) for p in checked])
    together = engine.unet([DenoiseJob(p, e.prompt_embeds, e.negative_embeds) for p, e in zip(checked, encoded)])
    for ask in dict.fromkeys(asks):
        indices = [i for i, a in enumerate(asks) if a == ask]
        alone = engine.latents([prompts[i] for i in indices], seed=indices, lora=ask[0], lora_scale=ask[1])
        for i, latents in zip(indices, alone):
            assert torch.equal(together[i], latents), ask


def test_per_request_adapters_over_fused_ones_equal_diffusers(tiny_dir, adapters):
    import torch

    from sd_backend.config import DeploymentConfig
    from sd_backend.engine import Engine

    engine = Engine(DeploymentConfig(model=str(tiny_dir), lora=(f"{adapters[0]}:0.7",), lora_choices=(f"k={adapters[1]}",), default_steps=STEPS))
    ours = engine.latents(["a boat"], seed=4, lora="k", lora_scale=0.8)[0]
    assert torch.equal(ours, choice_reference(tiny_dir, adapters[1], "a boat", seed=4, scale=0.8, fused=[(adapters[0], 0.7)]))
    base = engine.latents(["a boat"], seed=4)[0]
    assert torch.equal(base, choice_reference(tiny_dir, None, "a boat", seed=4, scale=1.0, fused=[(adapters[0], 0.7)]))


def test_bad_adapter_requests_name_the_field(tiny_dir, adapters):
    from sd_backend.config import DeploymentConfig
    from sd_backend.family import read_family
    from sd_backend.params import check_params

    config, family = DeploymentConfig(model=str(tiny_dir), lora_choices=(f"fox={adapters[0]}",)), read_family(tiny_dir)
    with pytest.raises(ValueError, match=r"LORA: 'wolf' is not one of this deployment's adapters; known: fox"):
        check_params(config, family, lora="wolf")
    for scale in (float("nan"), 4.5, -5):
        with pytest.raises(ValueError, match=r"LORA_SCALE: .* is out of range"):
            check_params(config, family, lora="fox", lora_scale=scale)
    with pytest.raises(ValueError, match=r"LORA: 'fox' is not one of .*known: none"):
        check_params(DeploymentConfig(model=str(tiny_dir)), family, lora="fox")
    plain = check_params(config, family, lora="", lora_scale=3.0)  # no adapter: the scale weighs nothing
    assert (plain.lora, plain.lora_scale) == ("", 1.0) and plain.group_key() == check_params(config, family).group_key()
    assert check_params(config, family, lora=b"fox").record("tiny")["lora"] == "fox"


def test_bad_lora_choices_fail_the_deployment_naming_the_entry(tmp_path, adapters):
    from sd_backend.config import DeploymentConfig

    with pytest.raises(ValueError, match=r"lora_choices: 'a b=.*' is not a name"):
        DeploymentConfig(lora_choices=(f"a b={adapters[0]}",))
    with pytest.raises(ValueError, match=r"the name 'x' is given twice"):
        DeploymentConfig(lora_choices=(f"x={adapters[0]}", f"x={adapters[1]}"))
    with pytest.raises(ValueError, match=r"no such file"):
        DeploymentConfig(lora_choices=(f"x={tmp_path}/none.safetensors",))
    with pytest.raises(ValueError, match=r"lora_choices: not served on the deepspeed level"):
        DeploymentConfig(lora_choices=(f"x={adapters[0]}",), opt_level="deepspeed", dtype="float16")


def test_served_adapters_chosen_per_request_equal_diffusers_and_mix_in_one_batch(lora_server, tiny_dir, adapters):
    """Concurrent requests with different adapters (and none) are batched together; each gets
    diffusers' image with its adapter fused at its scale over the deployment's fused ones; a
    bad one in the same burst gets INVALID_ARG listing the adapters, and nothing else fails."""
    from concurrent.futures import ThreadPoolExecutor

    from tritonclient.utils import InferenceServerException

    fused = [(adapters[0], 0.7), (adapters[1], 1.0)]
    asks = [("fox", 0.6), (None, None), ("fox-kohya", None), ("wolf", None), ("fox", 0.6)]

    def one(ask):
        try:
            return lora_server.generate("a red fox", seed=5, steps=STEPS, scheduler="pndm", lora=ask[0], lora_scale=ask[1])
        except InferenceServerException as err:
            return err

    with ThreadPoolExecutor(len(asks)) as pool:
        results = list(pool.map(one, asks))
    bad = results.pop(3)
    assert isinstance(bad, InferenceServerException) and "LORA: 'wolf' is not one of this deployment's adapters; known: fox, fox-kohya" in str(bad)
    files = {"fox": adapters[0], "fox-kohya": adapters[1]}
    for (lora, scale), result in zip([a for i, a in enumerate(asks) if i != 3], results):
        scale = 0.5 if lora == "fox-kohya" else scale  # its default from lora_choices
        expected = choice_reference(tiny_dir, files.get(lora), "a red fox", seed=5, scale=scale, fused=fused, output_type="np")
        assert_same_image(result.image, expected, max_diff=1)  # ±1 level: the batch changes the VAE's rounding
        assert result.parameters.get("lora") == lora and (lora is None or result.parameters["lora_scale"] == scale)
    alone = lora_server.generate("a red fox", seed=5, steps=STEPS, scheduler="pndm", lora="fox", lora_scale=0.6)
    expected = choice_reference(tiny_dir, adapters[0], "a red fox", seed=5, scale=0.6, fused=fused, output_type="np")
    assert_same_image(alone.image, expected, max_diff=0)


def test_a_stream_with_an_adapter_gives_the_ensembles_image(lora_server):
    """The streaming model passes LORA / LORA_SCALE on to the text encoder and the unet."""
    steps = []
    streamed = lora_server.stream("a red fox", on_progress=steps.append, seed=6, steps=STEPS, scheduler="pndm", lora="fox", lora_scale=0.9)
    generated = lora_server.generate("a red fox", seed=6, steps=STEPS, scheduler="pndm", lora="fox", lora_scale=0.9)
    assert_same_image(streamed.image, generated.image, max_diff=0)
    assert streamed.parameters["lora"] == "fox" and streamed.parameters["lora_scale"] == 0.9 and len(steps) == STEPS + 1


def test_the_server_lists_its_adapters_and_the_page_offers_them(lora_deployment, tmp_path):
    """`sd_lora_choice{name,scale}` on Triton's metrics port names each adapter a request may
    choose, with its default scale; the web page offers those names in its LoRA field."""
    from sd_client import lora_choices
    from tests.test_ui import browser_session, running_ui

    assert lora_choices(lora_deployment.metrics_url) == {"fox": 1.0, "fox-kohya": 0.5}
    with running_ui(lora_deployment, tmp_path) as url, browser_session() as browser:
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.querySelectorAll('#adapters option').length === 2")
        options = page.evaluate("[...document.querySelectorAll('#adapters option')].map(o => [o.value, o.label])")
        assert options == [["fox", "scale 1"], ["fox-kohya", "scale 0.5"]]
        page.fill("input[name=lora]", "fox-kohya")
        assert page.get_attribute("input[name=lora_scale]", "placeholder") == "0.5"
