"""Kubernetes manifests for sd-triton, rendered for a number of GPUs per pod.

    python docker/k8s/render.py --gpus 2 --image registry.example/sd-triton:1 > sd-triton.yaml
    python docker/k8s/render.py --kserve > sd-triton-kserve.yaml

Core manifests: a Deployment (`nvidia.com/gpu`, readiness, liveness and a startup probe
for the model load and graph capture, all from the launcher's /ready and /live; the
caches on a shared volume so that a new or restarted pod comes up warm), the volume's
claim, a Service, and a HorizontalPodAutoscaler on `sd_triton_queue_ms_per_request`, a pods
metric that prometheus-adapter derives from Triton's counters by the rule
`--adapter-rules` prints (`queue_ms_query`, also the Grafana dashboard's queue panel).
`--kserve` renders a KServe ServingRuntime with this image and an InferenceService that
uses it for the `triton` model format instead. With N GPUs a pod, Triton's KIND_AUTO
instance groups place one instance of each model on each GPU.
"""

from __future__ import annotations

import argparse
import sys

import yaml

NAME = "sd-triton"
SIGNAL = "sd_triton_queue_ms_per_request"
# A request waits in the queues of the models it passes through; the ensemble's own queue stays
# near zero (its steps queue in the composing models), so the signal sums those, per request
# that entered through the ensemble or the streaming model (whose BLS calls queue there too).
QUEUED_MODELS = "text_encoder|unet|vae|stable_diffusion_stream"
ENTRY_MODELS = "stable_diffusion|stable_diffusion_stream"
CACHE = "/models"  # the image's cache root (docker/Dockerfile): models, downloads, compiled kernels
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002, "health": 8003}
ARGS = ["serve", "--host", "0.0.0.0", "--model-repository", "/opt/sd-triton/model_repository"]


def queue_ms_query(matchers: str = "", by: str = "") -> str:
    """PromQL for the scale-out signal: milliseconds a request spent in queues, averaged over
    the last minute (0 at idle). `matchers` narrows the series (prometheus-adapter's
    <<.LabelMatchers>>), `by` groups them (<<.GroupBy>>, or `pod` on a dashboard)."""
    prefix = f"{matchers}," if matchers else ""
    group = f" by ({by})" if by else ""
    waited = f'sum(rate(nv_inference_queue_duration_us{{{prefix}model=~"{QUEUED_MODELS}"}}[1m])){group}'
    served = f'sum(rate(nv_inference_request_success{{{prefix}model=~"{ENTRY_MODELS}"}}[1m])){group}'
    return f"{waited} / 1000 / clamp_min({served}, 1e-9)"


def adapter_rules() -> dict:
    """prometheus-adapter's rule that serves the HPA's pods metric (its `rules:` config)."""
    return {
        "rules": [
            {
                "seriesQuery": 'nv_inference_queue_duration_us{namespace!="",pod!=""}',
                "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
                "name": {"matches": "nv_inference_queue_duration_us", "as": SIGNAL},
                "metricsQuery": queue_ms_query("<<.LabelMatchers>>", "<<.GroupBy>>"),
            }
        ]
    }


def _container(image: str, gpus: int, model: str) -> dict:
    return {
        "name": NAME,
        "image": image,
        "command": ["sd-triton"],
        "args": ARGS,
        "ports": [{"name": name, "containerPort": port} for name, port in PORTS.items()],
        "env": [
            {"name": "SD_MODEL", "value": model},
            {"name": "SD_OPT_LEVEL", "value": "triton"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": NAME, "key": "hf-token", "optional": True}}},
            {"name": "SD_TRITON_ADMIN_KEY", "valueFrom": {"secretKeyRef": {"name": NAME, "key": "admin-key"}}},
        ],
        "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"cpu": str(4 * gpus), "memory": f"{24 * gpus}Gi"}},
        # the launcher's probes (sd_backend/health.py): ready when every served model is loaded (and so
        # every captured graph), no dead stub is being replaced and no drain has begun
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "health"}, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/live", "port": "health"}, "periodSeconds": 20, "failureThreshold": 3},
        "startupProbe": {"httpGet": {"path": "/live", "port": "health"}, "periodSeconds": 10, "failureThreshold": 90},
        "volumeMounts": [{"name": "cache", "mountPath": CACHE}, {"name": "shm", "mountPath": "/dev/shm"}],
    }


def _fetcher(image: str, model: str) -> dict:
    """`sd-triton fetch`: the model into the shared cache, once for the cluster."""
    container = _container(image, 0, model)
    return {
        "name": "fetch-model",
        "image": image,
        "command": ["sd-triton"],
        "args": ["fetch", "--model-repository", ARGS[-1]],
        "env": [e for e in container["env"] if e["name"] in ("SD_MODEL", "HF_TOKEN")],
        "volumeMounts": [m for m in container["volumeMounts"] if m["name"] == "cache"],
    }


def _volumes() -> list[dict]:
    return [
        {"name": "cache", "persistentVolumeClaim": {"claimName": f"{NAME}-cache"}},
        # the Python backend moves tensors through shared memory; the default 64 MiB is too small
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
    ]


def cache_claim(size_gi: int, storage_class: str | None) -> dict:
    """The cache every pod mounts: ReadWriteMany, so that pods on any node share it."""
    spec = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": f"{size_gi}Gi"}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": f"{NAME}-cache"}, "spec": spec}


def core(image: str, gpus: int, replicas: int, model: str, queue_ms: int) -> list[dict]:
    labels = {"app.kubernetes.io/name": NAME}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": NAME, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORTS["metrics"])},
                },
                "spec": {
                    # the download (or checkpoint conversion) before the server: the startup probe
                    # then covers only the load and the graph capture
                    "initContainers": [_fetcher(image, model)],
                    "containers": [_container(image, gpus, model)],
                    "volumes": _volumes(),
                    "terminationGracePeriodSeconds": 60,  # in-flight images finish (Triton's exit timeout is 30 s)
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": NAME, "labels": labels},
        "spec": {
            "selector": labels,
            # the kubelet probes the pod itself: the health port stays off the Service
            "ports": [{"name": name, "port": port, "targetPort": name} for name, port in PORTS.items() if name != "health"],
        },
    }
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": NAME, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME},
            "minReplicas": replicas,
            "maxReplicas": max(replicas, 8),
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": SIGNAL},
                        "target": {"type": "AverageValue", "averageValue": str(queue_ms)},
                    },
                }
            ],
            # loading a model and capturing graphs takes minutes: scale down slowly
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}},
        },
    }
    return [deployment, service, autoscaler]


def kserve(image: str, gpus: int, model: str) -> list[dict]:
    runtime = {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": NAME},
        "spec": {
            "supportedModelFormats": [{"name": "triton", "version": "2", "autoSelect": False}],
            "protocolVersions": ["v2", "grpc-v2"],
            "containers": [_container(image, gpus, model) | {"name": "kserve-container"}],
            "volumes": _volumes(),
        },
    }
    service = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": NAME},
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": "triton"},
                    "runtime": NAME,
                    "protocolVersion": "v2",
                    "resources": {"limits": {"nvidia.com/gpu": gpus}},
                }
            }
        },
    }
    return [runtime, service]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per pod")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--image", default="sd-triton:latest")
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--queue-ms", type=int, default=500, help="HPA target: average queue time per request")
    parser.add_argument("--kserve", action="store_true", help="render the KServe resources instead")
    parser.add_argument("--cache-gi", type=int, default=100, help="size of the shared cache volume (default %(default)s)")
    parser.add_argument("--storage-class", help="storage class of the cache volume (ReadWriteMany; default the cluster's)")
    parser.add_argument("--adapter-rules", action="store_true", help="print prometheus-adapter's rule for the HPA's metric")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.replicas < 1:
        parser.error("--gpus and --replicas must be at least 1")
    if args.adapter_rules:
        docs = [adapter_rules()]
    elif args.kserve:
        docs = kserve(args.image, args.gpus, args.model) + [cache_claim(args.cache_gi, args.storage_class)]
    else:
        docs = core(args.image, args.gpus, args.replicas, args.model, args.queue_ms) + [
            cache_claim(args.cache_gi, args.storage_class)
        ]
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
