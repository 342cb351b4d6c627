"""An autotuned kernel's configurations compiled in parallel before its autotuner times them.

Triton's autotuner compiles each configuration lazily, inside the serial loop that times
them: at a cold start every new tuning key compiles up to eight configurations one after
another. ParallelCompile hooks the autotuner's disk-cache lookup (`check_disk_cache`, whose
benchmark callback runs only when no timings for the key are on disk) so that, right before
that timing loop, every configuration left after pruning is compiled in a thread pool
(Triton's `AsyncCompileMode` with `JITFunction.warmup`: the compile runs outside the GIL,
ptxas in its own process). The autotuner then finds them compiled. A restart, whose timings
come from disk, compiles nothing ahead. Any failure ahead of time (a configuration that does
not compile, an older Triton) is left to the timing loop, which handles it as before.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging

import triton

_log = logging.getLogger(__name__)


class ParallelCompile:
    """Hooks one autotuner (`@triton.autotune(..., cache_results=True)` over a @triton.jit)."""

    def __init__(self, autotuner):
        self.autotuner = autotuner
        self.pending = None  # (args, kwargs, grid, workers) of the launch in progress
        self.compiled = 0  # configurations compiled ahead, for tests and logs
        original = getattr(autotuner, "check_disk_cache", None)
        if original is None:  # a Triton without the hook: the serial path only
            return

        def check_disk_cache(tuning_key, configs, bench_fn, *rest, **kwargs):
            def compile_then_bench():
                self.compile_ahead(configs)
                return bench_fn()

            return original(tuning_key, configs, compile_then_bench, *rest, **kwargs)

        autotuner.check_disk_cache = check_disk_cache

    @contextlib.contextmanager
    def launching(self, args, kwargs, grid, workers: int):
        """Around one launch of the autotuned kernel: with workers > 1, a key it has to tune
        gets its configurations compiled by that many threads first."""
        self.pending = (args, kwargs, grid, workers) if workers > 1 else None
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
