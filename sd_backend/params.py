"""Check one request's generation parameters against a deployment's limits.

Every error a user can cause is a `ValueError` whose message names the field, the
value and what is allowed; `model.py` turns it into an `INVALID_ARG` response.
"""

from __future__ import annotations

import dataclasses
import functools
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
    strength: float | None = None  # image-to-image: how much of INIT_IMAGE is noised away; None for text-to-image
    guidance_cutoff: float = 1.0  # the fraction of the loop's steps after which guidance stops (1: never)
    cache_interval: int = 1  # DeepCache: the whole UNet runs at every cache_interval-th step only (1: every step)
    inpaint: bool = False  # MASK_IMAGE given: the masked part of INIT_IMAGE is repainted
    lora: str = ""  # the deployment's lora_choices adapter the request chose ("" for none)
    lora_scale: float = 1.0  # its weight (1 without an adapter)

    @property
    def start_step(self) -> int:
        """The step image-to-image starts at, as diffusers' get_timesteps: steps - int(steps x strength)."""
        if self.strength is None:
            return 0
        return max(self.steps - min(int(self.steps * self.strength), self.steps), 0)

    @property
    def uses_guidance(self) -> bool:
        """Classifier-free guidance runs only above 1, as in diffusers' pipeline."""
        return self.guidance > 1.0

    def loop_key(self) -> tuple:
        """Requests with the same key run the same denoising loop (one captured loop per key and batch bucket)."""
        cutoff = self.guidance_cutoff if self.uses_guidance else 1.0
        return (
            self.steps, self.height, self.width, self.scheduler, self.uses_guidance, self.strength is not None, self.start_step,
            cutoff, self.cache_interval, self.inpaint,
        )

    def group_key(self) -> tuple:
        """Requests with the same key run as one batch: the same loop with the same adapter
        (a lora_choices switch rewrites the weights every loop reads)."""
        return self.loop_key() + (self.lora, self.lora_scale)

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
            "guidance_cutoff": self.guidance_cutoff,
            "cache_interval": self.cache_interval,
        } | ({"strength": self.strength} if self.strength is not None else {}) | (
            {"lora": self.lora, "lora_scale": self.lora_scale} if self.lora else {}
        )


