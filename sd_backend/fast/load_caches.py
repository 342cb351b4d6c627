"""What a restart on the same machine can reuse from the deployment's `cache_dir`, so it
does not redo the work of the first start:

- the kernel-dispatch decisions of `measure` (sd_backend.fast.runtime.FastPath: for each
  shape, the kernel's and torch's time), one file per model component in `dispatch/`, named
  by a fingerprint of everything a decision depends on: the GPU (name, compute capability,
  memory, multiprocessors), the CUDA driver, torch, CUDA and Triton versions and the fast
  path's options. A new GPU, driver or library version reads another file (empty: timed
  afresh), so a stale decision is never used;
- Triton's compiled kernels and autotuning results (`triton/<machine>/`) and inductor's
  (`inductor/<machine>/`): their own caches key each entry by the source, the GPU
  architecture and the library versions, and the folder adds the GPU model and the driver
  (sd_backend.loading.use_compiler_caches points them there).

A Kubernetes pod mounts one volume at `cache_dir` (deploy/'s cache volume) for all three.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("sd_backend")

FORMAT = 1  # the files' layout; a change of it reads as another fingerprint


def machine(device) -> dict:
    """What a timing depends on besides its shape: the GPU and the software stack."""
    import torch

    from importlib import metadata

    try:  # from its metadata: importing triton here would come before its cache folder is set
        triton_version = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton_version = None
    props = torch.cuda.get_device_properties(device)
    driver = getattr(torch._C, "_cuda_getDriverVersion", lambda: None)()
    return {
        "gpu": props.name, "capability": [props.major, props.minor], "memory": props.total_memory,
        "multiprocessors": props.multi_processor_count, "driver": driver, "torch": torch.__version__,
        "cuda": torch.version.cuda, "triton": triton_version,
    }


def machine_key(machine_info: dict) -> str:
    """A short fingerprint of `machine` (the compiler caches' folder name)."""
    return hashlib.sha256(json.dumps(machine_info, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dispatch_path(cache_dir: str | os.PathLike, component: str, options, machine_info: dict) -> Path:
    """The decisions file of `component` ("unet", "vae") for these FastPathOptions on this machine."""
    identity = {"format": FORMAT, "machine": machine_info, "options": dataclasses.asdict(options)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cache_dir) / "dispatch" / f"{component}-{digest}.json"


def load_decisions(path: Path) -> dict[str, tuple[float, float]]:
    """{repr(shape key): (kernel ms, torch ms)} from `path`; {} when it is missing or unreadable
    (said in the log: the shapes are timed again)."""
    if not path.is_file():
        return {}
    try:
        rows = json.loads(path.read_text())["decisions"]
        return {str(key): (float(k), float(r)) for key, (k, r) in rows.items()}
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("kernel-dispatch decisions %s unreadable (%s): timing the shapes again", path, err)
        return {}


def save_decisions(path: Path, decisions: dict[str, tuple[float, float]], machine_info: dict) -> None:
    """Write `decisions` to `path` atomically (a pod stopped mid-write leaves the old file);
    a cache that cannot be written is logged, not fatal."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_text(json.dumps({"machine": machine_info, "decisions": decisions}, indent=1, sort_keys=True))
        scratch.replace(path)
    except OSError as err:
        log.warning("kernel-dispatch decisions not saved to %s: %s", path, err)


def fast_path_for(options, cache_dir: str | os.PathLike, component: str, device):
    """A FastPath for `component` that starts from this machine's earlier decisions (`remember` saves them)."""
    from .runtime import FastPath

    info = machine(device)
    path = dispatch_path(cache_dir, component, options, info)
    fast = FastPath(options, known=load_decisions(path))
    fast.cache_file, fast.machine_info = path, info
    return fast


def remember(fast) -> None:
    """Save a FastPath's decisions where fast_path_for found them (after the warm-up or the
    captures at load met every shape), saying how many were reused."""
    if fast is None or getattr(fast, "cache_file", None) is None or fast.options.kernel_dispatch != "measure":
        return
    timings = fast.timings()
    save_decisions(fast.cache_file, timings, fast.machine_info)
    log.info("kernel dispatch: %d shapes decided from %s, %d timed in %.1f s", fast.reused, fast.cache_file, len(timings) - fast.reused, fast.timing_s)
