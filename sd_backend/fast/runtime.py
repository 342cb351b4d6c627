"""What every patched module of one model consults when it runs: the fast path's options,
which tensors the kernels can take, and the per-shape choice between a kernel and torch's op."""

from __future__ import annotations

import time
from typing import Callable, Hashable

import torch

from ..config import FastPathOptions

_REPEATS = 10  # replays per timing


def no_autograd(*tensors) -> bool:
    """The kernels are forward only: keep torch's ops wherever a gradient would be recorded."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


class FastPath:
    """The fast path of one model (a UNet, a VAE).

    options: the deployment's FastPathOptions.
    kernel_devices: device types whose tensors the kernels take ("cpu" too runs them under
        Triton's interpreter, which the CPU tests do).
    attention_dtypes: dtypes the attention kernel takes (fp32 attention runs on torch's SDPA).
    """

    def __init__(
        self,
        options: FastPathOptions | None = None,
        kernel_devices: tuple[str, ...] = ("cuda",),
        attention_dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16),
        known: dict[str, tuple[float, float]] | None = None,
    ):
        self.options = options if options is not None else FastPathOptions()
        self.kernel_devices = kernel_devices
        self.attention_dtypes = attention_dtypes
        self._timings: dict[Hashable, tuple[float, float]] = {}  # key -> (kernel ms, torch op ms)
        # timings of an earlier start on this machine (sd_backend.fast.load_caches), by repr(key)
        self._known = dict(known or {})
        self.reused = 0  # shapes decided from `known` instead of timed
        self.timing_s = 0.0  # host seconds spent timing shapes (kernels compiled and tuned on the way)

    def on_kernel_device(self, *tensors) -> bool:
        return all(t.device.type in self.kernel_devices for t in tensors)

    def choose(self, key: Hashable, kernel: Callable, reference: Callable, device: torch.device):
        """kernel() or reference() by `options.kernel_dispatch`; under `measure`, whichever
        ran faster for `key` (timed on CUDA the first time the key is met)."""
        mode = self.options.kernel_dispatch
        if mode == "never":
            return reference()
        if mode == "always" or device.type != "cuda":
            return kernel()
        if key not in self._timings and repr(key) in self._known:
            self._timings[key] = self._known[repr(key)]
            self.reused += 1
        if key not in self._timings:
            if torch.cuda.is_current_stream_capturing():
                return kernel()  # unseen during warm-up: no timing inside a capture
            start = time.perf_counter()
            self._timings[key] = (_time_ms(kernel), _time_ms(reference))
            self.timing_s += time.perf_counter() - start
        kernel_ms, reference_ms = self._timings[key]
        return kernel() if kernel_ms < reference_ms else reference()

    def timings(self) -> dict[str, tuple[float, float]]:
        """{repr(key): (kernel ms, torch ms)} of every shape met (and those known but not met
        this time), what `known` takes at the next start."""
        return self._known | {repr(key): timing for key, timing in self._timings.items()}

    def decisions(self) -> list[dict]:
        """What `measure` timed: one row per shape, for logs and benchmark records."""
        return [
            {"key": repr(key), "triton_ms": k, "torch_ms": r, "uses_triton": k < r}
            for key, (k, r) in self._timings.items()
        ]


def _time_ms(fn: Callable) -> float:
    """GPU time of fn() replayed from a CUDA graph, as it will run inside the loop's graph
    (timing eager calls would charge each Triton kernel the Python launch a replay never pays)."""
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
