"""Single-file Stable Diffusion checkpoints: the CompVis (LDM) layout AUTOMATIC1111, ComfyUI and
civitai use, one `.safetensors` or `.ckpt` holding the UNet (`model.diffusion_model.*`), the
VAE (`first_stage_model.*`) and the text encoder (`cond_stage_model.transformer.*`), or, for
SDXL (Stability's `sd_xl_base_1.0.safetensors`), its two text encoders: CLIP ViT-L
(`conditioner.embedders.0.transformer.*`) and OpenCLIP bigG in open_clip's names
(`conditioner.embedders.1.model.*`).

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
from .model_files import TOKENIZER_FILES, ModelUnavailable
from .offline import ARCHITECTURES, OFFLINE_MODELS, is_sdxl, write_offline_model

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
CLIP_L, OPEN_CLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."  # SDXL's two text encoders
REFINER_CLIP = "conditioner.embedders.0.model."  # the SDXL refiner's only text encoder (OpenCLIP)
CONV_IN = UNET + "input_blocks.0.0.weight"
LABEL_EMB = UNET + "label_emb.0.0.weight"  # SDXL's add_embedding.linear_1: (time dim, 6 time ids x 256 + pooled width)

# family -> the offline model whose configuration it has; recognised by its (UNet channels, text
# width, linear projections, added embedding width). SD 2.x is taken as 768x768 v-prediction, as SD 2.1 is.
FAMILIES = {"tiny": "tiny", "tiny-v": "tiny-v", "sd15": "sd15-random", "sd21": "sd21-random", "tiny-xl": "tiny-xl", "sdxl": "sdxl-random"}
# a family's CLIP tokenizers (tokenizer/, and tokenizer_2/ for SDXL), where this project cannot write them offline
TOKENIZER_SOURCES = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
# (text encoder folder, tokenizer folder, ARCHITECTURES key, class) of the text encoder, and of SDXL's second
_TEXT_ENCODERS = (("text_encoder", "tokenizer", "text", "CLIPTextModel"),
                  ("text_encoder_2", "tokenizer_2", "text_2", "CLIPTextModelWithProjection"))


def _signature(offline: str) -> tuple[int, int, bool, int | None]:
    unet = ARCHITECTURES[offline]["unet"]
    return (unet["block_out_channels"][0], unet["cross_attention_dim"], unet.get("use_linear_projection", False),
            unet.get("projection_class_embeddings_input_dim"))


def _describe(channels: int, width: int, linear: bool, added: int | None) -> str:
    return f"{channels} UNet channels, text width {width}{', linear' if linear else ''}{f', added embedding {added}' if added else ''}"


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
    known = ", ".join(f"{name} ({_describe(*_signature(offline))})" for name, offline in FAMILIES.items())
    if CONV_IN not in state:
        prefixes = sorted({key.split(".")[0] for key in state})[:6]
        raise ModelUnavailable(
            f"model: {path} is not a Stable Diffusion checkpoint: it has no {CONV_IN} (its tensors start with "
            f"{', '.join(prefixes) or 'nothing'}; a LoRA, a VAE or a text encoder alone is not a model); known: {known}"
        )
    unserved = _unserved(state)
    if unserved:
        raise ModelUnavailable(f"model: {path} is {unserved}, which sd-triton does not serve; known: {known}")
    channels = state[CONV_IN].shape[0]
    widths = {tensor.shape[1] for key, tensor in state.items() if key.startswith(UNET) and key.endswith("attn2.to_k.weight")}
    # any block's: SDXL's first level has no attention, so input_blocks.1.1 does not exist there
    linear = any(key.startswith(UNET) and key.endswith(".proj_in.weight") and tensor.dim() == 2 for key, tensor in state.items())
    added = state[LABEL_EMB].shape[1] if LABEL_EMB in state else None
    for name, offline in FAMILIES.items():
        family_channels, width, family_linear, family_added = _signature(offline)
        if channels == family_channels and widths == {width} and linear == family_linear and added == family_added:
            return name
    raise ModelUnavailable(
        f"model: {path} is a checkpoint of no family sd-triton serves: its UNet has {channels} channels, reads "
        f"text of width {', '.join(map(str, sorted(widths))) or 'none'}{' and projects linearly' if linear else ''}"
        f"{f', with an added embedding of width {added}' if added else ''}; known: {known}"
    )


def _unserved(state: dict) -> str | None:
    """What a checkpoint is where it is a kind no family here is, though its UNet may look like one's."""
    encoders = _encoder_prefixes(state)
    if LABEL_EMB in state and encoders != [CLIP_L, OPEN_CLIP]:
        what = "an SDXL refiner" if encoders == [REFINER_CLIP] else "a UNet with an added embedding (as SDXL's) but not SDXL's text encoders"
        return f"{what} (its text encoders: {', '.join(encoders) or 'none'}; SDXL base has {CLIP_L} and {OPEN_CLIP})"
    if "edm_mean" in state or "edm_std" in state:
        return "an EDM model (it has edm_mean/edm_std, as Playground v2.5)"
    if state[CONV_IN].shape[1] != 4:
        return f"a model whose UNet reads {state[CONV_IN].shape[1]} input channels (an inpainting or edit model; served ones read 4)"
    return None


