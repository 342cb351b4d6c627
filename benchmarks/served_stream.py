"""The streaming model beside the ensemble, for bench_served.py: batch-1 `SDClient.stream` against
`SDClient.generate`, images/s with concurrent clients on each path, how soon the next request
starts after a cancel, the web page's time per image (served_page.py), and the markdown of
those results. Imported by bench_served.py from this
folder (the script's own, first on sys.path), after it has put the checkout on sys.path.
"""

from __future__ import annotations

import json
import math
import statistics
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench_served import Recorder

PROMPT = "a photo of an astronaut riding a horse on the moon"  # every request of the served benchmark
GUIDANCE = 7.5
PREVIEW_EVERY = 10  # the stream section's previews: every 10th step (and the last)
CANCEL_STEPS, CANCEL_AT = 50, 10  # the cancel test: a 50-step stream cancelled on progress step 10
STREAM_RUN_S = 15  # what a concurrent run aims at when --stream-requests is 0


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(map(str, row)) + " |" for row in rows]


def stream_markdown(level: str, r: dict) -> list[str]:
    """The stream section's tables for one level; a part that failed or was skipped, in a line."""
    parts = {key: r[key] for key in ("stream_b1", "stream_concurrency", "stream_cancel", "page_b1") if key in r}
    lines = ["", f"Streaming model beside the ensemble, {level}: {json.dumps(r.get('stream_b1', {}).get('request', ''))}"] if parts else []
    for key, p in parts.items():
        lines.append("")
        if isinstance(p, dict) and ("error" in p or "skipped" in p):
            lines.append(f"- {key}: {p.get('error') or 'skipped: ' + p['skipped']}")
        elif key == "stream_b1":
            lines += _table(["generate b1 s", "stream b1 s", "stream call to first progress s", "progress messages (expected)", "previews", "max pixel diff"],
                            [[p["generate_s"], p["stream_s"], p["first_progress_s"], f"{p['progress_messages']} ({p['expected_messages']})",
                              p["previews"], p["max_pixel_diff"]]])
        elif key == "stream_concurrency":
            lines += _table(["path", "clients", "requests each", "images/s", "seconds", "failed"],
                            [[x["path"], x["clients"], x.get("per_client", ""), x.get("images_per_s", x.get("skipped")), x.get("seconds", ""),
                              x.get("failed", "")] for x in p])
        elif key == "page_b1":
            lines += ["The web page's requests through `sd-client ui`, as its script makes them (no browser):", ""]
            lines += _table(["generate b1 s", "page b1 s (POST to done event)", "its stream's latency s", "POST to first progress s",
                             "(progress, previews) events", "max pixel diff"],
                            [[p["generate_s"], p["page_s"], p["page_stream_latency_s"], p["first_progress_s"], p["progress_and_previews"],
                              p["max_pixel_diff"]]])
        else:
            lines += _table(["cancel at step", "cancel to Cancelled s", "cancel to next stream's first progress s", "cancel to next generate's image s"],
                            [[f"{p['cancel_at']} of {p['steps']}", p["to_cancelled_s"], p["to_next_stream_first_progress_s"], p["to_next_generate_done_s"]]])
    return lines


class Watched:
    """One `SDClient.stream` call (previews every PREVIEW_EVERY steps, at most STEPS) and what its
    progress messages said; times are perf_counter's. With cancel_at, its cancel Event is set
    when that step's progress arrives, and `result` stays None (Cancelled was raised)."""

    def __init__(self, client, seed: int, params: dict, cancel_at: int = 0):
        from sd_client import Cancelled

        self.steps, self.previews, self.result = [], 0, None
        self.first_at = self.cancelled_at = None
        cancel = threading.Event()

        def on_progress(progress) -> None:
            now = time.perf_counter()
            self.first_at = self.first_at or now
            self.steps.append(progress.step)
            self.previews += progress.preview is not None
            if cancel_at and progress.step == cancel_at:
                self.cancelled_at = now
                cancel.set()

        every = min(PREVIEW_EVERY, params["steps"])
        self.began = time.perf_counter()
        try:
            self.result = client.stream(PROMPT, seed=seed, on_progress=on_progress, preview_every=every, cancel=cancel, **params)
        except Cancelled:
            if not cancel_at:
                raise
        self.ended = time.perf_counter()


