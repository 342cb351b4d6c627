"""Check one request's generation parameters against a deployment's limits.

Every error a user can cause is a `ValueError` whose message names the field, the
value and what is allowed; `model.py` turns it into an `INVALID_ARG` response.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any

from .config import SCHEDULER_NAMES, DeploymentConfig
from .family import ModelFamily

MAX_SEED = 2**63 - 1
RANDOM_SEED = -1


@dataclasses.dataclass(frozen=True)
class GenerationParams:
    """Checked parameters of one image."""

    seed: int
    steps: int
    guidance: float
    height: int
    width: int
    scheduler: str

    @property
    def uses_guidance(self) -> bool:
        """Classifier-free guidance runs only above 1, as in diffusers' pipeline."""
        return self.guidance > 1.0

    def group_key(self) -> tuple:
        """Requests with the same key run as one batch through the denoising loop."""
        return (self.steps, self.height, self.width, self.scheduler, self.uses_guidance)

    def record(self, model: str) -> dict[str, Any]:
        """Everything the image was made with, defaults included, under the client's names
        (the PARAMETERS output; sd-client writes it into the PNG so the file reproduces its image)."""
        return {
            "model": model,
            "seed": self.seed,
            "steps": self.steps,
            "guidance_scale": self.guidance,
            "height": self.height,
            "width": self.width,
            "scheduler": self.scheduler,
        }


def _as_float(field: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{field}: {value!r} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{field}: {value!r} is not a number") from None


def _as_int(field: str, value: Any) -> int:
    number = _as_float(field, value)
    if not number.is_integer():
        raise ValueError(f"{field}: {value!r} is not an integer")
    return int(value) if isinstance(value, int) else int(number)


def check_params(
    config: DeploymentConfig,
    family: ModelFamily,
    *,
    seed: Any = None,
    steps: Any = None,
    guidance: Any = None,
    height: Any = None,
    width: Any = None,
    scheduler: Any = None,
) -> GenerationParams:
    """Fill omitted parameters from `config` and check all of them.

    `family` (sd_backend.family) gives the model's own image side, used when neither the
    request nor the config sets a size, the smallest side its family is served at, and
    its own scheduler, for a default_scheduler of `auto`.
    """
    seed = RANDOM_SEED if seed is None else _as_int("SEED", seed)
    if seed == RANDOM_SEED:
        seed = secrets.randbelow(MAX_SEED + 1)
    elif not 0 <= seed <= MAX_SEED:
        raise ValueError(f"SEED: {seed} is out of range; allowed 0..{MAX_SEED}, or -1 for a random seed")

    steps = config.default_steps if steps is None else _as_int("STEPS", steps)
    if not 1 <= steps <= config.max_steps:
        raise ValueError(f"STEPS: {steps} is out of range; allowed 1..{config.max_steps}")

    guidance = config.default_guidance if guidance is None else _as_float("GUIDANCE_SCALE", guidance)
    if not math.isfinite(guidance):
        raise ValueError(f"GUIDANCE_SCALE: {guidance} is not a finite number; allowed 0..{config.max_guidance}")
    if not 0.0 <= guidance <= config.max_guidance:
        raise ValueError(f"GUIDANCE_SCALE: {guidance} is out of range; allowed 0..{config.max_guidance}")

    sizes = {}
    for field, value, default in (
        ("HEIGHT", height, config.default_height),
        ("WIDTH", width, config.default_width),
    ):
        size = (default or family.native_size) if value is None else _as_int(field, value)
        if size % 8 != 0 or not config.min_size <= size <= config.max_size:
            raise ValueError(
                f"{field}: {size} is not allowed; use a multiple of 8 from {config.min_size} to {config.max_size}"
            )
        if size < family.min_size:
            raise ValueError(
                f"{field}: {size} is below this {family.name} model's minimum of {family.min_size} "
                f"(half its native {family.native_size})"
            )
        sizes[field] = size

    if scheduler is None:
        scheduler = family.scheduler if config.default_scheduler == "auto" else config.default_scheduler
    if isinstance(scheduler, bytes):
        scheduler = scheduler.decode("utf-8", errors="replace")
    if not isinstance(scheduler, str):
        raise ValueError(f"SCHEDULER: {scheduler!r} is not text; allowed {', '.join(SCHEDULER_NAMES)}")
    name = scheduler.strip().lower()
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"SCHEDULER: {scheduler!r} is not known; allowed {', '.join(SCHEDULER_NAMES)}")

    return GenerationParams(seed, steps, guidance, sizes["HEIGHT"], sizes["WIDTH"], name)
