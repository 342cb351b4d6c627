"""Graceful shutdown of `sd-triton serve` against a real tritonserver (tiny model, CPU),
as Triton's L0_lifecycle would check it: requests in flight finish, new ones are refused,
the probes say so, and the process exits cleanly and soon, whatever connections clients
keep open (load balancers, probes and tritonclient keep idle HTTP keep-alive ones)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.servers import Serve, client, http_status
from tests.utils import assert_same_image


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
        # an idle keep-alive connection, as a load balancer holds it, open until the process is gone
        idle = socket.create_connection(("127.0.0.1", serve.http))
        idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: sd\r\nConnection: keep-alive\r\n\r\n")
        assert idle.recv(100).startswith(b"HTTP/1.1 200")
        assert http_status(f"http://127.0.0.1:{serve.health}/ready") == 200
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
        probe = http_status(f"http://127.0.0.1:{serve.health}/ready")

        for thread in threads:
            thread.join(60)
        code = serve.proc.wait(exit_timeout_s + 30)
        exited_s = time.monotonic() - signalled
        after_drain_s = time.monotonic() - max(finished.values())
        idle.close()
        print(f"\n{signum.name}: in flight {len(seeds)} -> "
              f"{sum(not isinstance(r, Exception) for r in results.values())} succeeded; "
              f"new requests refused {late_errors}; ready after the signal: Triton {readiness}, probe {probe}; "
              f"exit code {code} {exited_s:.1f} s after the signal, {after_drain_s:.1f} s after the last request "
              f"in flight finished, one idle keep-alive connection open (exit timeout {exit_timeout_s} s)")
        assert max(finished.values()) > signalled + 0.5, "nothing was in flight when the signal came"
        for seed in seeds:
            result = results.get(seed)
            assert not isinstance(result, Exception) and result is not None, f"seed {seed}: {result}"
            assert result.seed == seed
            assert_same_image(result.image, alone[seed])
        assert all(seconds < 5 for _, _, seconds in late_errors), late_errors
        assert readiness != 200 and probe == 503
        if os.environ.get("SD_TEST_SHOW_LOG"):
            print(serve.output())
        assert code == 0, serve.output()[-3000:]
        # tritonserver alone waits for the idle connection until its exit timeout, then exits with 1:
        # after the drain the launcher unloads the entry models (the streaming model's 4 instances
        # stop one after another, ~0.8 s each on 2 cores), then the composing ones (the unet ~3.5 s),
        # and waits IDLE_EXIT_S: ~10.5 s measured on 2 cores; without the launcher tritonserver would
        # wait its whole exit timeout (20 s) after the unloads, over 25 s
        from sd_backend.launcher import IDLE_EXIT_S

        assert after_drain_s < IDLE_EXIT_S + 10, serve.output()[-3000:]
        assert "waiting for clients' open connections" in serve.output()
        assert "shutting down" in serve.output()
        assert not list(Path("/dev/shm").glob(f"sdt{serve.proc.pid}_*")), "shared memory left behind"
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait()