def _encoder_prefixes(state: dict) -> list[str]:
    """The prefixes of the text encoders a checkpoint holds: cond_stage_model.transformer. (SD 1.x),
    .model. (SD 2.x), conditioner.embedders.N.transformer. or .model. (SDXL)."""
    depth = {"conditioner": 4, "cond_stage_model": 2}
    return sorted({".".join(key.split(".")[:depth[key.split(".")[0]]]) + "." for key in state if key.split(".")[0] in depth})


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
        pipeline = _load(path, _family_config(family, cache_dir, staging / "config"), family, state)
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
    """A directory of the family's configs and tokenizers (its weights, if any, are not read)."""
    offline = FAMILIES[family]
    if family not in TOKENIZER_SOURCES:  # its offline model's own tokenizers are the right ones, and they are small
        return write_offline_model(offline, cache_dir / offline)
    _write_configs(offline, scratch)
    folders = [tokenizer for _, tokenizer, _, _ in _text_encoders_of(offline)]
    repo = TOKENIZER_SOURCES[family]
    source = download(repo, cache_dir / "hub", progress=False, patterns=[*(f"{folder}/*" for folder in folders), "model_index.json"])
    for folder in folders:
        _check_tokenizer(source / folder, repo)
        shutil.copytree(source / folder, scratch / folder)
    return scratch


def _text_encoders_of(offline: str) -> tuple:
    return _TEXT_ENCODERS if is_sdxl(offline) else _TEXT_ENCODERS[:1]


def _check_tokenizer(folder: Path, repo: str) -> None:
    """transformers does not fail on a tokenizer folder that is missing (it builds a 2-token tokenizer)
    or lacks tokenizer_config.json (SDXL's second tokenizer then pads with the end token, not "!")."""
    vocabulary = () if (folder / "tokenizer.json").is_file() else TOKENIZER_FILES
    missing = [f"{folder.name}/{name}" for name in ("tokenizer_config.json", *vocabulary) if not (folder / name).is_file()]
    if missing:
        raise ModelUnavailable(f"model: cannot take the tokenizer from {repo}: it has no {', '.join(missing)}")


def _write_configs(offline: str, directory: Path) -> None:
    """The components' configs of an offline model, without building its weights."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from .offline import _SCHEDULER_CONFIG, _VAE_BLOCKS

    arch = ARCHITECTURES[offline]
    with torch.device("meta"):
        UNet2DConditionModel(**arch["unet"]).save_config(str(directory / "unet"))
        AutoencoderKL(latent_channels=4, **_VAE_BLOCKS, **arch["vae"]).save_config(str(directory / "vae"))
    for folder, _, key, kind in _text_encoders_of(offline):
        # no token ids of the tiny tokenizer: CLIPTextConfig's own pool at CLIP's end token (49407), as the real ones do
        config = CLIPTextConfig(max_position_embeddings=77, **arch[key])
        config.architectures = [kind]
        config.save_pretrained(str(directory / folder))
    settings = _SCHEDULER_CONFIG | arch.get("scheduler", {})
    # the scheduler each family ships, as offline._build writes it
    scheduler = EulerDiscreteScheduler.from_config(settings) if is_sdxl(offline) else PNDMScheduler(**settings)
    scheduler.save_config(str(directory / "scheduler"))
    (directory / "model_index.json").write_text(json.dumps(_SDXL_INDEX if is_sdxl(offline) else _SD_INDEX, indent=1))


_SD_INDEX = {
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
_SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "image_encoder": [None, None],
    "feature_extractor": [None, None],
}


def _load(path: Path, config: Path, family: str, state: dict):
    """diffusers' single-file loader, offline, in the checkpoint's own precision (SDXL's second text
    encoder built here: _text_encoder_2 says why)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    dtype = state[CONV_IN].dtype
    if not is_sdxl(FAMILIES[family]):
        return StableDiffusionPipeline.from_single_file(
            str(path), config=str(config), local_files_only=True, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
    return StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(config), local_files_only=True, dtype=dtype, add_watermarker=False,
        text_encoder_2=_text_encoder_2(state, config, dtype),
    )


