"""Models that need no download, written in diffusers layout.

- `tiny`: a deterministic, tiny, randomly initialised Stable Diffusion (UNet, VAE,
  CLIP text model and a working CLIP BPE tokenizer with a small vocabulary), for
  tests and demos on the CPU.
- `sd15-random`: the full SD 1.5 architecture (860M UNet, 123M CLIP, 84M VAE) with
  random weights, for GPU speed work where no checkpoint is at hand.
- `tiny-v`, `sd21-random`: the same for the SD 2.x family: v-prediction, linear
  projections in the transformer blocks, head_dim 64 and an OpenCLIP-H-shaped text
  encoder in `sd21-random` (768x768 native).
- `tiny-xl`, `sdxl-random`: the same for SDXL: two text encoders (CLIP ViT-L and an
  OpenCLIP-bigG-shaped one with a projection), the UNet's `text_time` added embedding,
  1024x1024 native in `sdxl-random` (2.6B UNet), Euler as its scheduler config names.
- `tiny-inpaint`, `sd15-inpaint-random`: `tiny` and `sd15-random` with an inpainting UNet
  (9 input channels: latents, mask and the masked image's latents, as SD 1.5 inpainting).

All are written so that diffusers' own pipeline (`StableDiffusionPipeline`,
`StableDiffusionXLPipeline`) `.from_pretrained(dir)` loads the very same weights the
Triton models load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

OFFLINE_MODELS = ("tiny", "sd15-random", "tiny-v", "sd21-random", "tiny-xl", "sdxl-random", "tiny-inpaint", "sd15-inpaint-random")

# SD 1.x noise schedule and PNDM settings (the scheduler config SD 1.5 ships).
_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    trained_betas=None,
)

# Words whose BPE merges the tiny tokenizer knows, so common prompts become a few tokens.
_TINY_WORDS = (
    "a photo of an astronaut riding horse on the moon cat dog painting portrait "
    "city street at night landscape mountain river forest oil canvas detailed"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _tiny_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A small but complete CLIP BPE vocabulary: every byte, with and without `</w>`,
    the merges that spell `_TINY_WORDS`, and the two special tokens."""
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in _TINY_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = f"{parts[0]} {parts[1]}"
            merged = parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
                vocab_list.append(merged)
            parts = [merged] + parts[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in vocab_list:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def _write_tokenizer(directory: Path, pad_token: str = "<|endoftext|>") -> int:
    """Write a CLIP tokenizer to `directory`; returns its vocabulary size. SDXL's second
    tokenizer pads with "!" (OpenCLIP's token 0), its first with the end token."""
    from transformers import CLIPTokenizer

    vocab, merges = _tiny_vocab_and_merges()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"), model_max_length=77, pad_token=pad_token
    )
    tokenizer.save_pretrained(str(directory))
    return len(vocab)


# Constructor arguments of each offline model's UNet, VAE and CLIP text model
# (SD 1.5's for `sd15-random`; the VAE blocks match SD's, so pixels/latent is 8 in both).
_VAE_BLOCKS = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
_TINY = dict(
    unet=dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ),
    vae=dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64),
    text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
)
_SD15 = dict(
    unet=dict(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    ),
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
    text=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        hidden_act="quick_gelu",
    ),
)
# SD 2.x as it differs from SD 1.x: heads counted per block (head_dim 64 in sd21-random), linear
# projections in the transformer blocks, OpenCLIP-style GELU text, v-prediction
_V_PREDICTION = dict(prediction_type="v_prediction")
ARCHITECTURES = {
    "tiny": _TINY,
    "sd15-random": _SD15,
    "tiny-v": dict(
        unet=_TINY["unet"] | dict(attention_head_dim=(2, 4), use_linear_projection=True),
        vae=_TINY["vae"],
        text=_TINY["text"] | dict(hidden_act="gelu"),
        scheduler=_V_PREDICTION,
    ),
    "sd21-random": dict(
        unet=_SD15["unet"] | dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
        vae=_SD15["vae"] | dict(sample_size=768),
        # OpenCLIP-H up to its penultimate layer, as diffusers converts SD 2.x
        text=_SD15["text"] | dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"),
        scheduler=_V_PREDICTION,
    ),
}
# SDXL: no attention in the first block, more transformer layers deeper down, the pooled
# embedding and the six time ids through add_embedding (in width = 6 x time dim + pooled)
_SDXL_UNET = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
)
ARCHITECTURES["tiny-xl"] = dict(
    unet=_TINY["unet"] | _SDXL_UNET | dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,  # 32 + 32: both encoders' penultimate states side by side
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    ),
    vae=_TINY["vae"],
    text=_TINY["text"],
    text_2=_TINY["text"] | dict(hidden_act="gelu", projection_dim=32),
    scheduler=dict(timestep_spacing="leading"),
)
ARCHITECTURES["sdxl-random"] = dict(
    unet=_SDXL_UNET | dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,  # 768 (CLIP ViT-L) + 1280 (OpenCLIP bigG)
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + 1280,
    ),
    vae=_SD15["vae"] | dict(sample_size=1024, scaling_factor=0.13025),
    text=_SD15["text"],
    text_2=_SD15["text"] | dict(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280
    ),
    scheduler=dict(timestep_spacing="leading"),
)