def _as_float(field: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{field}: {value!r} is not a number")
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{field}: {value!r} is not a number") from None


def _decimal_of_fp32(value: float) -> float:
    """The shortest decimal an FP32 input stands for: STRENGTH arrives as FP32, and 0.7 there is
    0.69999999, whose int(10 x s) is 6 where diffusers, given 0.7, takes 7 steps."""
    import numpy as np

    if not math.isfinite(value):
        return value
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


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
    strength: Any = None,
    guidance_cutoff: Any = None,
    cache_interval: Any = None,
    image_size: tuple[int, int] | None = None,
    mask_size: tuple[int, int] | None = None,
    inpaint: bool | None = None,
    lora: Any = None,
    lora_scale: Any = None,
) -> GenerationParams:
    """Fill omitted parameters from `config` and check all of them.

    `family` (sd_backend.family) gives the model's own image side, used when neither the
    request nor the config sets a size, the smallest side its family is served at, and
    its own scheduler, for a default_scheduler of `auto`. `image_size` (height, width) is
    INIT_IMAGE's for image-to-image: the size of the result, which HEIGHT and WIDTH, when
    given, must equal; `strength` is then required (0 < STRENGTH <= 1). `mask_size` is
    MASK_IMAGE's (inpainting), which must equal INIT_IMAGE's; `inpaint` says whether the
    request inpaints where the caller knows without the mask at hand (None: not known here,
    as in the text encoder), which an inpainting UNet requires.
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
    for index, (field, value, default) in enumerate((
        ("HEIGHT", height, config.default_height),
        ("WIDTH", width, config.default_width),
    )):
        given = None if value is None else _as_int(field, value)
        if image_size is not None:
            if given is not None and given != image_size[index]:
                raise ValueError(
                    f"{field}: {given} does not match INIT_IMAGE's {image_size[0]}x{image_size[1]} (height x width); "
                    "leave HEIGHT and WIDTH out or send an image of that size"
                )
            given = image_size[index]
            field = f"INIT_IMAGE's {field.lower()}"  # what a size error is about
        size = (default or family.native_size) if given is None else given
        if size % 8 != 0 or not config.min_size <= size <= config.max_size:
            raise ValueError(
                f"{field}: {size} is not allowed; use a multiple of 8 from {config.min_size} to {config.max_size}"
            )
        if size < family.min_size:
            raise ValueError(
                f"{field}: {size} is below this {family.name} model's minimum of {family.min_size} "
                f"(half its native {family.native_size})"
            )
        sizes[index] = size

    if scheduler is None:
        scheduler = family.scheduler if config.default_scheduler == "auto" else config.default_scheduler
    if isinstance(scheduler, bytes):
        scheduler = scheduler.decode("utf-8", errors="replace")
    if not isinstance(scheduler, str):
        raise ValueError(f"SCHEDULER: {scheduler!r} is not text; allowed {', '.join(SCHEDULER_NAMES)}")
    name = scheduler.strip().lower()
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"SCHEDULER: {scheduler!r} is not known; allowed {', '.join(SCHEDULER_NAMES)}")

    if mask_size is not None:
        inpaint = True
    if mask_size is not None and image_size is not None and tuple(mask_size) != tuple(image_size):
        raise ValueError(
            f"MASK_IMAGE: {mask_size[0]}x{mask_size[1]} does not match INIT_IMAGE's {image_size[0]}x{image_size[1]} "
            "(height x width); send a mask of the image's size (UINT8 [height, width], 255 = repaint)"
        )
    if family.inpainting_unet and inpaint is False:
        raise ValueError(
            "MASK_IMAGE: missing; this model's UNet is an inpainting UNet (9 input channels): send INIT_IMAGE and "
            "MASK_IMAGE to the stable_diffusion_inpaint ensemble"
        )
    if strength is None and image_size is not None:
        strength = config.default_inpaint_strength if inpaint else config.default_strength
    if strength is not None:
        strength = _decimal_of_fp32(_as_float("STRENGTH", strength))
        if not (math.isfinite(strength) and 0.0 < strength <= 1.0):
            raise ValueError(f"STRENGTH: {strength} is out of range; allowed above 0 up to 1 (1 noises INIT_IMAGE away entirely)")
        if int(steps * strength) < 1:
            raise ValueError(
                f"STRENGTH: {strength} with STEPS {steps} denoises int({steps} x {strength}) = 0 steps; "
                f"use STRENGTH of at least {1 / steps:.4g} or more STEPS"
            )
    cutoff = config.default_guidance_cutoff if guidance_cutoff is None else _decimal_of_fp32(_as_float("GUIDANCE_CUTOFF", guidance_cutoff))
    if not (math.isfinite(cutoff) and 0.0 <= cutoff <= 1.0):
        raise ValueError(
            f"GUIDANCE_CUTOFF: {cutoff} is out of range; allowed 0 to 1 (the fraction of the steps after which guidance stops; 1: never)"
        )
    if cache_interval is None:  # the deployment's default, at most every step of a short loop
        interval = min(config.default_cache_interval, steps)
    else:
        interval = _as_int("CACHE_INTERVAL", cache_interval)
        if not 1 <= interval <= steps:
            raise ValueError(
                f"CACHE_INTERVAL: {interval} is out of range; allowed 1 to STEPS ({steps}): the whole UNet runs at every "
                "CACHE_INTERVAL-th step, its shallow branch in between (1: every step, exact)"
            )
    adapter, weight = _check_lora(config, lora, lora_scale)
    return GenerationParams(seed, steps, guidance, sizes[0], sizes[1], name, strength, cutoff, interval, bool(inpaint), adapter, weight)


MAX_LORA_SCALE = 4.0


@functools.lru_cache(maxsize=8)
def _lora_choices(entries: tuple[str, ...]) -> dict:
    from .lora_choices import parse_lora_choices

    return parse_lora_choices(entries)


def _check_lora(config: DeploymentConfig, lora: Any, lora_scale: Any) -> tuple[str, float]:
    """(LORA, LORA_SCALE) checked against the deployment's lora_choices; ("", 1.0) for none.
    LORA_SCALE without LORA (or with LORA "") weights nothing and is ignored."""
    if isinstance(lora, bytes):
        lora = lora.decode("utf-8", errors="replace")
    if lora is None or lora == "":
        return "", 1.0
    if not isinstance(lora, str):
        raise ValueError(f"LORA: {lora!r} is not text; send an adapter's name")
    choices = _lora_choices(tuple(config.lora_choices))
    if lora not in choices:
        known = ", ".join(sorted(choices)) or "none (the deployment sets no lora_choices)"
        raise ValueError(f"LORA: {lora!r} is not one of this deployment's adapters; known: {known}")
    scale = choices[lora].scale if lora_scale is None else _decimal_of_fp32(_as_float("LORA_SCALE", lora_scale))
    if not (math.isfinite(scale) and -MAX_LORA_SCALE <= scale <= MAX_LORA_SCALE):
        raise ValueError(f"LORA_SCALE: {scale} is out of range; allowed -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g} (1: the adapter as trained)")
    return lora, scale
