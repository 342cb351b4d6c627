"""Reliability under load, faults and bad input, against a real tritonserver serving the
tiny model on the CPU, in the spirit of Triton's own QA (L0_lifecycle, L0_backend_python,
L0_request_cancellation).

Scenarios that signal the server or kill one of its processes start their own server;
the others share one. Knobs: SD_FLOOD_SECONDS (default 45) is how long the flood runs;
SD_FLOOD_RESULTS=1 also writes its figures to benchmarks/results/ (not in CI).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import queue
import re
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from sd_backend.config import SCHEDULER_NAMES
from tests.utils import assert_same_image

ROOT = Path(__file__).resolve().parents[1]
FLOOD_SECONDS = float(os.environ.get("SD_FLOOD_SECONDS", "45"))
# Host memory (tritonserver + its stubs) may grow this much over a flood after warm-up.
# Measured: about 1 MB over 300 requests (allocator churn); keeping a 64x64 request's
# tensors and image (some 60 KB) per request would be 18 MB.
FLOOD_MAX_RSS_GROWTH_MB = 16
FLOOD_MAX_SHM_GROWTH_MB = 1


# --- helpers -------------------------------------------------------------------------


@contextlib.contextmanager
def running_server(cache_dir, log_dir: Path, **options):
    """A tritonserver of our own on free loopback ports, serving the tiny model."""
    from sd_backend.demo import free_port
    from sd_backend.launcher import ServerOptions, TritonServer

    log = log_dir / "tritonserver.log"
    server = TritonServer(
        ServerOptions(
            http_port=free_port(),
            grpc_port=free_port(),
            metrics_port=free_port(),
            env={"SD_MODEL": "tiny", "SD_CACHE_DIR": str(cache_dir)},
            **options,
        ),
        log_path=log,
    )
    server.start_ready(300)
    try:
        yield server
    finally:
        server.stop()
        if os.environ.get("SD_TEST_SHOW_LOG"):
            print(log.read_text())


def client(url: str, protocol: str = "grpc", timeout_s: float = 120):
    from sd_client import SDClient

    return SDClient(url, protocol, timeout_s=timeout_s)


def status_of(err) -> str:
    """The error's status as tritonclient reports it: 'StatusCode.X' (gRPC) or '400' (HTTP)."""
    return str(err.status())


def is_invalid_arg(err) -> bool:
    return status_of(err) in ("StatusCode.INVALID_ARGUMENT", "400")


def is_unavailable(err) -> bool:
    return status_of(err) in ("StatusCode.UNAVAILABLE", "503")


def http_status(url: str) -> int | str:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError as err:  # refused: the server is gone
        return type(err).__name__


