"""One configuration object for a deployment, and the one place it is written.

A deployment's settings live in `deployment.toml` at the root of its model repository;
every model of the repository and the launcher read that file (`DeploymentConfig.load`),
then environment variables `SD_<FIELD>` (`SD_MODEL`, `SD_OPT_LEVEL`, ...; the fast path's
fields as `SD_FAST_PATH_<FIELD>`), which win. `config.pbtxt` holds only what Triton itself
reads; `sd_backend.repository` checks its batch sizes against these settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

SCHEDULER_NAMES = ("pndm", "ddim", "euler", "euler_a", "dpmpp_2m", "lcm")
OPT_LEVELS = ("eager", "compile", "triton", "deepspeed")
KERNEL_OPS = ("attention", "group_norm", "layer_norm", "geglu")
DISPATCH_MODES = ("measure", "always", "never")
DEPLOYMENT_FILE = "deployment.toml"


def default_cache_dir() -> str:
    """Where offline models (`tiny`, `sd15-random`) are written."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "sd-triton")


@dataclasses.dataclass(frozen=True)
class FastPathOptions:
    """How the `triton` level builds its fast path. Read once at load and handed to the
    patched modules and the captured loops as an argument. The defaults are the fastest
    measured (benchmarks/NOTES.md); each switch exists so that one process can time a part
    with and without it (benchmarks/bench_e2e.py's suffixes)."""

    kernels: tuple[str, ...] = KERNEL_OPS
    """Ops patched with this project's kernels (a subset of attention, group_norm,
    layer_norm, geglu; empty for the whole-loop graphs alone). `inductor` instead compiles
    the UNet with torch.compile (default mode) inside the graphs."""

    kernel_dispatch: str = "measure"
    """`measure`: the first time a patched module meets a shape (at warm-up, before any
    capture), its kernel and the torch op it replaces are timed by CUDA-graph replay and the
    faster is kept for that shape. `always`: the kernel wherever it applies. `never`: torch's
    ops (with fuse_projections off too, the patched model computes what diffusers' does)."""

    keep_layout: bool = True
    """Transformer blocks keep channels-last activations: the attention kernel writes the
    rows to_out reads and proj_in/proj_out run as GEMMs on the pixel rows. False brings back
    diffusers' transposing copies."""

    fuse_projections: bool = True
    """Self-attention's q, k, v (and cross-attention's k, v) as one GEMM."""

    loop_constants: bool = True
    """Inside a captured loop, the time embedding of every step, each ResNet block's bias
    plus time projection, and the cross-attention keys and values run once per loop
    (sd_backend.fast.step_constants), not at every step."""

    step_graphs: bool = True
    """The captured loop is one CUDA graph per step, replayed back to back: a request that
    asks for progress (the streaming model's) gets a report after every step from the same
    graphs, and the ensemble's requests replay them without waiting. False: the whole loop as
    one graph, and progress requests run the loop step by step without graphs."""

    unet_graph: bool = True
    """With step_graphs and loop_constants, a loop's UNet call is recorded once, as its own
    CUDA graph, and every step replays it between its scheduler work's two graphs
    (sd_backend.fast.unet_graph): a loop records in about a fiftieth of the time and keeps
    one UNet's graph, not one per step. False records the UNet into every step's graph."""

    cudnn_search: bool = False
    """True: cuDNN times its algorithms for each new convolution shape (`cudnn.benchmark`)
    the first time it meets it, at warm-up, and keeps the fastest for the process. False
    (the default): its heuristics' choice, untimed. Measured on an H200 (benchmarks/NOTES.md,
    session 13): the same speed at batch 1 and 8, half the warm-up, about 1 GB more reserved
    memory, and the same choice in every process, so a restart gives the same images as the
    run before it (the search's timings differ from process to process)."""

    split_head_dim: bool = True
    """Attention head_dim 80 and 160 as two exact power-of-two column blocks (64 + 16,
    128 + 32) instead of one padded block (128, 256)."""

    optimize_vae: bool = True
    """The VAE decoder gets the kernels and channels-last too."""

    group_norm_looped: bool = False
    """GroupNorms too large for one tile run as one program per group (statistics, then
    normalize, in one launch: the second read of a group from L2) where the batch has enough
    groups to fill the GPU, instead of a statistics kernel and a normalize kernel
    (sd_kernels.group_norm's schedule "auto" against "split"). The same output to the bit.
    Off: on an H200 it is 3-13% faster at 32² and 16² but 14-22% slower at 64², where the
    UNet's largest GroupNorms are (benchmarks/NOTES.md, session 14)."""

    geglu_linear: bool = False
    """The transformer feed-forward's GEGLU projection and gate as one GEMM whose epilogue is
    the gate (sd_kernels.geglu_linear: the (M, 2F) projection never written), where the
    dispatch times it faster than cuBLAS's GEMM and the gate kernel. Results differ from
    the two ops' by about one fp16 rounding of the projection (the kernel keeps it in fp32).
    Off: on an H200 its GEMM beats cuBLAS + the gate only at 64² (benchmarks/NOTES.md,
    session 14), and its effect on the final latents is not yet checked there."""

    compile_workers: int = 8
    """Above 1: an attention shape met for the first time with no autotuning results on disk
    (a cold start) gets its candidate block sizes compiled by this many threads before the
    autotuner times them, instead of one after another inside its timing loop
    (sd_kernels._autotune). The same kernels and the same choice; only the compile order
    changes. On an H200 8 threads cut the unet's cold warm-up from 41 to 24 s and a served
    cold start from 113.4 to 68.7 s, with the same images/s (benchmarks/NOTES.md, sessions
    14-15). 0 or 1: Triton's serial path."""

    image_to_image_strengths: tuple[float, ...] = ()
    """Image-to-image strengths whose loops are captured at load too (the default request's
    steps, size and scheduler, at every batch bucket): a request whose strength gives the same
    start step (int(steps x (1 - strength))) replays those graphs; other image-to-image
    requests run the eager loop. Each adds its capture time to the start-up and its graphs'
    memory."""

    def __post_init__(self) -> None:
        if self.compile_workers < 0:
            raise ValueError(f"fast_path.compile_workers: {self.compile_workers}; allowed: 0 or more")
        bad = [s for s in self.image_to_image_strengths if not 0.0 < s <= 1.0]
        if bad:
            raise ValueError(f"fast_path.image_to_image_strengths: {bad} out of range; allowed above 0 up to 1")
        unknown = [op for op in self.kernels if op not in KERNEL_OPS + ("inductor",)]
        if unknown:
            raise ValueError(f"fast_path.kernels: {unknown} not known; allowed: {', '.join(KERNEL_OPS)}, inductor")
        if self.kernel_dispatch not in DISPATCH_MODES:
            raise ValueError(
                f"fast_path.kernel_dispatch: {self.kernel_dispatch!r} is not one of {', '.join(DISPATCH_MODES)}"
            )


