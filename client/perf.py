"""Where `perf_analyzer` is and the environment it runs in.

It comes on PATH in NVIDIA's SDK container, or next to this interpreter from the
`tritonclient` manylinux wheel; the wheel's binary links libcudart.so.12, which the
`nvidia-cuda-runtime-cu12` wheel provides on a machine without CUDA.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def perf_analyzer() -> tuple[str, dict[str, str]]:
    """(binary, environment) for running perf_analyzer; FileNotFoundError when absent."""
    beside = Path(sys.executable).parent / "perf_analyzer"
    binary = str(beside) if beside.exists() else shutil.which("perf_analyzer")
    if binary is None:
        raise FileNotFoundError("perf_analyzer is missing: install tritonclient==2.51.0 (manylinux wheel)")
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime
    except ImportError:
        return binary, env
    libs = [str(Path(p) / "lib") for p in nvidia.cuda_runtime.__path__]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")])
    return binary, env
