"""`sd-client ui`: a web page for the Triton server, served on 127.0.0.1:7860.

The page posts a request to /api/generate, follows it on /api/jobs/<id>/events
(Server-Sent Events: a `progress` event per denoising step with the latent preview,
then one of `done`, `failed`, `cancelled`) and cancels it with
/api/jobs/<id>/cancel. Each request is one `SDClient.stream` call in its own thread.
With an uploaded image (`init_image`, a data: URL in the JSON) the request is
image-to-image: the image is the start and its size the result's; with a mask too
(`mask_image`, white repaints), inpainting.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import dataclasses
import io
import json
import math
import queue
import sys
import threading
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from .api import Cancelled, SDClient, lora_choices

PAGE = Path(__file__).parent / "static" / "index.html"
# latent previews are small (height/8 x width/8) and computed without the VAE: one per step
PREVIEW_EVERY = 1
# the form's fields, as SDClient.stream takes them; a blank field takes the server's default
FIELDS = {
    "negative_prompt": str,
    "seed": int,
    "steps": int,
    "guidance_scale": float,
    "guidance_cutoff": float,
    "cache_interval": int,
    "height": int,
    "width": int,
    "scheduler": str,
    "strength": float,  # image-to-image only
    "lora": str,  # one of the server's lora_choices adapters, by name
    "lora_scale": float,
}
# a POST's body at most: an image file of up to 6 MB, base64 in the JSON (4 bytes for 3)
MAX_BODY = 8 * 1024 * 1024
# an uploaded image's side at most, checked before decoding (a small PNG can unpack to gigabytes);
# the server's own limit (max_size, 1024 as shipped) applies after
MAX_IMAGE_SIDE = 4096
_TERMINAL = ("done", "failed", "cancelled")


def parse_form(form: Any) -> tuple[str, dict[str, Any]]:
    """The prompt and `SDClient.stream` parameters from the page's JSON; a ValueError
    names the bad field. Ranges (size, steps, scheduler names) are the server's to check."""
    if not isinstance(form, dict):
        raise ValueError("request: expected a JSON object of form fields")
    unknown = set(form) - set(FIELDS) - {"prompt", "init_image", "mask_image"}
    if unknown:
        raise ValueError(
            f"request: unknown field(s) {', '.join(sorted(unknown))}; allowed prompt, init_image, mask_image, {', '.join(FIELDS)}"
        )
    prompt = form.get("prompt") or ""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: {prompt!r} is not text")
    parameters = {}
    for name, kind in FIELDS.items():
        text = "" if form.get(name) is None else str(form[name]).strip()
        if text:  # blank takes the server's default (for the seed: a random one)
            parameters[name] = text if kind is str else _number(name, text, kind)
    if form.get("init_image"):
        parameters["init_image"] = decode_image(form["init_image"])
        if form.get("mask_image"):  # inpainting: white repaints
            parameters["mask_image"] = decode_image(form["mask_image"], "mask_image", "L")
    elif "strength" in parameters or form.get("mask_image"):
        field = "strength" if "strength" in parameters else "mask_image"
        raise ValueError(f"{field}: needs an image (init_image): the image it is about")
    return prompt, parameters


