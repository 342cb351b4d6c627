"""Turning Triton Python-backend requests into stage arguments and results into responses.

Shared by the three `model.py` adapters; `pb` is the `triton_python_backend_utils`
module, passed in because it only exists inside the backend stub.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

log = logging.getLogger("sd_backend")


def read_text(pb, request, name: str, required: bool = False, max_bytes: int | None = None) -> str | None:
    """A BYTES input of one element as text; ValueError when absent but required, longer
    than `max_bytes` (checked before decoding), or not UTF-8."""
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        if required:
            raise ValueError(f"{name}: missing; a text string is required")
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise ValueError(f"{name}: {values.size} elements given; exactly one string is allowed")
    raw = values[0]
    size = len(raw.encode("utf-8") if isinstance(raw, str) else raw)
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{name}: {size} bytes; allowed at most {max_bytes} bytes (the deployment's max_prompt_bytes)")
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{name}: not valid UTF-8 ({err.reason} at byte {err.start}); send UTF-8 text") from None


def read_prompts(pb, request, max_bytes: int) -> tuple[str, str | None]:
    """(PROMPT, NEGATIVE_PROMPT or None when absent): PROMPT is required, both at most `max_bytes` long.
    Triton declares PROMPT optional: an ensemble input it calls required but a request leaves
    out deadlocks the ensemble instead of failing it (2.51), so the check is here."""
    prompt = read_text(pb, request, "PROMPT", required=True, max_bytes=max_bytes)
    negative = read_text(pb, request, "NEGATIVE_PROMPT", max_bytes=max_bytes)
    return prompt, negative


def _read_numpy(pb, request, name: str):
    """An input of one request as a numpy array (copied from the GPU where it lives there), or None when absent."""
    tensor = pb.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return tensor.as_numpy() if tensor.is_cpu() else to_torch(tensor).cpu().numpy()


def _read_picture(pb, request, name: str, rank: int, channels: int | None, allowed: str):
    """An image-like input without the batch dimension of its one request, of `rank` dimensions
    (the last `channels` wide where given); ValueError naming `allowed` otherwise, None when absent."""
    array = _read_numpy(pb, request, name)
    if array is None:
        return None
    if array.ndim == rank + 1 and array.shape[0] == 1:  # the batch dimension of one request
        array = array[0]
    if array.ndim != rank or (channels is not None and array.shape[-1] != channels):
        raise ValueError(f"{name}: shape {list(array.shape)}; allowed {allowed}")
    return array


def read_image(pb, request, name: str = "INIT_IMAGE"):
    """A UINT8 (height, width, 3) RGB image input as a numpy array; ValueError when absent
    (Triton declares it optional: see read_prompts) or of another shape. Triton itself
    refuses another dtype or rank, naming the input."""
    image = _read_picture(pb, request, name, 3, 3, "[height, width, 3] (RGB)")
    if image is None:
        raise ValueError(f"{name}: missing; an RGB image (UINT8 [height, width, 3]) is required")
    return image


def read_mask(pb, request, name: str = "MASK_IMAGE"):
    """A UINT8 (height, width) mask input as a numpy array (255 = repaint), or None when absent."""
    return _read_picture(pb, request, name, 2, None, "[height, width] (255 = repaint)")


def read_optional(pb, request, name: str):
    """An optional tensor input of one request as a torch tensor without its batch dimension, or None."""
    tensor = pb.get_input_tensor_by_name(request, name)
    return None if tensor is None else to_torch(tensor)[0]


def read_scalar(pb, request, name: str) -> Any:
    """A numeric input of one element as a Python number, or None when absent."""
    values = _read_numpy(pb, request, name)
    if values is None:
        return None
    values = values.reshape(-1)
    if values.size != 1:
        raise ValueError(f"{name}: {values.size} elements given; exactly one value is allowed")
    return values[0].item()


def read_preview_every(pb, request, steps: int) -> int:
    """PREVIEW_EVERY (0, no previews, when absent); ValueError outside 0..steps."""
    every = read_scalar(pb, request, "PREVIEW_EVERY") or 0
    if not 0 <= every <= steps:
        raise ValueError(f"PREVIEW_EVERY: {every} is out of range; allowed 0 (no previews) to STEPS ({steps})")
    return int(every)


def read_progress(pb, request, steps: int):
    """The streaming model's request's sd_backend.streaming.JobProgress, connected to the
    channel PROGRESS_TOKEN names (with PREVIEW_EVERY), or None without a token; ValueError
    for a bad token, a PREVIEW_EVERY out of range, or no stream listening."""
    from .progress_channel import Reporter
    from .streaming import JobProgress

    token = read_text(pb, request, "PROGRESS_TOKEN")
    if token is None:
        return None
    every = read_preview_every(pb, request, steps)
    try:
        return JobProgress(Reporter(token), every)
    except OSError as err:
        raise ValueError(f"PROGRESS_TOKEN: no streaming request listens on it ({err})") from None


# the text encoder's outputs the UNet is conditioned on, in DenoiseJob's field order
CONDITIONING = ("PROMPT_EMBEDS", "NEGATIVE_EMBEDS", "POOLED_EMBEDS", "NEGATIVE_POOLED_EMBEDS")

# the ensemble's numeric generation inputs and the keyword each has in check_params
GENERATION_NUMBERS = {
    "SEED": "seed", "STEPS": "steps", "GUIDANCE_SCALE": "guidance", "HEIGHT": "height", "WIDTH": "width", "STRENGTH": "strength",
    "GUIDANCE_CUTOFF": "guidance_cutoff", "CACHE_INTERVAL": "cache_interval", "LORA_SCALE": "lora_scale",
}
# and its text ones
GENERATION_TEXTS = {"SCHEDULER": "scheduler", "LORA": "lora"}


def read_generation_inputs(pb, request) -> dict[str, Any]:
    """GENERATION_NUMBERS' and GENERATION_TEXTS' inputs as check_params keywords (None where
    absent, so the deployment default applies)."""
    raw = {arg: read_scalar(pb, request, name) for name, arg in GENERATION_NUMBERS.items()}
    raw |= {arg: read_text(pb, request, name) for name, arg in GENERATION_TEXTS.items()}
    return raw


def to_torch(tensor):
    """A Triton tensor as a torch tensor, on whatever device it lives on (no numpy copy)."""
    import torch

    return torch.from_dlpack(tensor.to_dlpack())


def from_torch(pb, name: str, value):
    """A torch tensor as a Triton output tensor, by DLPack (stays on its device)."""
    import torch.utils.dlpack

    return pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))


def invalid(pb, error: Exception):
    """An INVALID_ARG response for a user error."""
    return pb.InferenceResponse(error=pb.TritonError(str(error), pb.TritonError.INVALID_ARG))


def internal(pb, error: Exception):
    return pb.InferenceResponse(error=pb.TritonError(f"{type(error).__name__}: {error}"))


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: torch's OutOfMemoryError (CUDA), Python's MemoryError, or the
    RuntimeError torch's CPU allocator raises."""
    import torch

    if isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