# inpainting UNets (SD 1.5 inpainting's layout): 9 input channels, latents + mask + the masked image's latents
ARCHITECTURES["tiny-inpaint"] = _TINY | dict(unet=_TINY["unet"] | dict(in_channels=9))
ARCHITECTURES["sd15-inpaint-random"] = _SD15 | dict(unet=_SD15["unet"] | dict(in_channels=9))


def is_sdxl(name: str) -> bool:
    return "text_2" in ARCHITECTURES[name]


def _text_encoder(arch: dict, key: str, vocab_size: int, eos_id: int, bos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text = dict(vocab_size=vocab_size) | arch[key]  # the -random models keep CLIP's full vocabulary size
    config = CLIPTextConfig(max_position_embeddings=77, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id, **text)
    return (CLIPTextModelWithProjection if key == "text_2" else CLIPTextModel)(config)


def _build(name: str, vocab_size: int, eos_id: int, bos_id: int) -> dict:
    """The pipeline components of offline model `name` but its tokenizers, each from a fixed seed."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel

    arch = ARCHITECTURES[name]
    torch.manual_seed(0)
    parts = dict(unet=UNet2DConditionModel(**arch["unet"]))
    torch.manual_seed(1)
    parts["vae"] = AutoencoderKL(latent_channels=4, **_VAE_BLOCKS, **arch["vae"])
    torch.manual_seed(2)
    parts["text_encoder"] = _text_encoder(arch, "text", vocab_size, eos_id, bos_id)
    scheduler = _SCHEDULER_CONFIG | arch.get("scheduler", {})
    if is_sdxl(name):
        torch.manual_seed(3)
        parts["text_encoder_2"] = _text_encoder(arch, "text_2", vocab_size, eos_id, bos_id)
        parts["scheduler"] = EulerDiscreteScheduler.from_config(scheduler)  # as SDXL ships
    else:
        parts["scheduler"] = PNDMScheduler(**scheduler)
    return parts


def _pipeline(name: str, parts: dict, tokenizers: list):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if is_sdxl(name):
        return StableDiffusionXLPipeline(
            **parts, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], force_zeros_for_empty_prompt=True, add_watermarker=False
        )
    return StableDiffusionPipeline(
        **parts, tokenizer=tokenizers[0], safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def write_offline_model(name: str, directory: str | os.PathLike) -> Path:
    """Write offline model `name` to `directory` (diffusers layout) and return it.

    Written to a temporary sibling and renamed into place, so several Triton models
    loading at once never see a half-written directory.
    """
    from transformers import CLIPTokenizer

    if name not in OFFLINE_MODELS:
        raise ValueError(f"model: {name!r} is not an offline model; choose one of {', '.join(OFFLINE_MODELS)}")
    target = Path(directory)
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        vocab_size = _write_tokenizer(staging / "tokenizer")
        tokenizers = [CLIPTokenizer.from_pretrained(str(staging / "tokenizer"))]
        if is_sdxl(name):
            _write_tokenizer(staging / "tokenizer_2", pad_token="!")
            tokenizers.append(CLIPTokenizer.from_pretrained(str(staging / "tokenizer_2")))
        ids = (tokenizers[0].eos_token_id, tokenizers[0].bos_token_id)
        pipeline = _pipeline(name, _build(name, vocab_size, *ids), tokenizers)
        if name.endswith("-random"):
            pipeline.to(dtype=__import__("torch").float16)  # halves the 4 GB of fp32 weights on disk
        pipeline.save_pretrained(str(staging), safe_serialization=True)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first: its copy is identical (same seeds).
            if not (target / "model_index.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


LORA_FORMATS = ("diffusers", "kohya")


def write_offline_lora(model_dir: str | os.PathLike, path: str | os.PathLike, lora_format: str = "diffusers", seed: int = 0, rank: int = 4) -> Path:
    """A random LoRA for the offline model in `model_dir` (UNet attention and text-encoder
    attention projections, rank `rank`, both low-rank factors random so it changes the
    images), saved as one .safetensors in `lora_format`: `diffusers` (diffusers/PEFT keys,
    what save_lora_weights writes) or `kohya` (lora_unet_* / lora_te1_* with .alpha, what
    AUTOMATIC1111 and civitai files hold). For tests and demos."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from transformers import CLIPTextModel

    if lora_format not in LORA_FORMATS:
        raise ValueError(f"lora_format: {lora_format!r} is not one of {', '.join(LORA_FORMATS)}")
    unet = UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet")
    text = CLIPTextModel.from_pretrained(str(model_dir), subfolder="text_encoder")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    # peft's own injection: transformers' add_adapter asks for a newer peft than the registries have
    text_config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    text = inject_adapter_in_model(text_config, text)
    unet_state, text_state = get_peft_model_state_dict(unet), get_peft_model_state_dict(text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if lora_format == "diffusers":
        StableDiffusionPipeline.save_lora_weights(
            str(path.parent), unet_lora_layers=convert_state_dict_to_diffusers(unet_state),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(text_state), weight_name=path.name, safe_serialization=True,
        )
        return path
    from safetensors.torch import save_file

    peft_state = {f"unet.{k}": v for k, v in unet_state.items()} | {f"text_encoder.{k}": v for k, v in text_state.items()}
    kohya = convert_state_dict_to_kohya(peft_state)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(path))
    return path