def metric(server, name: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    match = re.search(rf"^{name}(?:\{{\}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def shm_mb(server) -> float:
    """/dev/shm pages in use by this server's Python-backend regions."""
    return sum(p.stat().st_blocks * 512 for p in Path("/dev/shm").glob(f"{server.shm_prefix}*")) / 2**20


def leftovers(server) -> tuple[list[int], list[str]]:
    """Stub processes and shared-memory regions of a stopped server (both should be none)."""
    stubs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if server.shm_prefix.encode() in (entry / "cmdline").read_bytes():
                    stubs.append(int(entry.name))
    return stubs, [p.name for p in Path("/dev/shm").glob(f"{server.shm_prefix}*")]


# --- 1. graceful shutdown ------------------------------------------------------------


class Serve:
    """`sd-triton serve` as a deployment runs it (the container's PID 1), output collected."""

    def __init__(self, cache_dir, exit_timeout_s: int):
        from sd_backend.demo import free_port

        self.http, self.grpc, metrics = (free_port() for _ in range(3))
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sd_backend.cli", "serve", "--http-port", str(self.http), "--grpc-port",
             str(self.grpc), "--metrics-port", str(metrics), "--exit-timeout", str(exit_timeout_s)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, SD_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1"),
        )
        # keep reading: tritonserver logs to the same pipe and must never block on it
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("  try:"):
                self.ready.set()

    def output(self) -> str:
        return "".join(self.lines)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_lets_requests_in_flight_finish_refuses_new_ones_and_exits(cache_dir, tiny_dir, signum):
    exit_timeout_s = 20
    serve = Serve(cache_dir, exit_timeout_s)
    try:
        assert serve.ready.wait(300), serve.output()[-3000:]
        grpc_url, http_url = f"127.0.0.1:{serve.grpc}", f"127.0.0.1:{serve.http}"
        params = dict(steps=60, height=128, width=128, scheduler="euler")
        seeds = [11, 12, 13, 14]
        alone = {}
        with contextlib.closing(client(grpc_url)) as c:
            for seed in seeds:
                alone[seed] = c.generate("shutdown", seed=seed, **params).image

        results: dict[int, object] = {}
        finished: dict[int, float] = {}

        def in_flight(seed: int, protocol: str) -> None:
            # a client of its own, closed at once: Triton's HTTP server waits for open connections
            with contextlib.closing(client(grpc_url if protocol == "grpc" else http_url, protocol)) as c:
                try:
                    results[seed] = c.generate("shutdown", seed=seed, **params)
                except Exception as err:  # noqa: BLE001 - reported below
                    results[seed] = err
                finished[seed] = time.monotonic()

        threads = [threading.Thread(target=in_flight, args=(s, "grpc" if i % 2 else "http")) for i, s in enumerate(seeds)]
        for thread in threads:
            thread.start()
        time.sleep(0.7)  # past the text encoder: the four are in the UNet's loop
        signalled = time.monotonic()
        serve.proc.send_signal(signum)
        time.sleep(0.5)

        late_errors = []
        for protocol, url in (("grpc", grpc_url), ("http", http_url)):
            began = time.monotonic()
            with contextlib.closing(client(url, protocol, timeout_s=10)) as c:
                with pytest.raises(Exception) as refused:
                    c.generate("too late", seed=99, steps=2)
            late_errors.append((protocol, str(refused.value)[:120], round(time.monotonic() - began, 2)))
        readiness = http_status(f"http://{http_url}/v2/health/ready")

        for thread in threads:
            thread.join(60)
        code = serve.proc.wait(exit_timeout_s + 30)
        exited_s = time.monotonic() - signalled
        print(f"\n{signum.name}: in flight {len(seeds)} -> "
              f"{sum(not isinstance(r, Exception) for r in results.values())} succeeded; "
              f"new requests refused {late_errors}; ready after the signal: {readiness}; "
              f"exit code {code} {exited_s:.1f} s after the signal (exit timeout {exit_timeout_s} s)")
        assert max(finished.values()) > signalled + 0.5, "nothing was in flight when the signal came"
        for seed in seeds:
            result = results.get(seed)
            assert not isinstance(result, Exception) and result is not None, f"seed {seed}: {result}"
            assert result.seed == seed
            assert_same_image(result.image, alone[seed])
        assert all(seconds < 5 for _, _, seconds in late_errors), late_errors
        assert readiness != 200
        if os.environ.get("SD_TEST_SHOW_LOG"):
            print(serve.output())
        assert code == 0, serve.output()[-3000:]
        assert exited_s < exit_timeout_s, serve.output()[-3000:]
        assert "shutting down" in serve.output()
        assert not list(Path("/dev/shm").glob(f"sdt{serve.proc.pid}_*")), "shared memory left behind"
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait()


# --- 2. stub death -------------------------------------------------------------------


def test_killed_unet_stub_fails_its_requests_then_the_model_is_reloaded(cache_dir, tiny_dir, tmp_path):
    exit_timeout_s = 10
    with running_server(cache_dir, tmp_path, exit_timeout_s=exit_timeout_s) as server:
        params = dict(steps=30, scheduler="ddim")
        with contextlib.closing(client(server.grpc_url)) as c:
            alone = c.generate("stub death", seed=5, **params).image

        outcomes: list[tuple[float, str, str]] = []  # (finished at, "ok" | status, message)
        stop_load = threading.Event()

        def load(i: int) -> None:
            protocol = "grpc" if i % 2 else "http"
            with contextlib.closing(client(server.grpc_url if protocol == "grpc" else server.http_url, protocol, 60)) as c:
                for n in itertools.count():
                    if stop_load.is_set():
                        return
                    try:
                        c.generate("stub death", seed=1000 * i + n, **params)
                        outcomes.append((time.monotonic(), "ok", ""))
                    except Exception as err:  # noqa: BLE001 - every outcome is checked below
                        outcomes.append((time.monotonic(), status_of(err), str(err)))
                        time.sleep(0.05)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        (stub,) = [pid for pid, model in server.stub_processes().items() if model == "unet"]
        os.kill(stub, signal.SIGKILL)
        killed = time.monotonic()

        not_ready_after = ready_after = None
        while time.monotonic() - killed < 120:
            ready = http_status(f"http://{server.http_url}/v2/health/ready") == 200
            if not ready and not_ready_after is None:
                not_ready_after = time.monotonic() - killed
            if ready and not_ready_after is not None:
                ready_after = time.monotonic() - killed
                break
            time.sleep(0.1)
        time.sleep(3)  # the load runs on the new stub
        stop_load.set()
        for thread in threads:
            thread.join(60)
        hung = [thread.name for thread in threads if thread.is_alive()]
        new_stubs = [pid for pid, model in server.stub_processes().items() if model == "unet"]
        with contextlib.closing(client(server.grpc_url)) as c:
            after = c.generate("stub death", seed=5, **params).image

        failed = [o for o in outcomes if o[1] != "ok"]
        in_dead_stub = [o for o in failed if "Stub process 'unet_0_0' is not healthy" in o[2]]
        recovered_at = killed + (ready_after or 0)
        late_failures = [o for o in failed if o[0] > recovered_at + 1]
        print(f"\nstub death: {len(outcomes)} requests from 6 clients retrying at once, {len(outcomes) - len(failed)} "
              f"succeeded, {len(in_dead_stub)} failed in the dead stub, {len(failed) - len(in_dead_stub)} refused while "
              f"the model reloaded; not ready {not_ready_after:.2f} s after the kill, ready again after {ready_after:.2f} s; "
              f"errors: {sorted({(o[1], o[2][:90]) for o in failed})}")
        assert not hung, f"client threads still waiting: {hung}"
        assert not_ready_after is not None and not_ready_after < 3, "readiness did not report the dead stub"
        assert ready_after is not None, "the model was not reloaded"
        assert server.stub_deaths == ["unet"]
        assert new_stubs and stub not in new_stubs
        # the requests in the dead stub got an error; others, while the model reloads, are refused
        assert in_dead_stub, failed
        for finished, status, message in failed:
            expected = (
                "is not healthy" in message  # in the stub when it died
                or "has no available versions" in message  # refused while unloaded
                or "not ready" in message
                or "is not found" in message
            )
            assert expected, (status, message)
        assert not late_failures, late_failures
        assert sum(o[1] == "ok" and o[0] > recovered_at for o in outcomes) > 0
        assert_same_image(after, alone, max_diff=0)  # the reloaded model: same weights, same image

        # Triton 2.51 never finishes unloading the dead instance, so it waits out its exit timeout
        began = time.monotonic()
        code = server.stop()
        stopped_s = time.monotonic() - began
    from sd_backend.launcher import STOP_GRACE_S

    print(f"stopped in {stopped_s:.1f} s, exit code {code}")
    assert stopped_s < exit_timeout_s + STOP_GRACE_S
    assert leftovers(server) == ([], [])


# --- 3. flood ------------------------------------------------------------------------

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
        tally = flood(server, FLOOD_SECONDS, pool, references)
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


# --- 4-6. limits, out of memory, timeouts, cancellation, unloads (one shared server) --


@pytest.fixture(scope="module")
def shared(cache_dir, tiny_dir, tmp_path_factory):
    with running_server(cache_dir, tmp_path_factory.mktemp("reliability")) as server:
        yield server


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_sizes_past_max_size_are_refused_naming_the_limit(shared, protocol):
    url = shared.grpc_url if protocol == "grpc" else shared.http_url
    with contextlib.closing(client(url, protocol)) as c:
        for field, size in (("height", 1032), ("width", 2048)):
            with pytest.raises(Exception) as info:
                c.generate("too big", seed=1, steps=1, **{field: size})
            assert is_invalid_arg(info.value), info.value
            message = str(info.value)
            assert f"{field.upper()}: {size}" in message and "from 64 to 1024" in message, message


def test_1024_square_image_fits_the_python_backend_shared_memory(shared):
    regions_before = {p.name: p.stat().st_size for p in Path("/dev/shm").glob(f"{shared.shm_prefix}*")}
    with contextlib.closing(client(shared.grpc_url)) as c:
        result = c.generate("the largest image", seed=3, steps=1, guidance_scale=1.0, height=1024, width=1024)
    assert result.image.shape == (1024, 1024, 3) and result.image.dtype == np.uint8
    assert result.image.std() > 0
    # the launcher's python_shm_mb (64 MiB a model) holds the 3 MiB image: no region grew or was added
    regions_after = {p.name: p.stat().st_size for p in Path("/dev/shm").glob(f"{shared.shm_prefix}*")}
    assert regions_after == regions_before
    assert set(regions_after.values()) == {shared.options.python_shm_mb * 2**20}


def test_out_of_memory_in_the_unet_is_unavailable_and_the_next_request_runs(shared):
    """A real allocation failure: the UNet stub's address space is capped 16 MiB above what
    it uses, so the 1024x1024 loop cannot allocate its activations (some 60 MiB more)."""
    (stub,) = [pid for pid, model in shared.stub_processes().items() if model == "unet"]
    with contextlib.closing(client(shared.grpc_url)) as c:
        alone = c.generate("after oom", seed=4, steps=3).image
        in_use = int(re.search(r"^VmSize:\s+(\d+) kB", Path(f"/proc/{stub}/status").read_text(), re.M).group(1)) * 1024
        resource.prlimit(stub, resource.RLIMIT_AS, (in_use + 16 * 2**20, resource.RLIM_INFINITY))
        try:
            with pytest.raises(Exception) as info:
                c.generate("out of memory", seed=4, steps=1, guidance_scale=1.0, height=1024, width=1024)
        finally:
            resource.prlimit(stub, resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert is_unavailable(info.value), info.value
        assert "out of memory" in str(info.value) and "retry later or ask for a smaller image" in str(info.value)
        after = c.generate("after oom", seed=4, steps=3).image
    assert_same_image(after, alone, max_diff=0)
    assert stub in shared.stub_processes(), "the stub died instead of answering"


def test_out_of_memory_errors_are_recognised():
    import torch

    from sd_backend.triton_io import is_out_of_memory

    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8388608 bytes"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("HEIGHT: 70 is not allowed"))


def _send_with_timeout(url: str, protocol: str, timeout_us: int, **params):
    """One ensemble request with Triton's server-side `timeout` parameter; (error or None, seconds)."""
    import tritonclient.grpc as tg
    import tritonclient.http as th

    module = tg if protocol == "grpc" else th
    raw = module.InferenceServerClient(url)
    inputs = client(url, protocol).build_inputs("timeout", **params)
    began = time.monotonic()
    try:
        raw.infer("stable_diffusion", inputs, timeout=timeout_us)
        return None, time.monotonic() - began
    except Exception as err:  # noqa: BLE001 - returned to the test
        return err, time.monotonic() - began
    finally:
        raw.close()


def test_request_whose_timeout_expires_in_the_unet_queue_is_rejected_and_never_runs(shared):
    busy = dict(steps=150, height=128, width=128, scheduler="euler")
    steps_before = metric(shared, "sd_denoise_steps_total")
    workers, clients = [], [client(shared.grpc_url) for _ in range(2)]
    for seed, c in zip((21, 22), clients):  # one batch runs, the next waits for the instance: later requests queue
        workers.append(threading.Thread(target=c.generate, args=("busy",), kwargs=dict(seed=seed, **busy)))
        workers[-1].start()
        time.sleep(0.3)
    outcomes = {}
    senders = [
        threading.Thread(target=lambda p=p, u=u: outcomes.__setitem__(p, _send_with_timeout(u, p, 300_000, seed=23, steps=7)))
        for p, u in (("grpc", shared.grpc_url), ("http", shared.http_url))
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join(60)
    for worker, c in zip(workers, clients):
        worker.join(120)
        c.close()
    steps_run = metric(shared, "sd_denoise_steps_total") - steps_before
    print(f"\ntimeouts: {[(p, str(e)[:90], round(s, 2)) for p, (e, s) in outcomes.items()]}; steps run {steps_run}")
    for protocol, (err, seconds) in outcomes.items():
        assert err is not None, f"{protocol}: the request ran"
        assert is_unavailable(err) and "Request timeout expired" in str(err), (protocol, err)
        assert seconds < 2, f"{protocol}: rejected after {seconds:.1f} s, not when its 0.3 s expired"
    assert steps_run == 2 * busy["steps"]  # the two 7-step requests never reached the loop
    err, _ = _send_with_timeout(shared.grpc_url, "grpc", 60_000_000, seed=24, steps=2)
    assert err is None, err  # a timeout that does not expire changes nothing


def test_cancelled_ensemble_request_answers_cancelled_and_skips_the_decoder(shared):
    """Triton 2.51 checks an ensemble request for cancellation between steps only: the
    composing UNet request in flight is not cancelled (its `is_cancelled()` stays False, see
    README), so its loop runs to the end, but the VAE step is never scheduled. If Triton
    starts passing the cancellation on, `steps_run` drops and this test says so: then the
    UNet loop should stop on `request.is_cancelled()`."""
    import tritonclient.grpc as tg

    long = dict(steps=150, height=128, width=128, scheduler="euler")
    with contextlib.closing(client(shared.grpc_url)) as c:
        alone = c.generate("after cancel", seed=32, steps=2).image
        steps_before = metric(shared, "sd_denoise_steps_total")
        images_before = metric(shared, "sd_images_generated_total")
        raw = tg.InferenceServerClient(shared.grpc_url)
        answers: queue.Queue = queue.Queue()
        call = raw.async_infer(
            "stable_diffusion", c.build_inputs("cancel me", seed=31, **long),
            callback=lambda result, error: answers.put((result, error, time.monotonic())),
        )
        time.sleep(0.7)  # in the UNet loop
        cancelled_at = time.monotonic()
        call.cancel()
        result, error, answered_at = answers.get(timeout=30)
        began = time.monotonic()
        after = c.generate("after cancel", seed=32, steps=2)
        next_latency = time.monotonic() - began
        raw.close()
    time.sleep(0.5)
    steps_run = metric(shared, "sd_denoise_steps_total") - steps_before
    images = metric(shared, "sd_images_generated_total") - images_before
    print(f"\ncancel: answered {answered_at - cancelled_at:.2f} s after cancel(); next request took {next_latency:.2f} s; "
          f"steps run {steps_run:.0f} of {long['steps']} + 2; images decoded {images:.0f}")
    assert result is None and error is not None and "CANCELLED" in str(error.status()), error
    assert answered_at - cancelled_at < 1
    assert_same_image(after.image, alone, max_diff=0)
    assert steps_run == long["steps"] + 2  # Triton 2.51: the cancelled request's loop still ran
    assert images == 1  # only the next request's image: the cancelled one was not decoded


def test_unloading_one_model_leaves_the_others_serving_and_counting(shared):
    """A stop drains the entry models one by one while the others serve. Triton 2.51 frees
    a metric series two models share when either unloads, so each model keeps its own."""
    from sd_backend.launcher import ADMIN_HEADER

    def control(action: str) -> None:
        request = urllib.request.Request(
            f"http://{shared.http_url}/v2/repository/models/stable_diffusion_stream/{action}",
            data=b"{}", method="POST", headers={ADMIN_HEADER: shared.options.admin_key},
        )
        urllib.request.urlopen(request, timeout=300).close()

    with contextlib.closing(client(shared.grpc_url)) as c:
        before = metric(shared, "sd_denoise_steps_total")
        control("unload")
        try:
            assert http_status(f"http://{shared.http_url}/v2/models/stable_diffusion_stream/ready") != 200
            c.generate("still counting", seed=41, steps=3)
            assert metric(shared, "sd_denoise_steps_total") - before == 3
        finally:
            control("load")
        assert http_status(f"http://{shared.http_url}/v2/health/ready") == 200
