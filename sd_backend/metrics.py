"""Custom Prometheus metrics from the models, served on Triton's metrics port next to
Triton's own (`nv_inference_*`):

- `sd_images_generated_total`: images decoded.
- `sd_denoise_steps_total`: denoising steps run (its rate is steps per second), by the
  `unet` model, which runs the streaming model's loops too.
- `sd_stage_seconds{stage}`: time of one execute() per stage, as a histogram.
- `sd_batch_size{stage}`: requests per execute() per stage (dynamic batching at work).
- `sd_lora_choice{name,scale}`: 1 for each adapter of the deployment's `lora_choices` a
  request may name in LORA, with the scale it gets without LORA_SCALE (an info metric, from
  the `unet` model: what `sd-client ui` offers and a dashboard shows).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

_SECONDS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
_BATCH = [1, 2, 4, 8, 16, 32]


class StageMetrics:
    """The metrics one stage's model reports; `pb` is triton_python_backend_utils."""

    def __init__(self, pb, stage: str, lora_choices: Mapping[str, float] | None = None):
        """`lora_choices`: {name: default scale} of the deployment, published by the unet."""
        labels = {"stage": stage}
        self._families = {
            "seconds": pb.MetricFamily("sd_stage_seconds", "Seconds per execute() of a stage", pb.MetricFamily.HISTOGRAM),
            "batch": pb.MetricFamily("sd_batch_size", "Requests per execute() of a stage", pb.MetricFamily.HISTOGRAM),
            "images": pb.MetricFamily("sd_images_generated_total", "Images decoded", pb.MetricFamily.COUNTER),
            "steps": pb.MetricFamily("sd_denoise_steps_total", "Denoising steps run", pb.MetricFamily.COUNTER),
            "lora": pb.MetricFamily("sd_lora_choice", "1 per adapter a request may name in LORA", pb.MetricFamily.GAUGE),
        }
        self._metrics: dict[str, Any] = {
            "seconds": self._families["seconds"].Metric(labels=labels, buckets=_SECONDS),
            "batch": self._families["batch"].Metric(labels=labels, buckets=_BATCH),
        }
        if stage == "vae":
            self._metrics["images"] = self._families["images"].Metric(labels={})
        if stage == "unet":
            # Only here: in Triton 2.51 two models' metrics with the same labels are one
            # series, which the first model to unload frees under the other (its next
            # increment writes freed memory: the server aborts).
            self._metrics["steps"] = self._families["steps"].Metric(labels={})
            for name, scale in (lora_choices or {}).items():
                choice = self._metrics[f"lora:{name}"] = self._families["lora"].Metric(labels={"name": name, "scale": f"{scale:g}"})
                choice.set(1)

    def timed(self, requests: list, execute):
        """Run execute(), recording its duration and the batch size."""
        start = time.perf_counter()
        try:
            return execute()
        finally:
            self._metrics["seconds"].observe(time.perf_counter() - start)
            self._metrics["batch"].observe(len(requests))

    def add(self, name: str, value: float) -> None:
        """Count images (vae) or denoising steps (unet)."""
        self._metrics[name].increment(value)

    def close(self) -> None:
        """Metrics go before their families (the backend requires that order)."""
        self._metrics.clear()
        self._families.clear()
