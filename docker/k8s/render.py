"""Kubernetes manifests for sd-triton, rendered for a number of GPUs per pod.

    python docker/k8s/render.py --gpus 2 --image registry.example/sd-triton:1 > sd-triton.yaml
    python docker/k8s/render.py --kserve > sd-triton-kserve.yaml

Core manifests: a Deployment (`nvidia.com/gpu`, readiness, liveness and a startup probe
for the model load and graph capture, all from the launcher's /ready and /live), a Service,
and a HorizontalPodAutoscaler on the average queue time per request, a pods metric that
prometheus-adapter derives from Triton's `nv_inference_queue_duration_us` and
`nv_inference_request_success` counters (rule in docker/k8s/README.md). `--kserve` renders a
KServe ServingRuntime with this image and an InferenceService that uses it for the
`triton` model format instead. With N GPUs a pod, Triton's KIND_AUTO instance groups
place one instance of each model on each GPU.
"""

from __future__ import annotations

import argparse
import sys

import yaml

NAME = "sd-triton"
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002, "health": 8003}
ARGS = ["serve", "--host", "0.0.0.0", "--model-repository", "/opt/sd-triton/model_repository"]


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
        "volumeMounts": [{"name": "models", "mountPath": "/models"}, {"name": "shm", "mountPath": "/dev/shm"}],
    }


def _volumes() -> list[dict]:
    return [
        {"name": "models", "emptyDir": {}},
        # the Python backend moves tensors through shared memory; the default 64 MiB is too small
        {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
    ]


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
                        "metric": {"name": "sd_triton_queue_ms_per_request"},
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
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.replicas < 1:
        parser.error("--gpus and --replicas must be at least 1")
    docs = kserve(args.image, args.gpus, args.model) if args.kserve else core(
        args.image, args.gpus, args.replicas, args.model, args.queue_ms
    )
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
