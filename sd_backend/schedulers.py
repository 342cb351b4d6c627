"""The schedulers a request may name, built from diffusers' own classes on the model's own
scheduler config: its prediction type (epsilon, v_prediction) and timestep spacing
(leading, trailing) carry over to every one of them."""

from __future__ import annotations

import inspect
from typing import Any

from .config import SCHEDULER_NAMES

# request name -> (diffusers class, settings over the model's scheduler config)
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    # latent consistency: few steps (1-8), for LCM-distilled weights; noise is drawn at each step but the last
    "lcm": ("LCMScheduler", {}),
}
assert tuple(_SCHEDULERS) == SCHEDULER_NAMES


def name_of(class_name: str) -> str | None:
    """The request name of diffusers' scheduler class `class_name` (None if it has none here)."""
    return next((name for name, (cls, _) in _SCHEDULERS.items() if cls == class_name), None)


def scheduler_class(name: str):
    import diffusers

    return getattr(diffusers, _SCHEDULERS[name][0])


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler (they keep per-run state) from the model's scheduler config."""
    class_name, overrides = _SCHEDULERS[name]
    return scheduler_class(name).from_config(base_config, **overrides)


def step_kwargs(scheduler, generators: list) -> dict[str, Any]:
    """Extra `step()` arguments, as diffusers' pipeline passes them (eta 0, the generators)."""
    accepted = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs
