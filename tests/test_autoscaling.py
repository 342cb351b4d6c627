"""The autoscaler's signal and the dashboard, checked against a real Prometheus (Debian's
`prometheus`, as a real process) scraping a real tritonserver serving the tiny model.

The query comes from the rendered prometheus-adapter rule and the HPA's target from the
rendered manifests (docker/k8s/render.py), not retyped here: under load the signal rises
past the target, at idle it falls back below it, and every dashboard panel returns data.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from sd_backend.launcher import free_port
from tests.servers import client, running_server

ROOT = Path(__file__).resolve().parents[1]
JOB = "sd-triton"
CLIENTS = 24  # three times the unet's largest batch: two in three wait for the batches before theirs
LOAD_S = 40


def _rendered(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, str(ROOT / "docker" / "k8s" / "render.py"), *args], capture_output=True, text=True, check=True)
    return list(yaml.safe_load_all(out.stdout))


def _prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's prometheus is not installed (.ci/run installs it)")
        pytest.skip("Debian's prometheus is not installed (apt-get install prometheus)")
    return binary


@contextlib.contextmanager
def prometheus(metrics_url: str, workdir: Path):
    """Prometheus scraping `metrics_url` every second; yields its base URL."""
    target = urllib.parse.urlsplit(metrics_url).netloc
    config = {"global": {"scrape_interval": "1s"}, "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}]}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    log = open(workdir / "prometheus.log", "wb")
    process = subprocess.Popen(
        [_prometheus_binary(), f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address={address}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://{address}"
    try:
        deadline = time.monotonic() + 60
        while query(url, "up") != [1.0]:
            assert process.poll() is None and time.monotonic() < deadline, (workdir / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def query(url: str, expr: str) -> list[float]:
    """The values of an instant query's result vector (empty when no series matches)."""
    try:
        with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10) as reply:
            body = json.loads(reply.read())
    except OSError:
        return []
    assert body["status"] == "success", body
    return [float(sample["value"][1]) for sample in body["data"]["result"]]


def test_the_scale_out_signal_rises_under_load_and_falls_at_idle(cache_dir, tiny_dir, tmp_path):
    (rules,) = _rendered("--adapter-rules")
    rule = rules["rules"][0]
    # as prometheus-adapter fills the template for one pod: its label matchers, grouped by it
    signal = rule["metricsQuery"].replace("<<.LabelMatchers>>", f'job="{JOB}"').replace("<<.GroupBy>>", "job")
    hpa = next(doc for doc in _rendered() if doc["kind"] == "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]["pods"]
    assert metric["metric"]["name"] == rule["name"]["as"]
    target_ms = float(metric["target"]["averageValue"])
    panels = json.loads((ROOT / "docker" / "grafana" / "sd-triton-dashboard.json").read_text())["panels"]

    with running_server(cache_dir, tmp_path) as server, prometheus(server.metrics_url, tmp_path) as prom:
        stop = threading.Event()

        def load(i: int) -> None:
            with contextlib.closing(client(server.grpc_url, timeout_s=120)) as c:
                while not stop.is_set():
                    c.generate("autoscale", seed=i, steps=16 + i % 4, height=64, width=64)

        threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(CLIENTS)]
        for thread in threads:
            thread.start()
        began, peak, empty = time.monotonic(), 0.0, {}
        while time.monotonic() - began < LOAD_S:
            time.sleep(2)
            peak = max([peak] + query(prom, signal))
        # under load: every panel of the dashboard has data
        for panel in panels:
            for target in panel["targets"]:
                if not query(prom, target["expr"]):
                    empty[panel["title"]] = target["expr"]
        stop.set()
        for thread in threads:
            thread.join(120)

        idle_began, idle = time.monotonic(), None
        while time.monotonic() - idle_began < 120:  # the rate's 1-minute window passes
            values = query(prom, signal)
            if values and values[0] < target_ms:
                idle = values[0]
                break
            time.sleep(2)
        print(f"\nsignal {rule['name']['as']}: peak {peak:.0f} ms under {CLIENTS} clients for {LOAD_S} s "
              f"(HPA target {target_ms:.0f} ms), {idle} ms {time.monotonic() - idle_began:.0f} s into idle")

    assert not empty, f"dashboard panels without data under load: {empty}"
    assert peak > target_ms, f"under load the signal peaked at {peak:.0f} ms, below the HPA's target {target_ms:.0f} ms"
    assert idle is not None and idle < target_ms, "at idle the signal did not fall below the target"
