"""A small Python API over tritonclient for the `stable_diffusion` ensemble."""

from __future__ import annotations

import dataclasses
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "stable_diffusion"
IMG2IMG_MODEL = "stable_diffusion_img2img"  # the ensemble that takes INIT_IMAGE and STRENGTH
INPAINT_MODEL = "stable_diffusion_inpaint"  # ... and MASK_IMAGE
STREAM_MODEL = "stable_diffusion_stream"
OUTPUTS = ("IMAGE", "SEED_USED", "PROMPT_TOKENS_DROPPED", "PARAMETERS")


@dataclasses.dataclass
class Progress:
    """One denoising step done, from the streaming path."""

    step: int
    total: int
    preview: np.ndarray | None  # (height/8, width/8, 3) uint8 every `preview_every` steps


class Cancelled(Exception):
    """The request was cancelled (by `stream`'s `on_progress` returning False or a cancel event)."""


class ServerUnreachable(ConnectionError):
    """No Triton server answers at the client's address; the message says what to do."""

    def __init__(self, url: str, protocol: str, reason: str):
        super().__init__(
            f"cannot reach Triton at {url} over {'gRPC' if protocol == 'grpc' else 'HTTP'}: {reason} "
            f"- is `sd-triton serve` running, and is {url} its {'gRPC' if protocol == 'grpc' else 'HTTP'} address?"
        )


# what gRPC says when no server answers (tritonclient.grpc puts it in an UNAVAILABLE error)
_GRPC_UNREACHABLE = ("failed to connect to all addresses", "Connection refused", "No route to host", "DNS resolution failed")


def unreachable(err: BaseException, url: str, protocol: str) -> ServerUnreachable | None:
    """A ServerUnreachable for an error that means no server answered at `url`, else None."""
    if isinstance(err, ServerUnreachable):
        return err
    if isinstance(err, OSError):  # tritonclient.http: the socket's own error (refused, no route, unknown host)
        return ServerUnreachable(url, protocol, (err.strerror or str(err)).lower())
    message = err.message() if callable(getattr(err, "message", None)) else str(err)
    status = str(err.status()) if callable(getattr(err, "status", None)) else ""
    if "UNAVAILABLE" in status and any(words in message for words in _GRPC_UNREACHABLE):
        reason = "connection refused" if "refused" in message.lower() else message.split(";")[-1].strip()
        return ServerUnreachable(url, protocol, reason)
    return None


_LORA_CHOICE = re.compile(r'^sd_lora_choice\{(?P<labels>[^}]*)\}\s+1(?:\.0*)?\s*$', re.M)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def lora_choices(metrics_url: str, timeout_s: float = 5) -> dict[str, float]:
    """{name: default scale} of the adapters a request may name in LORA, as the server's
    metrics publish them (`sd_lora_choice`, on Triton's metrics port); {} for none."""
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as reply:
        text = reply.read().decode()
    choices = {}
    for match in _LORA_CHOICE.finditer(text):
        labels = dict(_LABEL.findall(match["labels"]))
        choices[labels["name"]] = float(labels["scale"])
    return dict(sorted(choices.items()))


@dataclasses.dataclass
class GenerationResult:
    """One generated image and how it was made."""

    image: np.ndarray  # (height, width, 3) uint8
    seed: int
    latency_s: float
    prompt_tokens_dropped: int
    parameters: dict[str, Any]