@dataclasses.dataclass
class DeploymentConfig:
    """How one Stable Diffusion deployment loads and serves its models."""

    model: str = "tiny"
    """`tiny`, `sd15-random`, `tiny-v`, `sd21-random` (sd_backend.offline), a diffusers-layout
    directory, a single-file checkpoint, or a Hugging Face hub id
    (`stable-diffusion-v1-5/stable-diffusion-v1-5`; token from `HF_TOKEN`)."""

    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)
    """Directory the offline models are written to on first use."""

    device: str = "auto"
    """`auto` (the instance's GPU when there is one, else the CPU), `cpu`, `cuda`, `cuda:N`."""

    dtype: str = "auto"
    """`auto` (float16 on a GPU, float32 on the CPU), `float32`, `float16`, `bfloat16`."""

    default_steps: int = 50
    """Denoising steps when a request leaves `STEPS` out."""

    default_guidance: float = 7.5
    """Classifier-free guidance scale when a request leaves `GUIDANCE_SCALE` out."""

    default_height: int = 0
    """Image height when a request leaves `HEIGHT` out; 0 takes the model's native size."""

    default_width: int = 0
    """Image width when a request leaves `WIDTH` out; 0 takes the model's native size."""

    default_scheduler: str = "auto"
    """Scheduler when a request leaves `SCHEDULER` out; `auto` takes the one the model's own
    scheduler config names, as diffusers' pipeline does (PNDM for SD 1.5, Euler for SDXL;
    PNDM where it names one not served here)."""

    default_guidance_cutoff: float = 1.0
    """Classifier-free guidance stops after this fraction of the steps when a request leaves
    `GUIDANCE_CUTOFF` out: diffusers' SDCFGCutoffCallback(cutoff_step_ratio) (the step at
    int(steps x fraction) is the last guided one). 1 never stops it: exact mode, the
    default; below 1 trades fidelity for speed (the steps after it run the UNet at half
    the batch), so it is opt-in."""

    default_cache_interval: int = 1
    """DeepCache (Ma et al., CVPR 2024) when a request leaves `CACHE_INTERVAL` out: the whole
    UNet runs at every N-th step only, and in between only its shallow branch on the deep
    features the last full step left (DeepCache's DeepCacheSDHelper, uniform). 1 runs it
    at every step: exact mode, the default; above 1 trades fidelity for speed: opt-in."""

    cache_branch: int = 0
    """DeepCache's cache_branch_id for requests with CACHE_INTERVAL above 1: how shallow the
    branch recomputed between full steps is (0, the shallowest, skips the most; branch k is
    layer k % 3 of block k // 3, as DeepCacheSDHelper numbers them). Checked against the
    UNet at load."""

    lora: tuple[str, ...] = ()
    """LoRA adapters fused into the weights at load, each weighted by its scale:
    `"file.safetensors"` or `"file.safetensors:scale"` (scale 1 when left out), diffusers/PEFT
    or kohya format (sd_backend.lora). Every request gets them, at no cost per request."""

    lora_choices: tuple[str, ...] = ()
    """LoRA adapters a request chooses by name (`LORA`, weighted by `LORA_SCALE`), all loaded
    at load: `"name=file.safetensors"` (or a file, named by its stem), optionally followed by
    `:scale`, the scale a request that leaves LORA_SCALE out gets (1 when left out). A batch
    runs one adapter at a time; switching rewrites the adapted weights in place
    (sd_backend.lora_choices), so the captured loops stay valid. Not on the `deepspeed` level."""

    default_strength: float = 0.8
    """Image-to-image: how much of INIT_IMAGE is noised away when a request leaves
    `STRENGTH` out (diffusers' default); the loop runs int(steps x strength) steps."""

    default_inpaint_strength: float = 1.0
    """Inpainting: STRENGTH when a request leaves it out (diffusers' inpainting default: the
    masked part starts from pure noise)."""

    min_size: int = 64
    """Smallest height or width a request may ask for, in pixels."""

    max_size: int = 1024
    """Largest height or width a request may ask for, in pixels."""

    max_steps: int = 150
    """Most denoising steps a request may ask for."""

    max_guidance: float = 50.0
    """Largest guidance scale a request may ask for."""

    max_prompt_bytes: int = 8192
    """Longest PROMPT or NEGATIVE_PROMPT a request may send, in UTF-8 bytes. CLIP reads
    77 tokens (a few hundred characters); a longer prompt is truncated and the tokens
    dropped reported. Checked before any work, and it sizes the server's message limits."""

    batch_buckets: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    """Batch sizes the UNet loop is prepared for (CUDA-graph capture sizes on the GPU);
    the largest is every model's max_batch_size and its batcher's preferred_batch_size."""

    opt_level: str = "eager"
    """`eager` (diffusers modules as they are), `compile` (torch.compile), `triton`
    (this project's kernels and whole-loop CUDA graphs), `deepspeed` (DeepSpeed-Inference
    kernel injection in the same whole-loop graphs; float16)."""

    fast_path: FastPathOptions = dataclasses.field(default_factory=FastPathOptions)
    """The `triton` level's options (the `[fast_path]` table of deployment.toml)."""

    def __post_init__(self) -> None:
        self.default_scheduler = self.default_scheduler.lower()
        if self.default_scheduler not in SCHEDULER_NAMES + ("auto",):
            raise ValueError(
                f"default_scheduler: {self.default_scheduler!r} is not one of auto, {', '.join(SCHEDULER_NAMES)}"
            )
        if not 0.0 <= self.default_guidance_cutoff <= 1.0:
            raise ValueError(f"default_guidance_cutoff: {self.default_guidance_cutoff} is out of range; allowed 0 to 1")
        if self.lora:
            from .lora import parse_loras

            parse_loras(self.lora)  # a missing file fails the deployment here, not in a model's load
        if self.lora_choices:
            from .lora_choices import parse_lora_choices

            parse_lora_choices(self.lora_choices)
            if self.opt_level == "deepspeed":
                raise ValueError("lora_choices: not served on the deepspeed level (its kernels hold their own copy of the weights)")
        if self.default_cache_interval < 1:
            raise ValueError(f"default_cache_interval: {self.default_cache_interval} is out of range; allowed 1 or more (1: off)")
        if self.cache_branch < 0:
            raise ValueError(f"cache_branch: {self.cache_branch} is out of range; allowed 0 or more")
        for name in ("default_strength", "default_inpaint_strength"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: {getattr(self, name)} is out of range; allowed above 0 up to 1")
        if self.opt_level not in OPT_LEVELS:
            raise ValueError(f"opt_level: {self.opt_level!r} is not one of {', '.join(OPT_LEVELS)}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype: {self.dtype!r} is not one of auto, float32, float16, bfloat16")
        if not 8 <= self.min_size <= self.max_size:
            raise ValueError(f"min_size/max_size: {self.min_size}/{self.max_size} must satisfy 8 <= min <= max")
        if self.max_prompt_bytes < 1:
            raise ValueError(f"max_prompt_bytes: {self.max_prompt_bytes} must be at least 1")
        if not self.batch_buckets or any(b < 1 for b in self.batch_buckets):
            raise ValueError(f"batch_buckets: {self.batch_buckets!r} must be positive batch sizes")
        self.batch_buckets = tuple(sorted(set(self.batch_buckets)))

    @property
    def model_name(self) -> str:
        """The model as an image's metadata names it: an offline name or hub id as given, a
        directory by its last component (the server's paths stay on the server)."""
        path = Path(self.model).expanduser()
        return path.name if path.is_absolute() or path.is_dir() else self.model

    @classmethod
    def load(cls, repository: str | Path | None = None, environ: Mapping[str, str] | None = None) -> "DeploymentConfig":
        """The deployment of a model repository: its deployment.toml (when there is one),
        then `SD_*` environment variables, which win."""
        settings: dict[str, Any] = {}
        if repository is not None:
            path = Path(repository) / DEPLOYMENT_FILE
            if path.is_file():
                settings = read_deployment_file(path)
        return cls.from_settings(settings, os.environ if environ is None else environ)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> "DeploymentConfig":
        """From a mapping shaped like deployment.toml (values typed or strings), then `SD_*` overrides."""
        environ = {} if environ is None else environ
        _check_known(cls, settings, f"{DEPLOYMENT_FILE}: unknown settings")
        values = _values(cls, settings, environ, "SD_")
        fast = settings.get("fast_path", {})
        if not isinstance(fast, Mapping):
            raise ValueError(f"fast_path: {fast!r} is not a table of options")
        _check_known(FastPathOptions, fast, "fast_path: unknown options")
        values["fast_path"] = FastPathOptions(**_values(FastPathOptions, fast, environ, "SD_FAST_PATH_"))
        return cls(**values)

    @classmethod
    def from_triton_args(cls, args: Mapping[str, str]) -> "DeploymentConfig":
        """The deployment of the model Triton hands a Python-backend `initialize`: the
        deployment.toml of its repository. A deployment setting in the model's own
        config.pbtxt parameters is an error: it would hold for that model alone."""
        model_config = json.loads(args["model_config"])
        named = sorted(set(model_config.get("parameters", {})) & {f.name for f in dataclasses.fields(cls)})
        if named:
            raise ValueError(
                f"{model_config.get('name')}/config.pbtxt sets {named} as parameters; deployment settings belong "
                f"in {DEPLOYMENT_FILE} at the repository's root, which every model reads"
            )
        return cls.load(Path(args["model_repository"]).parent)


def read_deployment_file(path: Path) -> dict[str, Any]:
    """deployment.toml as a dict; ValueError naming the file for a syntax error."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10 (NVIDIA's 24.10 container)
        import tomli as tomllib
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: {err}") from None


def _check_known(cls, settings: Mapping[str, Any], what: str) -> None:
    """ValueError naming the keys of `settings` that are no field of `cls`, and the fields."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ValueError(f"{what} {unknown}; known: {', '.join(names)}")


def _values(cls, settings: Mapping[str, Any], environ: Mapping[str, str], prefix: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name == "fast_path":
            continue
        raw = environ.get(f"{prefix}{field.name.upper()}", settings.get(field.name))
        if raw is None or raw == "":
            continue
        values[field.name] = _parse(field, raw)
    return values


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _parse(field: dataclasses.Field, raw: Any) -> Any:
    """A setting as its field's type, from TOML's typed value or an environment string."""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "str")
    try:
        if kind == "bool":
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in _TRUE + _FALSE:
                return str(raw).lower() in _TRUE
            raise ValueError
        if isinstance(raw, bool):
            raise ValueError
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            if isinstance(raw, str) and raw.strip().lower() == "none":  # an empty list from the environment
                return ()
            items = raw if isinstance(raw, (list, tuple)) else [x for x in str(raw).replace(" ", "").split(",") if x]
            element = int if "int" in kind else float if "float" in kind else str
            return tuple(element(x) for x in items)
    except (TypeError, ValueError):
        raise ValueError(f"{field.name}: {raw!r} is not a valid {kind}") from None
    return str(raw)
