"""The web page's time per image, for bench_served.py's stream section: `sd-client ui` in its
own process against the served models, and per request the HTTP calls the page's script
makes (POST api/generate with the form's fields, then its Server-Sent Events on
api/jobs/<id>/events until `done`), timed from the POST to the `done` event. Beside it, in
the same run, the ensemble's `generate` at the same seed: the two images' largest pixel
difference. No browser here (the GPU host has none, and Chromium is several times what can
be carried to it), so the figure leaves out the browser's own parsing and drawing of the
events: one PNG decode and a redraw per step.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import subprocess
import sys
import time
import urllib.request

from served_stream import PROMPT, _median, max_pixel_diff

UI = "import sys, sd_backend; from sd_client.ui import main; sys.exit(main(sys.argv[1:]))"


@contextlib.contextmanager
def running_ui(grpc_url: str, log_path):
    """`sd-client ui` on a free port against `grpc_url`; yields its address."""
    from sd_backend.launcher import free_port

    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", UI, "--url", grpc_url, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(address, timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sd-client ui did not serve {address}; see {log_path}") from None
                time.sleep(0.2)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def page_request(address: str, fields: dict) -> dict:
    """One image as the page makes it: the seconds from the POST to the `done` event and to
    the first `progress` event, the events seen, and the `done` event's payload."""
    began = time.perf_counter()
    post = urllib.request.Request(address + "api/generate", data=json.dumps(fields).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=60) as reply:
        job = json.load(reply)["id"]
    first, progress, previews, name = None, 0, 0, None
    with urllib.request.urlopen(address + f"api/jobs/{job}/events", timeout=300) as events:
        for raw in events:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                payload = json.loads(line[len("data: "):])
                if name == "progress":
                    first = first or time.perf_counter() - began
                    progress += 1
                    previews += payload.get("preview") is not None
                elif name in ("done", "failed", "cancelled"):
                    if name != "done":
                        raise RuntimeError(f"the page's request ended {name}: {payload.get('message')}")
                    return {"seconds": time.perf_counter() - began, "first_progress_s": first, "progress": progress,
                            "previews": previews, "done": payload}
    raise RuntimeError("the page's event stream ended without a result")


def page_b1(url: str, params: dict, repeats: int, log_path) -> dict:
    """Batch 1, one request at a time, after a warm-up: the page's request (page_request) and the
    ensemble's `generate` at the same seed, interleaved. Medians of each."""
    import numpy as np
    from PIL import Image
    from sd_client import SDClient

    client = SDClient(url, "grpc")
    fields = {"prompt": PROMPT, **{name: str(value) for name, value in params.items()}}
    seconds, latency, first, generated, events, diffs = [], [], [], [], set(), []
    with running_ui(url, log_path) as address:
        page_request(address, {**fields, "seed": "0"})
        client.generate(PROMPT, seed=0, **params)
        for i in range(repeats):
            made = page_request(address, {**fields, "seed": str(i)})
            plain = client.generate(PROMPT, seed=i, **params)
            seconds.append(made["seconds"])
            latency.append(made["done"]["latency_s"])
            first.append(made["first_progress_s"])
            generated.append(plain.latency_s)
            events.add((made["progress"], made["previews"]))
            png = base64.b64decode(made["done"]["image"].split(",", 1)[1])
            image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            diffs.append(max_pixel_diff(image, plain.image))
    client.close()
    return {
        "request": params, "repeats": len(seconds), "page_s": _median(seconds), "page_stream_latency_s": _median(latency),
        "first_progress_s": _median(first), "generate_s": _median(generated),
        "progress_and_previews": sorted(events), "max_pixel_diff": max(diffs, default=None),
        "page_all": [round(t, 4) for t in seconds], "generate_all": [round(t, 4) for t in generated],
    }