class SDClient:
    """Send prompts to the `stable_diffusion` ensemble over gRPC (default) or HTTP.

    Parameters left as None are not sent, so the deployment's defaults apply.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = MODEL, timeout_s: float = 600):
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol: {protocol!r} is not one of grpc, http")
        self.protocol = protocol
        self.model = model
        self.timeout_s = timeout_s
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self._module = module
        self.url = url or ("127.0.0.1:8001" if protocol == "grpc" else "127.0.0.1:8000")
        self._local = threading.local()  # tritonclient's HTTP client is not thread-safe: one per thread
        self._clients: list = []

    @property
    def client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            kwargs = {} if self.protocol == "grpc" else {"connection_timeout": self.timeout_s, "network_timeout": self.timeout_s}
            client = self._local.client = self._module.InferenceServerClient(self.url, **kwargs)
            self._clients.append(client)
        return client

    def build_inputs(self, prompt: str, **parameters: Any) -> list:
        """The ensemble's inputs for one request; None-valued parameters are left out."""
        spec = {
            "PROMPT": (prompt, "BYTES"),
            "NEGATIVE_PROMPT": (parameters.get("negative_prompt"), "BYTES"),
            "SEED": (parameters.get("seed"), "INT64"),
            "STEPS": (parameters.get("steps"), "INT32"),
            "GUIDANCE_SCALE": (parameters.get("guidance_scale"), "FP32"),
            "GUIDANCE_CUTOFF": (parameters.get("guidance_cutoff"), "FP32"),
            "CACHE_INTERVAL": (parameters.get("cache_interval"), "INT32"),
            "HEIGHT": (parameters.get("height"), "INT32"),
            "WIDTH": (parameters.get("width"), "INT32"),
            "SCHEDULER": (parameters.get("scheduler"), "BYTES"),
            "PREVIEW_EVERY": (parameters.get("preview_every"), "INT32"),
            "STRENGTH": (parameters.get("strength"), "FP32"),
            "INIT_IMAGE": (parameters.get("init_image"), "UINT8"),
            "MASK_IMAGE": (parameters.get("mask_image"), "UINT8"),
            "LORA": (parameters.get("lora"), "BYTES"),
            "LORA_SCALE": (parameters.get("lora_scale"), "FP32"),
        }
        inputs = []
        for name, (value, dtype) in spec.items():
            if value is None:
                continue
            if dtype == "UINT8":  # an image (height, width, 3) or mask (height, width), one per request
                array = np.ascontiguousarray(value, dtype=np.uint8)[None]
            elif dtype == "BYTES":
                array = np.array([[value.encode("utf-8") if isinstance(value, str) else value]], dtype=object)
            else:
                array = np.array([[value]], dtype={"INT64": np.int64, "INT32": np.int32, "FP32": np.float32}[dtype])
            tensor = self._module.InferInput(name, list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler: str | None = None,
        guidance_cutoff: float | None = None,
        cache_interval: int | None = None,
        init_image: np.ndarray | None = None,
        strength: float | None = None,
        mask_image: np.ndarray | None = None,
        lora: str | None = None,
        lora_scale: float | None = None,
    ) -> GenerationResult:
        """Generate one image; raises tritonclient's InferenceServerException on a server error.
        With `init_image` (uint8 (height, width, 3)) it is image-to-image: the image is the
        start, `strength` (0-1, the server's default when None) how much of it is noised away;
        with `mask_image` too (uint8 (height, width), 255 = repaint) it is inpainting.
        `guidance_cutoff` below 1 stops guidance after that fraction of the steps, and
        `cache_interval` above 1 runs the whole UNet at every that-many-th step only
        (DeepCache): both faster, not exact. `lora` names one of the deployment's
        lora_choices adapters, `lora_scale` weights it (the server's default when None)."""
        parameters = dict(
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            scheduler=scheduler,
            guidance_cutoff=guidance_cutoff,
            cache_interval=cache_interval,
            init_image=init_image,
            strength=strength,
            mask_image=mask_image,
            lora=lora,
            lora_scale=lora_scale,
        )
        if mask_image is not None and init_image is None:
            raise ValueError("mask_image: inpainting needs init_image too (the image the mask marks)")
        model = self.model if init_image is None else INPAINT_MODEL if mask_image is not None else IMG2IMG_MODEL
        inputs = self.build_inputs(prompt, **parameters)
        outputs = [self._module.InferRequestedOutput(name) for name in OUTPUTS]
        start = time.perf_counter()
        try:
            if self.protocol == "grpc":
                reply = self.client.infer(model, inputs, outputs=outputs, client_timeout=self.timeout_s)
            else:
                reply = self.client.infer(model, inputs, outputs=outputs)
        except Exception as err:
            raise unreachable(err, self.url, self.protocol) or err
        latency = time.perf_counter() - start
        return _result(reply, prompt, negative_prompt, latency)

    def stream(
        self,
        prompt: str,
        *,
        on_progress=None,
        preview_every: int = 0,
        cancel: threading.Event | None = None,
        **parameters: Any,
    ) -> GenerationResult:
        """Generate one image through the streaming model (gRPC only), calling
        `on_progress(Progress)` after every denoising step. Returning False from it, or
        setting `cancel`, cancels the request on the server and raises `Cancelled`."""
        import queue

        if self.protocol != "grpc":
            raise ValueError("stream: progress needs gRPC streaming; use protocol='grpc'")
        events: queue.Queue = queue.Queue()
        parameters = {k: v for k, v in parameters.items() if v is not None}
        inputs = self.build_inputs(prompt, preview_every=preview_every or None, **parameters)
        # this thread's client: one stream at a time each, and no new channel per image
        client = self.client
        start = time.perf_counter()
        client.start_stream(callback=lambda result, error: events.put((result, error)), stream_timeout=self.timeout_s)
        try:
            try:
                client.async_stream_infer(STREAM_MODEL, inputs, enable_empty_final_response=True)
            except Exception as err:
                # a stream that broke at once (no server) says why only through the callback
                raise self._stream_cause(events, err) from None
            final = None
            while True:
                try:
                    result, error = events.get(timeout=0.1)
                except queue.Empty:
                    if time.perf_counter() - start > self.timeout_s:
                        raise TimeoutError(f"stream: no image within {self.timeout_s:.0f} s") from None
                    if cancel is not None and cancel.is_set():
                        raise Cancelled("cancelled by the caller") from None
                    continue
                if error is not None:
                    raise unreachable(error, self.url, self.protocol) or error
                if result.as_numpy("IMAGE") is not None:
                    final = result
                elif result.as_numpy("STEP") is not None:
                    preview = result.as_numpy("PREVIEW")
                    progress = Progress(
                        int(result.as_numpy("STEP").reshape(-1)[0]),
                        int(result.as_numpy("TOTAL_STEPS").reshape(-1)[0]),
                        None if preview is None else preview[0],
                    )
                    stop = on_progress is not None and on_progress(progress) is False
                    if stop or (cancel is not None and cancel.is_set()):
                        raise Cancelled(f"cancelled at step {progress.step} of {progress.total}")
                last = result.get_response().parameters.get("triton_final_response")
                if last is not None and last.bool_param:
                    break
        except BaseException:
            client.stop_stream(cancel_requests=True)  # the server stops at its next step
            raise
        client.stop_stream()
        if final is None:
            raise RuntimeError("stream: the server ended the stream without an image")
        return _result(final, prompt, parameters.get("negative_prompt"), time.perf_counter() - start)

    def _stream_cause(self, events, err: Exception) -> Exception:
        """The error the stream's callback got, when there is one within a second, else `err`."""
        import queue

        try:
            _, error = events.get(timeout=1.0)
        except queue.Empty:
            error = None
        cause = error if error is not None else err
        return unreachable(cause, self.url, self.protocol) or cause

    def is_ready(self) -> bool:
        try:
            return bool(self.client.is_server_live()) and bool(self.client.is_model_ready(self.model))
        except Exception as err:
            raise unreachable(err, self.url, self.protocol) or err

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()


