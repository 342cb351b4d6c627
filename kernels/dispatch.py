"""Choice between a Triton kernel and the torch op it replaces, per shape.

`SD_KERNEL_DISPATCH`:
- `measure` (default): the first time a patched module meets a shape (during warm-up,
  before any CUDA graph capture), both paths are captured in a small CUDA graph and timed
  by replay, and the faster is kept for that shape.
- `always`: the Triton kernel at every shape it supports.
- `never`: the torch ops (the patched model computes what the unpatched one does).

History of the default. The first `measure` timed eager calls, so each Triton kernel was
charged its Python launch cost, which the loop's CUDA graph never pays; torch's ops won
most shapes and the SD 1.5 loop got slower on an H200 (0.557 s against 0.422 s per image,
benchmarks/results/runs/*dispatch-ab*), so `always` became the default. Timed by graph
replay, `measure` then equalled `always`. Since attention's alternative is torch's SDPA
with cuDNN's fused attention first (kernels.patch), which beats our kernel at SD's
4096-token self-attention on Hopper, `measure` is faster than `always` in one process on
an H200: 0.333 against 0.341 s per image, 4.13 against 3.97 images/s at batch 8
(benchmarks/results/runs/NVIDIA-H200-2026-11-27-e2e-session4-ab.md, rows `triton-measure`
and `triton`, the latter then meaning `always`).
"""

from __future__ import annotations

import os
from typing import Callable, Hashable

import torch

_REPEATS = 10
_timings: dict[Hashable, tuple[float, float]] = {}  # key -> (kernel ms, torch op ms)


def _mode() -> str:
    mode = os.environ.get("SD_KERNEL_DISPATCH", "measure")
    if mode not in ("measure", "always", "never"):
        raise ValueError(f"SD_KERNEL_DISPATCH: {mode!r} is not one of measure, always, never")
    return mode


def _time_ms(fn: Callable) -> float:
    """GPU time of fn() replayed from a CUDA graph, as it will run inside the loop's graph.

    Timing eager calls would charge each Triton kernel its Python launcher (~30 us on the
    GPU host), which a graph replay never pays: that made the eager-timed choice slower.
    """
    fn()  # warm-up: compiles and autotunes Triton kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        for _ in range(_REPEATS):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / _REPEATS


def run(key: Hashable, kernel: Callable, reference: Callable, device: torch.device):
    """kernel() or reference(), whichever measured faster for `key` (on CUDA)."""
    mode = _mode()
    if mode != "measure" or device.type != "cuda":
        return reference() if mode == "never" else kernel()
    if key not in _timings:
        if torch.cuda.is_current_stream_capturing():
            return kernel()  # unseen during warm-up: no timing inside a capture
        _timings[key] = (_time_ms(kernel), _time_ms(reference))
    kernel_ms, reference_ms = _timings[key]
    return kernel() if kernel_ms < reference_ms else reference()


def decisions() -> list[dict]:
    """What was measured: one row per shape, for logs and benchmark records."""
    return [
        {"key": repr(key), "triton_ms": k, "torch_ms": r, "uses_triton": k < r}
        for key, (k, r) in _timings.items()
    ]