def _text_encoder_2(state: dict, config: Path, dtype):
    """SDXL's second text encoder from the checkpoint's OpenCLIP tensors, every parameter from the file.

    diffusers 0.42's create_diffusers_clip_model_from_ldm gives it the *first* encoder's weights
    where both encoders are equally wide (tiny-xl: 32 and 32), and leaves what it does not assign
    on the meta device, silently; so it is built here, with diffusers' own converter, strictly."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    settings = CLIPTextConfig.from_pretrained(str(config), subfolder="text_encoder_2", local_files_only=True)
    with init_empty_weights():  # no random initialisation of weights the file replaces (695M for SDXL)
        model = CLIPTextModelWithProjection(settings)
    weights = convert_open_clip_checkpoint(model, state, prefix=OPEN_CLIP)
    if not hasattr(model, "text_model"):  # a transformers that flattened the class, as diffusers handles it
        weights = {key.removeprefix("text_model."): value for key, value in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.to(dtype).eval()


def write_checkpoint(name: str, path: str | Path, cache_dir: Path) -> Path:
    """Write offline model `name` as a single-file LDM checkpoint (safetensors), SDXL's layout for SDXL."""
    from safetensors.torch import save_file

    if name not in OFFLINE_MODELS:
        raise ValueError(f"model: {name!r} is not an offline model; choose one of {', '.join(OFFLINE_MODELS)}")
    source = write_offline_model(name, cache_dir / name)
    state = _sdxl_state(source) if is_sdxl(name) else _sd_state(source)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _sd_state(source: Path) -> dict:
    """An SD 1.x/2.x diffusers directory's tensors in LDM names."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(source), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(str(source), subfolder="vae")
    text = CLIPTextModel.from_pretrained(str(source), subfolder="text_encoder")
    state = {UNET + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    state |= {VAE + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    return state | clip_to_ldm(text.state_dict(), TEXT)


def _sdxl_state(source: Path) -> dict:
    """An SDXL diffusers directory's tensors in SDXL's single-file names, in the dtype they are stored
    in (diffusers, not told, loads fp16 weights as fp32 where transformers keeps them: a mixed file)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    dtype = _stored_dtype(source / "unet")  # write_offline_model stores a whole model in one dtype
    return sdxl_to_ldm(
        UNet2DConditionModel.from_pretrained(str(source), subfolder="unet", torch_dtype=dtype),
        AutoencoderKL.from_pretrained(str(source), subfolder="vae", torch_dtype=dtype),
        CLIPTextModel.from_pretrained(str(source), subfolder="text_encoder", dtype=dtype),
        CLIPTextModelWithProjection.from_pretrained(str(source), subfolder="text_encoder_2", dtype=dtype),
    )


def sdxl_to_ldm(unet, vae, text, text_2) -> dict:
    """An SDXL pipeline's modules as one state dict in the layout of Stability's sd_xl_base_1.0."""
    state = {UNET + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    state |= {VAE + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()}
    state |= clip_to_ldm(text.state_dict(), CLIP_L)
    return state | {OPEN_CLIP + k: v for k, v in open_clip_to_ldm(text_2.state_dict(), text_2.config).items()}


def _stored_dtype(folder: Path):
    """The dtype of a component's weights on disk (one tensor of its safetensors file read)."""
    from safetensors import safe_open

    with safe_open(str(next(folder.glob("*.safetensors"))), framework="pt") as weights:
        return weights.get_tensor(next(iter(weights.keys()))).dtype


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
    # SDXL's text_time add_embedding is label_emb.0 in LDM, as a class embedding would be
    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"] | DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]
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


def clip_to_ldm(state: dict, prefix: str) -> dict:
    """A CLIPTextModel state dict under `prefix` (SD's cond_stage_model.transformer., SDXL's first embedder):
    LDM keeps CLIP's keys under text_model. (transformers 5 dropped that level from its own)."""
    return {prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}


_OPEN_CLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                    ("self_attn", "attn"))


def open_clip_to_ldm(state: dict, config) -> dict:
    """A CLIPTextModelWithProjection state dict in open_clip's names (SDXL's second embedder): the
    inverse of diffusers' convert_open_clip_checkpoint, which splits attn.in_proj back into q, k, v by
    the rows of text_projection, and reads that transposed ((hidden, projection): open_clip computes
    x @ text_projection)."""
    import torch
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    top = {k.removeprefix("text_model."): v for k, v in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items()}
    prefixes = []
    for n in range(config.num_hidden_layers):
        layer = f"encoder.layers.{n}.self_attn."
        for part in ("weight", "bias"):  # q, k, v as one in_proj, stacked along the output rows
            state[f"{layer}in_proj_{part}"] = torch.cat([state.pop(f"{layer}{p}_proj.{part}") for p in "qkv"])
        prefixes.append((f"encoder.layers.{n}.", f"transformer.resblocks.{n}.", _OPEN_CLIP_LAYER))
    renamed = _renamed(state, top, prefixes)
    renamed["text_projection"] = renamed["text_projection"].T
    return renamed


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