def max_pixel_diff(image, reference) -> int:
    """The largest difference of two uint8 images, in levels."""
    import numpy as np

    return int(np.abs(image.astype(np.int16) - reference.astype(np.int16)).max())


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def stream_b1(url: str, params: dict, repeats: int, deadline: float) -> dict:
    """Batch 1, one request at a time, after a warm-up of each: `generate` (the ensemble) and
    `stream` (the streaming model) interleaved, seed i for both in repeat i. The median latency of
    each; for the stream, the median time from the call to its first progress message, the
    progress messages and previews per request (the messages must be the steps the scheduler runs:
    PNDM runs steps + 1), and the largest pixel difference between the two images of a seed."""
    from sd_client import SDClient

    client = SDClient(url, "grpc")
    client.generate(PROMPT, seed=0, **params)
    Watched(client, 0, params)
    plain, streamed, first, messages, previews, diffs, scheduler = [], [], [], set(), set(), [], None
    for i in range(repeats):
        if time.monotonic() > deadline:
            break
        made, watched = client.generate(PROMPT, seed=i, **params), Watched(client, i, params)
        plain.append(made.latency_s)
        streamed.append(watched.result.latency_s)
        first.append(watched.first_at - watched.began)
        messages.add(len(watched.steps))
        previews.add(watched.previews)
        diffs.append(max_pixel_diff(made.image, watched.result.image))
        scheduler = made.parameters.get("scheduler")
    client.close()
    return {
        "request": {**params, "scheduler": scheduler, "preview_every": min(PREVIEW_EVERY, params["steps"])}, "repeats": len(plain),
        "generate_s": _median(plain), "stream_s": _median(streamed), "first_progress_s": _median(first),
        "progress_messages": sorted(messages), "expected_messages": params["steps"] + (1 if scheduler == "pndm" else 0),
        "previews": sorted(previews), "max_pixel_diff": max(diffs, default=None),
        "generate_all": [round(t, 4) for t in plain], "stream_all": [round(t, 4) for t in streamed],
    }


def concurrent_images(url: str, path: str, clients: int, per_client: int, params: dict) -> dict:
    """`clients` threads, each with its own SDClient, started together, each sending `per_client`
    requests back to back (path "stream": `Watched` streams; "generate": the ensemble): images per
    second over the whole run. A client stops at its first failure (a dead server fails at once)."""
    from sd_client import SDClient

    barrier, failures, done = threading.Barrier(clients + 1), [], []

    def worker(index: int) -> None:
        client = SDClient(url, "grpc")
        barrier.wait()
        try:
            for seed in range(index * per_client, (index + 1) * per_client):
                if path == "stream":
                    Watched(client, seed, params)
                else:
                    client.generate(PROMPT, seed=seed, **params)
                done.append(seed)
        except Exception as err:  # noqa: BLE001 - count and report every failure
            failures.append(str(err)[:200])
        client.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    return {"path": path, "clients": clients, "per_client": per_client, "seconds": round(seconds, 2),
            "images_per_s": round(len(done) / seconds, 3), "failed": len(failures), "errors": failures[:3]}


def stream_concurrency(url: str, params: dict, levels: list[int], per_client: int, b1: dict, deadline: float) -> list[dict]:
    """At each concurrency, streams and then the ensemble (concurrent_images). per_client 0: enough
    requests for ~STREAM_RUN_S seconds at that path's batch-1 latency, one request at a time."""
    rows = []
    for clients in levels:
        for path, latency in (("stream", b1["stream_s"]), ("generate", b1["generate_s"])):
            if time.monotonic() + 2 * STREAM_RUN_S > deadline:
                rows.append({"path": path, "clients": clients, "skipped": "deadline"})
                continue
            rows.append(concurrent_images(url, path, clients, per_client or max(2, math.ceil(STREAM_RUN_S / (clients * latency))), params))
    return rows


