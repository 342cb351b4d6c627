"""A Python-backend stub killed under load, against a real tritonserver (tiny model, CPU):
what fails, what is reloaded, what comes back (Triton's L0_backend_python spirit)."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time

from tests.servers import client, http_status, leftovers, running_server, status_of
from tests.utils import assert_same_image


def test_killed_unet_stub_fails_its_requests_then_the_model_is_reloaded(cache_dir, tiny_dir, tmp_path):
    exit_timeout_s = 10
    with running_server(cache_dir, tmp_path, exit_timeout_s=exit_timeout_s) as server:
        params = dict(steps=30, scheduler="ddim")
        with contextlib.closing(client(server.grpc_url)) as c:
            alone = c.generate("stub death", seed=5, **params).image

        outcomes: list[tuple[float, str, str]] = []  # (sent at, "ok" | status, message)
        stop_load = threading.Event()

        def load(i: int) -> None:
            protocol = "grpc" if i % 2 else "http"
            with contextlib.closing(client(server.grpc_url if protocol == "grpc" else server.http_url, protocol, 60)) as c:
                for n in itertools.count():
                    if stop_load.is_set():
                        return
                    sent = time.monotonic()
                    try:
                        c.generate("stub death", seed=1000 * i + n, **params)
                        outcomes.append((sent, "ok", ""))
                    except Exception as err:  # noqa: BLE001 - every outcome is checked below
                        outcomes.append((sent, status_of(err), str(err)))
                        time.sleep(0.05)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(2)
        (stub,) = [pid for pid, model in server.stub_processes().items() if model == "unet"]
        os.kill(stub, signal.SIGKILL)
        killed = time.monotonic()

        not_ready_after = ready_after = None
        ensemble_unloaded = False
        while time.monotonic() - killed < 120:
            ready = http_status(f"{server.health_url}/ready") == 200  # the launcher's probe endpoint
            ensemble_unloaded |= http_status(f"http://{server.http_url}/v2/models/stable_diffusion/ready") != 200
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
        late_failures = [o for o in failed if o[0] > recovered_at + 0.2]  # sent after the swap (0.1 s polls)
        print(f"\nstub death: {len(outcomes)} requests from 6 clients retrying at once, {len(outcomes) - len(failed)} "
              f"succeeded, {len(in_dead_stub)} failed in the dead stub, {len(failed) - len(in_dead_stub)} otherwise; "
              f"not ready {not_ready_after:.2f} s after the kill, ready again after {ready_after:.2f} s; "
              f"errors: {sorted({(o[1], o[2][:90]) for o in failed})}")
        assert not hung, f"client threads still waiting: {hung}"
        assert not_ready_after is not None and not_ready_after < 3, "readiness did not report the dead stub"
        assert ready_after is not None, "the model was not reloaded"
        assert server.stub_deaths == ["unet"]
        assert new_stubs and stub not in new_stubs
        # the model is replaced in place: the ensemble stays loaded (no NOT_FOUND for anyone), and
        # only requests that reach the dead stub before its replacement is swapped in fail
        assert not ensemble_unloaded
        assert in_dead_stub and len(in_dead_stub) == len(failed), failed
        assert not late_failures, late_failures
        assert sum(o[1] == "ok" and o[0] > recovered_at for o in outcomes) > 0
        assert_same_image(after, alone, max_diff=0)  # the reloaded model: same weights, same image

        began = time.monotonic()
        code = server.stop()
        stopped_s = time.monotonic() - began
    from sd_backend.launcher import STOP_GRACE_S

    print(f"stopped in {stopped_s:.1f} s, exit code {code}")
    assert stopped_s < exit_timeout_s + STOP_GRACE_S
    assert leftovers(server) == ([], [])
