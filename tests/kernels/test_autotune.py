"""sd_kernels._autotune.ParallelCompile: configurations compiled ahead, in Triton's async
compile mode, only when the autotuner is about to time a key, and never in the way.

The autotuner here is a stand-in with the two members the hook uses (its disk-cache lookup
and its JIT function's warmup): under the interpreter Triton tunes nothing, and on CUDA
tests/kernels/test_flash_attention.py runs the real one.
"""

import logging

import pytest

triton = pytest.importorskip("triton")

from sd_kernels._autotune import ParallelCompile  # noqa: E402


class _Config:
    def __init__(self, block):
        self.block = block

    def all_kwargs(self):
        return {"BLOCK": self.block, "num_warps": 4}


class _Fn:
    def __init__(self, fail=False):
        self.calls = []
        self.fail = fail

    def warmup(self, *args, grid, **kwargs):
        from triton.runtime import _async_compile

        if self.fail:
            raise RuntimeError("does not compile")
        self.calls.append((args, kwargs, _async_compile.active_mode.get() is not None))


class _Autotuner:
    """check_disk_cache(tuning_key, configs, bench_fn) as Triton's: bench_fn on a miss."""

    def __init__(self, on_disk, fail=False):
        self.on_disk = on_disk
        self.fn = _Fn(fail)
        self.benched = 0

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        if self.on_disk:
            return True
        bench_fn()
        self.benched += 1
        return False

    def run(self, configs):  # what Autotuner.run does with an untuned key and cache_results
        return self.check_disk_cache(("key",), configs, lambda: None)


CONFIGS = [_Config(16), _Config(32), _Config(64)]


def test_a_key_to_tune_gets_every_configuration_compiled_first_in_async_mode():
    tuner = _Autotuner(on_disk=False)
    hook = ParallelCompile(tuner)
    with hook.launching(("x",), {"HEAD_DIM": 40}, grid=(1,), workers=4):
        tuner.run(CONFIGS)
    assert [kw["BLOCK"] for _, kw, _ in tuner.fn.calls] == [16, 32, 64]
    assert all(args == ("x",) and kw["HEAD_DIM"] == 40 and in_async for args, kw, in_async in tuner.fn.calls)
    assert tuner.benched == 1 and hook.compiled == 3


def test_timings_on_disk_compile_nothing_ahead():
    tuner = _Autotuner(on_disk=True)
    hook = ParallelCompile(tuner)
    with hook.launching(("x",), {}, grid=(1,), workers=4):
        tuner.run(CONFIGS)
    assert tuner.fn.calls == [] and hook.compiled == 0


@pytest.mark.parametrize("workers", [0, 1])
def test_one_worker_or_none_is_the_serial_path(workers):
    tuner = _Autotuner(on_disk=False)
    hook = ParallelCompile(tuner)
    with hook.launching(("x",), {}, grid=(1,), workers=workers):
        tuner.run(CONFIGS)
    assert tuner.fn.calls == [] and tuner.benched == 1


def test_outside_a_launch_the_hook_does_nothing():
    tuner = _Autotuner(on_disk=False)
    ParallelCompile(tuner)
    tuner.run(CONFIGS)
    assert tuner.fn.calls == [] and tuner.benched == 1


def test_a_failure_ahead_is_logged_and_the_timing_loop_still_runs(caplog):
    tuner = _Autotuner(on_disk=False, fail=True)
    hook = ParallelCompile(tuner)
    with caplog.at_level(logging.WARNING, logger="sd_kernels._autotune"):
        with hook.launching(("x",), {}, grid=(1,), workers=4):
            tuner.run(CONFIGS)
    assert tuner.benched == 1 and hook.compiled == 0
    assert "compiling 3 configurations ahead failed (RuntimeError: does not compile)" in caplog.text


def test_an_autotuner_without_the_lookup_keeps_the_serial_path(caplog):
    class Other(_Autotuner):
        def check_disk_cache(self, key, bench_fn):  # another signature: left alone
            bench_fn()
            self.benched += 1

    tuner = Other(on_disk=False)
    hook = ParallelCompile(tuner)
    with caplog.at_level(logging.WARNING, logger="sd_kernels._autotune"):
        with hook.launching(("x",), {}, grid=(1,), workers=4):
            tuner.check_disk_cache(("key",), lambda: None)
    assert hook.hooked is False and tuner.fn.calls == [] and tuner.benched == 1
    assert "compiled in turn" in caplog.text


def test_the_serial_path_leaves_the_autotuner_untouched():
    tuner = _Autotuner(on_disk=False)
    hook = ParallelCompile(tuner)
    with hook.launching(("x",), {}, grid=(1,), workers=0):
        tuner.run(CONFIGS)
    assert hook.hooked is None and "check_disk_cache" not in vars(tuner)


def test_the_real_autotuner_has_the_hooked_lookup():
    """Triton's Autotuner (this install's) still has check_disk_cache(tuning_key, configs, bench_fn)."""
    import inspect

    from triton.runtime.autotuner import Autotuner

    params = list(inspect.signature(Autotuner.check_disk_cache).parameters)
    assert params[:4] == ["self", "tuning_key", "configs", "bench_fn"], params
    assert hasattr(triton, "AsyncCompileMode")
