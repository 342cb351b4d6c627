"""Single-file Stable Diffusion checkpoints: the CompVis (LDM) layout AUTOMATIC1111, ComfyUI and
civitai use, one `.safetensors` or `.ckpt` holding the UNet (`model.diffusion_model.*`), the
VAE (`first_stage_model.*`) and the text encoder (`cond_stage_model.transformer.*`).

`converted_checkpoint` recognises the family from the checkpoint's own tensors, converts it
once with diffusers' single-file loader against the configuration this project writes for
that family offline, and keeps the result as a diffusers directory in the deployment's cache
(keyed by the file's path, size and modification time). `write_checkpoint` writes an
offline model in that layout (`sd-triton write-model tiny tiny.safetensors`), for tests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from .hub import download
from .model_files import ModelUnavailable
from .offline import ARCHITECTURES, OFFLINE_MODELS, is_sdxl, write_offline_model

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
CONV_IN = UNET + "input_blocks.0.0.weight"
PROJ_IN = UNET + "input_blocks.1.1.proj_in.weight"  # 2-D where the transformer blocks project linearly (SD 2.x)


def _signature(offline: str) -> tuple[int, int, bool]:
    unet = ARCHITECTURES[offline]["unet"]
    return unet["block_out_channels"][0], unet["cross_attention_dim"], unet.get("use_linear_projection", False)


# family -> the offline model whose configuration it has; recognised by its (UNet channels,
# text width, linear projections). SD 2.x is taken as 768x768 v-prediction, as SD 2.1 is.
FAMILIES = {"tiny": "tiny", "tiny-v": "tiny-v", "sd15": "sd15-random", "sd21": "sd21-random"}
# a family's CLIP tokenizer, where this project cannot write it offline
TOKENIZER_SOURCES = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sd21": "stabilityai/stable-diffusion-2-1"}


def read_state(path: Path) -> dict:
    """The checkpoint's tensors by name."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def family_of(state: dict, path: Path) -> str:
    """The family of a single-file checkpoint, from its tensors; ModelUnavailable naming what was found."""
    known = ", ".join(f"{name} ({'%d UNet channels, text width %d%s' % (c, w, ', linear' if lin else '')})"
                      for name, (c, w, lin) in ((n, _signature(o)) for n, o in FAMILIES.items()))
    if CONV_IN not in state:
        prefixes = sorted({key.split(".")[0] for key in state})[:6]
        raise ModelUnavailable(
            f"model: {path} is not a Stable Diffusion checkpoint: it has no {CONV_IN} (its tensors start with "
            f"{', '.join(prefixes) or 'nothing'}; a LoRA, a VAE or a text encoder alone is not a model); known: {known}"
        )
    channels = state[CONV_IN].shape[0]
    widths = {tensor.shape[1] for key, tensor in state.items() if key.startswith(UNET) and key.endswith("attn2.to_k.weight")}
    linear = PROJ_IN in state and state[PROJ_IN].dim() == 2
    for name, offline in FAMILIES.items():
        family_channels, width, family_linear = _signature(offline)
        if channels == family_channels and widths == {width} and linear == family_linear:
            return name
    raise ModelUnavailable(
        f"model: {path} is a checkpoint of no family sd-triton serves: its UNet has {channels} channels, reads "
        f"text of width {', '.join(map(str, sorted(widths))) or 'none'}{' and projects linearly' if linear else ''}; known: {known}"
    )


def converted_checkpoint(path: Path, cache_dir: Path, progress: bool = False) -> Path:
    """The diffusers directory of a single-file checkpoint, converted into the cache on first use."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir / "checkpoints" / f"{path.stem}-{key}"
    if (target / "model_index.json").exists():
        return target
    state = read_state(path)
    family = family_of(state, path)
    if progress:
        print(f"sd-triton: converting {path} ({family}) into {target} (once)", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        pipeline = _load(path, _family_config(family, cache_dir, staging / "config"), state)
        pipeline.save_pretrained(str(staging / "model"), safe_serialization=True)
        try:
            (staging / "model").rename(target)
        except OSError:  # another process converted it first: the same file gives the same weights
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _family_config(family: str, cache_dir: Path, scratch: Path) -> Path:
    """A directory of the family's configs and tokenizer (its weights, if any, are not read)."""
    offline = FAMILIES[family]
    if family not in TOKENIZER_SOURCES:  # its offline model's own tokenizer is the right one, and it is small
        return write_offline_model(offline, cache_dir / offline)
    _write_configs(offline, scratch)
    tokenizer = download(TOKENIZER_SOURCES[family], cache_dir / "hub", progress=False, patterns=["tokenizer/*", "model_index.json"])
    shutil.copytree(tokenizer / "tokenizer", scratch / "tokenizer")
    return scratch