def decode_image(data_url: Any, field: str = "init_image", mode: str = "RGB") -> np.ndarray:
    """An uploaded image file, as the page's FileReader sends it (`data:image/png;base64,...`),
    as uint8 RGB (height, width, 3) (or, mode "L", a grayscale mask (height, width)), read as
    `sd-client --init-image` / `--mask` read a file; a ValueError names `field`. Its size
    (sides multiples of 8, a mask's the image's) is the server's to check."""
    from PIL import Image

    header, _, payload = data_url.partition(",") if isinstance(data_url, str) else ("", "", "")
    # an empty file reads as a bare "data:"
    if not header.startswith("data:") or (payload and not header.endswith(";base64")):
        raise ValueError(f"{field}: expected an image file as a base64 data: URL (data:image/png;base64,...)")
    try:
        data = base64.b64decode(payload, validate=True)
    except binascii.Error as err:
        raise ValueError(f"{field}: the data: URL is not valid base64 ({err})") from None
    try:
        image = Image.open(io.BytesIO(data))
    except OSError:  # PIL's UnidentifiedImageError
        raise ValueError(f"{field}: not an image file ({len(data)} bytes); send a PNG, JPEG or WebP image") from None
    with image:
        width, height = image.size
        if max(width, height) > MAX_IMAGE_SIDE:
            raise ValueError(f"{field}: {width}x{height} pixels is too large; this page takes at most {MAX_IMAGE_SIDE} a side")
        try:
            return np.asarray(image.convert(mode))
        except Exception as err:  # noqa: BLE001 - a damaged file fails as OSError, SyntaxError, ValueError...
            raise ValueError(f"{field}: cannot decode this {image.format} file ({err})") from None


def _number(name: str, text: str, kind: type) -> int | float:
    try:
        number = kind(text)
    except ValueError:
        number = None
    if number is None or (kind is float and not math.isfinite(number)):
        raise ValueError(f"{name}: {text!r} is not {'a whole number' if kind is int else 'a number'}")
    bits = 64 if name == "seed" else 32  # the server's SEED is INT64, its other whole numbers INT32
    if kind is int and not -(2 ** (bits - 1)) <= number < 2 ** (bits - 1):
        raise ValueError(f"{name}: {text} does not fit the server's {bits}-bit integer")
    return number


