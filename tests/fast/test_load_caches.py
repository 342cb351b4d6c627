"""What a restart reuses from the deployment's cache_dir (sd_backend.fast.load_caches): the
kernel-dispatch decisions, in a file named by everything they depend on, and the compiler
caches' directories. On the CPU: the decisions are taken from the file without timing
anything (a timing would need CUDA and fail here)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from sd_backend.config import FastPathOptions
from sd_backend.fast import load_caches
from sd_backend.fast.runtime import FastPath

MACHINE = {"gpu": "NVIDIA H200", "capability": [9, 0], "memory": 150 * 2**30, "multiprocessors": 132,
           "driver": 13000, "torch": "2.11.0+cu130", "cuda": "13.0", "triton": "3.6.0"}


def test_the_file_changes_with_the_gpu_the_driver_the_libraries_and_the_options(tmp_path):
    base = load_caches.dispatch_path(tmp_path, "unet", FastPathOptions(), MACHINE)
    assert base == load_caches.dispatch_path(tmp_path, "unet", FastPathOptions(), dict(MACHINE))
    assert base.parent == tmp_path / "dispatch" and base.name.startswith("unet-")
    for field, value in [("gpu", "NVIDIA A100-SXM4-80GB"), ("driver", 12040), ("torch", "2.12.0"), ("triton", "3.7.0"), ("capability", [8, 0])]:
        assert load_caches.dispatch_path(tmp_path, "unet", FastPathOptions(), MACHINE | {field: value}) != base, field
    assert load_caches.dispatch_path(tmp_path, "unet", FastPathOptions(split_head_dim=False), MACHINE) != base
    assert load_caches.dispatch_path(tmp_path, "vae", FastPathOptions(), MACHINE) != base


def test_decisions_saved_are_used_without_timing(tmp_path):
    path = load_caches.dispatch_path(tmp_path, "unet", FastPathOptions(), MACHINE)
    first = FastPath(FastPathOptions())
    first._timings = {("attention", (2, 8, 4096, 40)): (0.5, 0.7), ("group_norm", (2, 320, 64, 64)): (0.3, 0.2)}
    first.cache_file, first.machine_info = path, MACHINE
    load_caches.remember(first)

    again = FastPath(FastPathOptions(), known=load_caches.load_decisions(path))
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    pick = lambda key: again.choose(key, lambda: "kernel", lambda: "torch", cuda)  # noqa: E731
    assert pick(("attention", (2, 8, 4096, 40))) == "kernel"
    assert pick(("group_norm", (2, 320, 64, 64))) == "torch"
    assert again.reused == 2
    assert again.timings() == {repr(k): v for k, v in first._timings.items()}


def test_a_cache_that_cannot_be_read_or_written_only_costs_the_timing(tmp_path, caplog):
    path = tmp_path / "dispatch" / "unet-x.json"
    assert load_caches.load_decisions(path) == {}  # none yet
    path.parent.mkdir()
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="sd_backend"):
        assert load_caches.load_decisions(path) == {}
    assert "unreadable" in caplog.text and "timing the shapes again" in caplog.text
    blocked = tmp_path / "file"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING, logger="sd_backend"):
        load_caches.save_decisions(blocked / "dispatch" / "unet.json", {"k": (1.0, 2.0)}, MACHINE)  # a file where a folder goes
    assert "not saved" in caplog.text


def test_other_dispatch_modes_save_nothing(tmp_path):
    fast = FastPath(dataclasses.replace(FastPathOptions(), kernel_dispatch="always"))
    fast.cache_file, fast.machine_info = tmp_path / "unet.json", MACHINE
    load_caches.remember(fast)
    assert not (tmp_path / "unet.json").exists()


@pytest.mark.parametrize("preset", [None, "/elsewhere"])
def test_the_compiler_caches_go_into_cache_dir_unless_the_environment_names_them(tmp_path, monkeypatch, preset):
    from sd_backend.loading import use_compiler_caches

    for name in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        if preset is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, preset)
    use_compiler_caches(str(tmp_path), MACHINE)
    import os

    key = load_caches.machine_key(MACHINE)
    expected = (str(tmp_path / "triton" / key), str(tmp_path / "inductor" / key)) if preset is None else (preset, preset)
    assert (os.environ["TRITON_CACHE_DIR"], os.environ["TORCHINDUCTOR_CACHE_DIR"]) == expected


def test_the_compiler_caches_folder_changes_with_the_gpu_model_and_the_driver():
    # Triton's own keys hold the architecture (an H100 and an H200 are both sm_90), not the model
    key = load_caches.machine_key(MACHINE)
    assert key == load_caches.machine_key(dict(MACHINE))
    for field, value in [("gpu", "NVIDIA H100 80GB HBM3"), ("memory", 80 * 2**30), ("multiprocessors", 114), ("driver", 12080)]:
        assert load_caches.machine_key(MACHINE | {field: value}) != key, field
