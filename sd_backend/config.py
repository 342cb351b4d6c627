"""One configuration object for a deployment.

Filled from the `parameters` of a model's `config.pbtxt`, then from environment
variables (`SD_<FIELD>` in upper case: `SD_MODEL`, `SD_DTYPE`, ...), which win.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

SCHEDULER_NAMES = ("pndm", "ddim", "euler", "euler_a", "dpmpp_2m")
OPT_LEVELS = ("eager", "compile", "triton", "deepspeed")


def default_cache_dir() -> str:
    """Where offline models (`tiny`, `sd15-random`) are written."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "sd-triton")


@dataclasses.dataclass
class DeploymentConfig:
    """How one Stable Diffusion deployment loads and serves its models."""

    model: str = "tiny"
    """`tiny`, `sd15-random`, a diffusers-layout directory, or a Hugging Face hub id
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

    default_scheduler: str = "pndm"
    """Scheduler when a request leaves `SCHEDULER` out (PNDM is the SD 1.x default)."""

    min_size: int = 64
    """Smallest height or width a request may ask for, in pixels."""

    max_size: int = 1024
    """Largest height or width a request may ask for, in pixels."""

    max_steps: int = 150
    """Most denoising steps a request may ask for."""

    max_guidance: float = 50.0
    """Largest guidance scale a request may ask for."""

    batch_buckets: tuple[int, ...] = (1, 2, 4, 8)
    """Batch sizes the UNet loop is prepared for (CUDA-graph capture sizes on the GPU)."""

    opt_level: str = "eager"
    """`eager` (diffusers modules as they are), `compile` (torch.compile), `triton`
    (this project's kernels and whole-loop CUDA graphs), `deepspeed` (DeepSpeed-Inference
    kernel injection in the same whole-loop graphs; float16)."""

    kernels: str = "attention,group_norm,layer_norm,geglu"
    """On the `triton` level: which ops to patch with this project's kernels (comma list,
    empty for none); each kernel still runs only at shapes where it beat the torch op.
    `inductor` compiles the UNet with torch.compile (default mode) inside the graphs."""

    def __post_init__(self) -> None:
        self.default_scheduler = self.default_scheduler.lower()
        if self.default_scheduler not in SCHEDULER_NAMES:
            raise ValueError(
                f"default_scheduler: {self.default_scheduler!r} is not one of {', '.join(SCHEDULER_NAMES)}"
            )
        if self.opt_level not in OPT_LEVELS:
            raise ValueError(f"opt_level: {self.opt_level!r} is not one of {', '.join(OPT_LEVELS)}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"dtype: {self.dtype!r} is not one of auto, float32, float16, bfloat16")
        if not 8 <= self.min_size <= self.max_size:
            raise ValueError(f"min_size/max_size: {self.min_size}/{self.max_size} must satisfy 8 <= min <= max")
        if not self.batch_buckets or any(b < 1 for b in self.batch_buckets):
            raise ValueError(f"batch_buckets: {self.batch_buckets!r} must be positive batch sizes")
        self.batch_buckets = tuple(sorted(set(self.batch_buckets)))

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, str], environ: Mapping[str, str] | None = None
    ) -> "DeploymentConfig":
        """Build from `config.pbtxt` parameters (plain strings), then `SD_*` environment overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(f"SD_{field.name.upper()}", parameters.get(field.name))
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(field, raw)
        return cls(**values)

    @classmethod
    def from_triton_args(cls, args: Mapping[str, str]) -> "DeploymentConfig":
        """Build from the `args` Triton hands a Python-backend model's `initialize`."""
        model_config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
        return cls.from_parameters(parameters)


def _parse(field: dataclasses.Field, raw: str) -> Any:
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "str")
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind.startswith("tuple"):
            return tuple(int(x) for x in str(raw).replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"{field.name}: {raw!r} is not a valid {kind}") from None
    return str(raw)