def png_data_url(image: np.ndarray) -> str:
    """The image as a PNG data: URL at zlib level 1: lossless like any level, and faster to
    write than PIL's default 6; the final image's encode is on the way from the server's
    answer to the page."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def error_message(err: Exception) -> str:
    """tritonclient's exceptions carry the server's words in message()."""
    return err.message() if callable(getattr(err, "message", None)) else str(err)


@dataclasses.dataclass
class Job:
    """One request from the page: its events in order, and its cancel switch."""

    id: str
    events: queue.Queue = dataclasses.field(default_factory=queue.Queue)  # (name, payload)
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class App:
    """The running requests, each streamed from the server by its own thread."""

    def __init__(self, client: SDClient, metrics_url: str):
        self.client = client
        self.metrics_url = metrics_url  # Triton's metrics, which list the server's LoRA adapters
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def start(self, prompt: str, parameters: dict[str, Any]) -> Job:
        job = Job(uuid.uuid4().hex)
        job.thread = threading.Thread(target=self._run, args=(job, prompt, parameters), daemon=True)
        with self.lock:
            self.jobs[job.id] = job
        job.thread.start()
        return job

    def _run(self, job: Job, prompt: str, parameters: dict[str, Any]) -> None:
        def progress(p):
            preview = None if p.preview is None else png_data_url(p.preview)
            job.events.put(("progress", {"step": p.step, "total": p.total, "preview": preview}))

        try:
            result = self.client.stream(prompt, on_progress=progress, preview_every=PREVIEW_EVERY, cancel=job.cancel, **parameters)
        except Cancelled as err:
            job.events.put(("cancelled", {"message": str(err).capitalize()}))  # "Cancelled at step 5 of 150"
        except Exception as err:  # noqa: BLE001 - every failure goes to the page
            job.events.put(("failed", {"message": error_message(err)}))
        else:
            # what the server made it with, defaults included; the seed as text: random seeds are
            # 64-bit, past what a JavaScript number holds exactly
            used = {**result.parameters, "seed": str(result.seed)}
            job.events.put(("done", {"image": png_data_url(result.image), "latency_s": round(result.latency_s, 3), **used}))

    def adapters(self) -> dict[str, Any]:
        """The adapters the page offers: {"adapters": [{name, scale}]}, with "error" when the
        server's metrics cannot be read (the field still takes a name then)."""
        try:
            choices = lora_choices(self.metrics_url)
        except (OSError, ValueError) as err:
            return {"adapters": [], "error": f"cannot read {self.metrics_url}: {err}"}
        return {"adapters": [{"name": name, "scale": scale} for name, scale in choices.items()]}

    def pop(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.pop(job_id, None)

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def cancel_all(self) -> None:
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            job.cancel.set()
        for job in jobs:
            job.thread.join(timeout=5)


class Handler(BaseHTTPRequestHandler):
    server: UIServer

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path.startswith("/api/jobs/") and self.path.endswith("/events"):
            self._events(self.path.split("/")[3])
        elif self.path == "/api/adapters":
            self._json(HTTPStatus.OK, self.server.app.adapters())
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no page {self.path}"})

    def do_POST(self):
        # a JSON body cannot come from another site's plain form or fetch without a CORS preflight
        if self.headers.get("Content-Type", "").split(";")[0] != "application/json":
            self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send JSON (Content-Type: application/json)"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self._discard(length)  # read, so that the browser gets the answer rather than a reset connection
            self._json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {"error": f"init_image: the request is {length / 2**20:.1f} MB, over the {MAX_BODY // 2**20} MB this page takes; use a smaller image file"},
            )
            return
        body = self.rfile.read(length)
        if self.path == "/api/generate":
            try:
                prompt, parameters = parse_form(json.loads(body or b"{}"))
            except ValueError as err:  # json's errors are ValueErrors too
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
                return
            self._json(HTTPStatus.ACCEPTED, {"id": self.server.app.start(prompt, parameters).id})
        elif self.path.startswith("/api/jobs/") and self.path.endswith("/cancel"):
            job = self.server.app.get(self.path.split("/")[3])
            if job is None:
                self._json(HTTPStatus.NOT_FOUND, {"error": "no such request (it may have finished)"})
                return
            job.cancel.set()
            self._json(HTTPStatus.ACCEPTED, {})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint {self.path}"})

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                break
            length -= len(chunk)

    def _events(self, job_id: str) -> None:
        job = self.server.app.get(job_id)
        if job is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": "no such request"})
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            while True:
                try:
                    name, payload = job.events.get(timeout=5)
                except queue.Empty:
                    self.wfile.write(b": waiting\n\n")  # finds a closed page while the server is quiet
                    continue
                self.wfile.write(f"event: {name}\ndata: {json.dumps(payload)}\n\n".encode())
                if name in _TERMINAL:
                    break
        except OSError:
            job.cancel.set()  # nobody is watching any more: stop the server's work
        self.server.app.pop(job_id)

    def _json(self, status: HTTPStatus, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        pass  # one line per request and per event stream is noise; errors still go to stderr


class UIServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: App):
        super().__init__(address, Handler)
        self.app = app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-client ui", description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="the Triton server's gRPC address (default %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve the page on (default %(default)s; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve the page on (default %(default)s)")
    parser.add_argument(
        "--metrics-url", help="Triton's metrics, where the server lists its LoRA adapters (default: port 8002 of --url's host)"
    )
    return parser


def default_metrics_url(grpc_url: str) -> str:
    """Triton's default metrics address on the host of a gRPC address."""
    host = grpc_url.rsplit(":", 1)[0] if grpc_url.rsplit(":", 1)[-1].isdigit() else grpc_url
    return f"http://{host}:8002/metrics"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = SDClient(args.url, "grpc")
    try:
        server = UIServer((args.host, args.port), App(client, args.metrics_url or default_metrics_url(args.url)))
    except OSError as err:
        print(f"sd-client ui: cannot listen on {args.host}:{args.port}: {err.strerror}", file=sys.stderr)
        return 1
    host, port = server.server_address[:2]
    print(f"sd-client ui: http://{host}:{port}/ (Triton at {args.url}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.app.cancel_all()
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