def _write_configs(offline: str, directory: Path) -> None:
    """The components' configs of an offline model, without building its weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from .offline import _SCHEDULER_CONFIG, _VAE_BLOCKS

    arch = ARCHITECTURES[offline]
    with torch.device("meta"):
        UNet2DConditionModel(**arch["unet"]).save_config(str(directory / "unet"))
        AutoencoderKL(latent_channels=4, **_VAE_BLOCKS, **arch["vae"]).save_config(str(directory / "vae"))
    CLIPTextConfig(max_position_embeddings=77, **arch["text"]).save_pretrained(str(directory / "text_encoder"))
    (directory / "scheduler").mkdir(parents=True)
    config = {"_class_name": "PNDMScheduler", **_SCHEDULER_CONFIG, **arch.get("scheduler", {})}
    (directory / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=1))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=1))


def _load(path: Path, config: Path, state: dict):
    """diffusers' single-file loader, offline, in the checkpoint's own precision."""
    from diffusers import StableDiffusionPipeline

    dtype = state[CONV_IN].dtype
    return StableDiffusionPipeline.from_single_file(
        str(path), config=str(config), local_files_only=True, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )


def write_checkpoint(name: str, path: str | Path, cache_dir: Path) -> Path:
    """Write offline model `name` as a single-file LDM checkpoint (safetensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    if name not in OFFLINE_MODELS:
        raise ValueError(f"model: {name!r} is not an offline model; choose one of {', '.join(OFFLINE_MODELS)}")
    if is_sdxl(name):
        raise ValueError(f"model: {name!r} is SDXL, whose single-file layout is neither written nor read here; write it as a directory")
    source = write_offline_model(name, cache_dir / name)
    unet = UNet2DConditionModel.from_pretrained(str(source), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(str(source), subfolder="vae")
    text = CLIPTextModel.from_pretrained(str(source), subfolder="text_encoder")
    state = {UNET + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    state |= {VAE + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    # LDM keeps CLIP's keys under text_model. (transformers 5 dropped that level from its own)
    state |= {TEXT + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in text.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


_UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def unet_to_ldm(state: dict, config) -> dict:
    """A diffusers UNet2DConditionModel state dict in LDM names: the inverse of what
    diffusers' convert_ldm_unet_checkpoint does."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    layers, blocks = config["layers_per_block"], len(config["block_out_channels"])
    prefixes = []  # (diffusers prefix, LDM prefix, inner renames)
    for i in range(blocks):
        for j in range(layers):
            index = 1 + i * (layers + 1) + j
            prefixes += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0.", _UNET_RESNET),
                         (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1.", ())]
        prefixes.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{1 + i * (layers + 1) + layers}.0.op.", ()))
        upsampler_slot = 2 if "CrossAttn" in config["up_block_types"][i] else 1
        for j in range(layers + 1):
            index = i * (layers + 1) + j
            prefixes += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0.", _UNET_RESNET),
                         (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1.", ())]
        prefixes.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{i * (layers + 1) + layers}.{upsampler_slot}.conv.", ()))
    prefixes += [("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET), ("mid_block.attentions.0.", "middle_block.1.", ()),
                 ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    return _renamed(state, top, prefixes)


def vae_to_ldm(state: dict, config) -> dict:
    """A diffusers AutoencoderKL state dict in LDM names (attention projections as 1x1 convs):
    the inverse of diffusers' convert_ldm_vae_checkpoint."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    shortcut = (("conv_shortcut", "nin_shortcut"),)
    blocks = len(config["block_out_channels"])
    prefixes = []
    for i in range(blocks):
        for j in range(config["layers_per_block"] + 1):
            prefixes.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", shortcut))
            prefixes.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{blocks - 1 - i}.block.{j}.", shortcut))
        prefixes.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", ()))
        prefixes.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{blocks - 1 - i}.upsample.conv.", ()))
    for part in ("encoder", "decoder"):
        prefixes += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", shortcut),
                     (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", shortcut),
                     (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION)]
    renamed = _renamed(state, DIFFUSERS_TO_LDM_MAPPING["vae"], prefixes)
    # LDM's attention projections are 1x1 convolutions
    return {k: v[:, :, None, None] if ".mid.attn_1." in k and k.endswith("weight") and v.dim() == 2 else v for k, v in renamed.items()}


def _renamed(state: dict, top: dict, prefixes: list) -> dict:
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        for old, new, inner in prefixes:
            if key.startswith(old):
                rest = key[len(old):]
                for a, b in inner:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
                out[new + rest] = value
                break
        else:
            raise ValueError(f"write_checkpoint: no LDM name for {key}")
    return out