def cancel_then_next(url: str, params: dict, trials: int) -> dict:
    """A CANCEL_STEPS-step stream whose cancel Event is set when progress step CANCEL_AT arrives;
    right after its Cancelled, the next request, in each trial once a CANCEL_STEPS-step stream
    (seconds from the cancel to its first progress message: how soon the streaming model takes
    the next request) and once a CANCEL_STEPS-step `generate` (seconds from the cancel to its
    image); also the seconds from the cancel to Cancelled. Medians over `trials`."""
    from sd_client import SDClient

    client, steps = SDClient(url, "grpc"), {**params, "steps": CANCEL_STEPS}
    to_cancelled, to_stream, to_generate = [], [], []

    def cancel() -> float:
        watched = Watched(client, 1, steps, cancel_at=CANCEL_AT)
        if watched.cancelled_at is None or watched.result is not None:
            raise RuntimeError(f"the stream was not cancelled at step {CANCEL_AT}: progress {watched.steps}")
        to_cancelled.append(watched.ended - watched.cancelled_at)
        return watched.cancelled_at

    for trial in range(trials):
        at = cancel()
        to_stream.append(Watched(client, 2 + trial, steps).first_at - at)
        at = cancel()
        client.generate(PROMPT, seed=2 + trial, **steps)
        to_generate.append(time.perf_counter() - at)
    client.close()
    return {"steps": CANCEL_STEPS, "cancel_at": CANCEL_AT, "trials": trials, "to_cancelled_s": _median(to_cancelled),
            "to_next_stream_first_progress_s": _median(to_stream), "to_next_generate_done_s": _median(to_generate),
            "to_next_stream_all": [round(t, 4) for t in to_stream], "to_next_generate_all": [round(t, 4) for t in to_generate]}


def _attempt(record: Recorder, level: str, key: str, measure, needs_s: float, deadline: float):
    """Record what `measure()` returns, the error it raised, or {"skipped": "deadline"} when it
    would take (about) `needs_s` past the deadline; the stream section goes on after either."""
    try:
        value = {"skipped": "deadline"} if time.monotonic() + needs_s > deadline else measure()
    except Exception as err:  # noqa: BLE001 - a failed part is a result too
        value = {"error": f"{type(err).__name__}: {err}"[:500]}
    record.put(level, key, value)
    return value


def stream_section(record: Recorder, level: str, url: str, args, deadline: float) -> None:
    """The streaming model beside the ensemble: batch 1, then concurrency, then cancel."""
    params = {"steps": args.steps, "height": args.size, "width": args.size, "guidance_scale": GUIDANCE}
    b1 = _attempt(record, level, "stream_b1", lambda: stream_b1(url, params, args.repeats, deadline), 0, deadline)
    if not b1.get("repeats"):
        return
    levels = [int(c) for c in args.stream_concurrency.split(",") if c]
    _attempt(record, level, "stream_concurrency", lambda: stream_concurrency(url, params, levels, args.stream_requests, b1, deadline), 0, deadline)
    trials = min(3, args.repeats)  # a trial: two cancelled streams (10 steps each), a stream and a generate of 50
    needs = 30 + trials * 120 / args.steps * b1["stream_s"]
    _attempt(record, level, "stream_cancel", lambda: cancel_then_next(url, params, trials), needs, deadline)
    from served_page import page_b1  # (benchmarks/; it imports this module)

    log = Path(args.out) / f"ui-{level}.log"
    _attempt(record, level, "page_b1", lambda: page_b1(url, params, args.repeats, log), 15 + 2 * args.repeats * b1["stream_s"], deadline)