def _result(reply, prompt: str, negative_prompt: str | None, latency_s: float) -> GenerationResult:
    """A GenerationResult from the server's answer: its image, and what it was made with as the
    server reports it (PARAMETERS: every setting, defaults included) beside the prompts sent."""
    import json

    seed_used = int(reply.as_numpy("SEED_USED").reshape(-1)[0])
    dropped = int(reply.as_numpy("PROMPT_TOKENS_DROPPED").reshape(-1)[0])
    raw = reply.as_numpy("PARAMETERS").reshape(-1)[0]
    used = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    # a negative prompt is recorded only when one was sent: SDXL reads none as zeros, "" as ""
    sent = {"negative_prompt": negative_prompt} if negative_prompt is not None else {}
    parameters = {"prompt": prompt, **sent, **used, "seed": seed_used}
    return GenerationResult(reply.as_numpy("IMAGE")[0], seed_used, latency_s, dropped, parameters)


def save_png(result: GenerationResult, path: str | Path) -> Path:
    """Write the image as PNG with every parameter it was made with in its text chunks
    (prompt, negative_prompt when one was sent, model, seed, steps, guidance_scale, height, width, scheduler)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in result.parameters.items():
        info.add_text(key, str(value))
    info.add_text("Software", "sd-triton")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.image).save(path, pnginfo=info)
    return path