def out_of_memory(pb, error: BaseException):
    """An UNAVAILABLE response for a batch that ran out of memory.

    Python backend 2.51 has no RESOURCE_EXHAUSTED. UNAVAILABLE (gRPC UNAVAILABLE, HTTP 503)
    says "not now, retry", which fits: the same request can succeed alone, later, or on
    another replica. INTERNAL would say the server is broken; INVALID_ARG that the request is.
    """
    return pb.InferenceResponse(
        error=pb.TritonError(
            f"out of memory: {type(error).__name__}: {error}; retry later or ask for a smaller image",
            pb.TritonError.UNAVAILABLE,
        )
    )


def _release_cached_memory() -> None:
    """After an out-of-memory error, give the allocator's cached blocks back for the next batch."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_response(pb, error: Exception):
    """The response for a failed request: INVALID_ARG for a ValueError (the user's input),
    UNAVAILABLE for out of memory (after giving cached memory back), INTERNAL otherwise."""
    if isinstance(error, ValueError):
        return invalid(pb, error)
    if is_out_of_memory(error):
        _release_cached_memory()
        return out_of_memory(pb, error)
    return internal(pb, error)


def respond(pb, requests: Sequence, parse: Callable, run: Callable, reply: Callable) -> list:
    """One response per request: `parse` each (ValueError fails that request alone),
    `run` the parsed ones as one batch, `reply` turns each result into a response."""
    responses: list = [None] * len(requests)
    parsed, where = [], []
    for i, request in enumerate(requests):
        try:
            parsed.append(parse(request))
            where.append(i)
        except ValueError as err:
            responses[i] = invalid(pb, err)
    if parsed:
        try:
            results = run(parsed)
        except Exception as err:  # noqa: BLE001 - the server must answer every request
            results = None
            for i in where:
                responses[i] = error_response(pb, err)
        if results is not None:
            for i, item, result in zip(where, parsed, results):
                responses[i] = reply(item, result)
    return responses


def load_stage(stage_class, args, **options):
    """A stage built from the deployment of the model's repository (deployment.toml, then SD_*
    overrides), once the model's config.pbtxt is checked against it, placed on the device
    Triton gave this model instance; `options` go to its `from_config`."""
    import json

    from .config import DeploymentConfig
    from .repository import check_model_config

    log_to_server()
    start = time.perf_counter()
    name = args.get("model_instance_name", args.get("model_name"))
    age = process_age_s()
    if age is not None:  # the stub's start and model.py's imports, before this
        log.info("%s: stub process up %.1f s before its load", name, age)
    from .optional_deps import model_libraries

    model_libraries()  # what the stage's from_config imports first (its placement)
    log.info("%s: torch, transformers and diffusers imported in %.1f s", name, time.perf_counter() - start)
    config = DeploymentConfig.from_triton_args(args)
    check_model_config(json.loads(args["model_config"]), config)
    stage = stage_class.from_config(config, instance_device(args), **options)
    log.info("%s loaded in %.1f s", name, time.perf_counter() - start)
    return stage


def process_age_s() -> float | None:
    """Seconds since this process started (Linux's /proc), None where that cannot be read."""
    import os

    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started = int(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
            return float(uptime.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


def log_to_server() -> None:
    """sd_backend's log from INFO up to the stub's stderr, which the server's log collects
    (load times, capture times, dispatch decisions); once per stub process."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d sd_backend %(levelname)s: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def instance_device(args) -> str | None:
    """`cuda:N` when Triton placed this model instance on GPU N, else None."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return None


def parameters_tensor(pb, params, config):
    """The PARAMETERS output: what the image was made with, as one JSON string."""
    import json

    import numpy as np

    return pb.Tensor("PARAMETERS", np.array([[json.dumps(params.record(config.model_name)).encode()]], dtype=object))
