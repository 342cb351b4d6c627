"""An autotuned kernel's configurations compiled in parallel before its autotuner times them.

Triton's autotuner compiles each configuration lazily, inside the serial loop that times
them: at a cold start every new tuning key compiles up to eight configurations one after
another. ParallelCompile hooks the autotuner's disk-cache lookup (`check_disk_cache`, whose
benchmark callback runs only when no timings for the key are on disk) so that, right before
that timing loop, every configuration left after pruning is compiled in a thread pool
(Triton's `AsyncCompileMode` with `JITFunction.warmup`: the compile runs outside the GIL,
ptxas in its own process). The autotuner then finds them compiled. A restart, whose timings
come from disk, compiles nothing ahead. The hook goes in only when a launch first asks for
workers, and only where the lookup has the parameters it wraps; any failure ahead of time (a
configuration that does not compile, another Triton) is left to the timing loop, which
handles it as before.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import logging

import triton

_log = logging.getLogger(__name__)


class ParallelCompile:
    """Hooks one autotuner (`@triton.autotune(..., cache_results=True)` over a @triton.jit)."""

    def __init__(self, autotuner):
        self.autotuner = autotuner
        self.pending = None  # (args, kwargs, grid, workers) of the launch in progress
        self.compiled = 0  # configurations compiled ahead, for tests and logs
        self.hooked = None  # None until first asked for; then whether the hook is in place

    def _hook(self) -> bool:
        """Wrap the autotuner's check_disk_cache(tuning_key, configs, bench_fn), once, where
        this Triton has it with those parameters (the default path never touches it)."""
        if self.hooked is None:
            original = getattr(self.autotuner, "check_disk_cache", None)
            try:
                params = list(inspect.signature(original).parameters)[:3] if original else []
            except (TypeError, ValueError):
                params = []
            self.hooked = params == ["tuning_key", "configs", "bench_fn"]
            if not self.hooked:
                _log.warning("this Triton's autotuner has no check_disk_cache(tuning_key, configs, bench_fn): "
                             "configurations are compiled in turn")
                return False

            def check_disk_cache(tuning_key, configs, bench_fn, *rest, **kwargs):
                def compile_then_bench():
                    self.compile_ahead(configs)
                    return bench_fn()

                return original(tuning_key, configs, compile_then_bench, *rest, **kwargs)

            self.autotuner.check_disk_cache = check_disk_cache
        return self.hooked

    @contextlib.contextmanager
    def launching(self, args, kwargs, grid, workers: int):
        """Around one launch of the autotuned kernel: with workers > 1, a key it has to tune
        gets its configurations compiled by that many threads first."""
        self.pending = (args, kwargs, grid, workers) if workers > 1 and self._hook() else None
        try:
            yield
        finally:
            self.pending = None

    def compile_ahead(self, configs) -> None:
        mode = getattr(triton, "AsyncCompileMode", None)
        if self.pending is None or mode is None or len(configs) < 2:
            return
        args, kwargs, grid, workers = self.pending
        try:
            with concurrent.futures.ThreadPoolExecutor(min(workers, len(configs))) as pool, _async_mode(mode, pool):
                for config in configs:
                    self.autotuner.fn.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())
            self.compiled += len(configs)
        except Exception as err:  # the timing loop compiles what is missing, and reports what fails
            _log.warning("compiling %d configurations ahead failed (%s: %s); the autotuner compiles them in turn",
                         len(configs), type(err).__name__, err)


def _async_mode(mode, pool):
    """AsyncCompileMode that keeps going past a configuration that fails to compile (the
    timing loop meets that failure again and scores it out), where this Triton offers that."""
    try:
        return mode(pool, ignore_errors=True)
    except TypeError:
        return mode(pool)
