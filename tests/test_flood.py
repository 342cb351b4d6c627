"""A flood of good and bad requests over gRPC and HTTP against a real tritonserver (tiny
model, CPU): every answer right, nothing lost, memory flat. SD_FLOOD_SECONDS (default 45)
sets its length; SD_FLOOD_RESULTS=1 also writes its figures to benchmarks/results/."""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from sd_backend import processes
from sd_backend.config import SCHEDULER_NAMES
from tests.servers import client, is_invalid_arg, running_server, shm_mb

ROOT = Path(__file__).resolve().parents[1]
FLOOD_SECONDS = float(os.environ.get("SD_FLOOD_SECONDS", "45"))
# Host memory (tritonserver + its stubs) may grow this much over a flood after warm-up.
# Measured: about 1 MB over 300 requests (allocator churn); keeping a 64x64 request's
# tensors and image (some 60 KB) per request would be 18 MB.
FLOOD_MAX_RSS_GROWTH_MB = 16
FLOOD_MAX_SHM_GROWTH_MB = 1


FLOOD_SIZES = [(64, 64), (72, 80), (64, 64), (80, 64)]
FLOOD_GUIDANCE = [7.5, 1.0, 3.0]
# (inputs that make a request bad, words its error must contain)
FLOOD_BAD = [
    (dict(height=65), ["HEIGHT", "65", "multiple of 8"]),
    (dict(steps=0), ["STEPS", "0", "1..150"]),
    (dict(scheduler="lms"), ["SCHEDULER", "lms", "pndm"]),
]


def flood_request(k: int) -> dict:
    """The k-th good request of a pool: parameters vary, so batches mix and group."""
    height, width = FLOOD_SIZES[k % len(FLOOD_SIZES)]
    return dict(
        seed=1000 + k,
        steps=2 + k % 4,
        scheduler=SCHEDULER_NAMES[k % len(SCHEDULER_NAMES)],
        guidance_scale=FLOOD_GUIDANCE[k % len(FLOOD_GUIDANCE)],
        height=height,
        width=width,
    )


def flood(server, seconds: float, pool: list[dict], references: list[np.ndarray], clients: int = 16) -> dict:
    """`clients` threads (half gRPC, half HTTP) send good and bad requests for `seconds`."""
    numbers = itertools.count()
    lock = threading.Lock()
    tally = dict(sent=0, succeeded=0, failed_as_expected=0, wrong=0, unexpected=0)
    problems: list[str] = []
    deadline = time.monotonic() + seconds

    def run(i: int) -> None:
        protocol = "grpc" if i % 2 else "http"
        with contextlib.closing(client(server.grpc_url if protocol == "grpc" else server.http_url, protocol, 120)) as c:
            while time.monotonic() < deadline:
                with lock:
                    n = next(numbers)
                    tally["sent"] += 1
                if n % 5 == 4:  # one request in five is bad
                    extra, words = FLOOD_BAD[n % len(FLOOD_BAD)]
                    try:
                        c.generate(f"bad {n}", **(dict(seed=n, steps=2) | extra))
                        outcome, problem = "wrong", f"bad request {n} {extra} was accepted"
                    except Exception as err:  # noqa: BLE001
                        missing = [w for w in words if w not in str(err)]
                        ok = hasattr(err, "status") and is_invalid_arg(err) and not missing
                        outcome = "failed_as_expected" if ok else "unexpected"
                        problem = None if ok else f"bad request {n} {extra}: {err}"
                else:
                    k = n % len(pool)
                    try:
                        result = c.generate(f"flood {k}", **pool[k])
                        same = result.seed == pool[k]["seed"] and result.image.shape == references[k].shape
                        diff = np.abs(result.image.astype(np.int16) - references[k]).max() if same else None
                        outcome = "succeeded" if same and diff <= 1 else "wrong"
                        problem = None if outcome == "succeeded" else f"request {n} (pool {k}): seed {result.seed}, diff {diff}"
                    except Exception as err:  # noqa: BLE001
                        outcome, problem = "unexpected", f"request {n} (pool {k}): {err}"
                with lock:
                    tally[outcome] += 1
                    if problem:
                        problems.append(problem)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 180)
    tally["lost"] = tally["sent"] - tally["succeeded"] - tally["failed_as_expected"] - tally["wrong"] - tally["unexpected"]
    tally["problems"] = problems[:10]
    return tally


def test_flood_of_good_and_bad_requests_answers_each_correctly_without_leaking(cache_dir, tiny_dir, tmp_path):
    with running_server(cache_dir, tmp_path) as server:
        pool = [flood_request(k) for k in range(64)]
        with contextlib.closing(client(server.grpc_url)) as c:  # each request alone: the reference
            references = [c.generate(f"flood {k}", **params).image for k, params in enumerate(pool)]
        flood(server, min(10.0, FLOOD_SECONDS / 4), pool, references)  # warm-up: allocators settle
        time.sleep(2)
        rss_before, shm_before = server.rss_mib(), shm_mb(server)
        began = time.monotonic()
        samples = []  # (seconds in, MiB of tritonserver and of each stub): a plateau, or which one grows
        done = threading.Event()

        def sample() -> None:
            while not done.wait(max(5.0, FLOOD_SECONDS / 20)):
                each = {model: round(processes.rss_mib([pid]), 1) for pid, model in server.stub_processes().items()}
                each["tritonserver"] = round(processes.rss_mib([server.process.pid]), 1)
                samples.append((round(time.monotonic() - began), each))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        tally = flood(server, FLOOD_SECONDS, pool, references)
        done.set()
        sampler.join()
        elapsed = time.monotonic() - began
        time.sleep(2)
        rss_after, shm_after = server.rss_mib(), shm_mb(server)

    figures = dict(
        seconds=round(elapsed, 1),
        clients=16,
        sent=tally["sent"],
        succeeded=tally["succeeded"],
        failed_as_expected=tally["failed_as_expected"],
        wrong=tally["wrong"],
        unexpected_errors=tally["unexpected"],
        lost=tally["lost"],
        requests_per_s=round(tally["sent"] / elapsed, 1),
        rss_mb_before=round(rss_before, 1),
        rss_mb_after=round(rss_after, 1),
        shm_mb_before=round(shm_before, 1),
        shm_mb_after=round(shm_after, 1),
        rss_mib_samples=samples,
    )
    print("\nflood:", json.dumps(figures))
    if os.environ.get("SD_FLOOD_RESULTS"):
        out = ROOT / "benchmarks" / "results" / f"cpu-flood-{datetime.date.today().isoformat()}.json"
        out.write_text(json.dumps(dict(figures, cpus=os.cpu_count(), model="tiny"), indent=1) + "\n")
        print(f"wrote {out}")
    assert tally["sent"] > 100, figures  # a flood, not a trickle
    assert tally["wrong"] == tally["unexpected"] == tally["lost"] == 0, tally["problems"]
    assert tally["succeeded"] > 0 and tally["failed_as_expected"] > 0
    assert rss_after - rss_before < FLOOD_MAX_RSS_GROWTH_MB, figures
    assert shm_after - shm_before < FLOOD_MAX_SHM_GROWTH_MB, figures
