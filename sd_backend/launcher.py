"""Start `tritonserver` on the model repository with a Python backend that sees this
interpreter's packages.

Where `tritonserver` is on PATH (NVIDIA's container) it is used with its own
backends. Elsewhere the binary inside the `nvidia-pytriton` wheel is used, with a
backend directory made here: the Python backend plus the stub built for this
interpreter's Python version. The stub embeds libpython in isolated mode and finds
packages through the interpreter on PATH (it ignores PYTHONPATH in some builds), so
this interpreter's `bin` goes first on PATH.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_HEADER = "sd-admin-key"
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"


@dataclass
class ServerOptions:
    """What `sd-triton serve` starts."""

    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    host: str = "127.0.0.1"  # bind to loopback unless told otherwise
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    env: dict[str, str] = field(default_factory=dict)  # SD_* deployment overrides
    log_verbose: int = 0
    exit_timeout_s: int = 30
    python_shm_mb: int = 64  # Python-backend shared memory per model (a 1024x1024 image is 3 MB)
    # Model control, shared-memory, trace and logging APIs answer only requests that carry
    # the header `sd-admin-key: <admin_key>` (random per start unless set); None opens them.
    admin_key: str | None = field(default_factory=lambda: os.environ.get("SD_TRITON_ADMIN_KEY") or secrets.token_urlsafe(18))
    extra_args: list[str] = field(default_factory=list)


def find_tritonserver() -> tuple[Path, Path | None]:
    """(tritonserver binary, the pytriton tree it came from or None when on PATH)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), None
    import importlib.util

    # located, not imported: importing pytriton pulls in its own dependencies
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "tritonserver is not on PATH and nvidia-pytriton is not installed: "
            "use NVIDIA's tritonserver container or `pip install nvidia-pytriton`"
        )
    tree = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return tree / "bin" / "tritonserver", tree


def prepare_backend_dir(tree: Path, into: Path) -> Path:
    """A backend directory whose Python backend uses the stub of this interpreter's version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = tree / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"no Python backend stub for Python {version} in {tree}")
    python_dir = into / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in (tree / "backends" / "python").iterdir():
        if item.name != "__pycache__":
            _link(item, python_dir / item.name)
    # a link keeps the stub's relative rpath ($ORIGIN resolves through it)
    _link(stub, python_dir / "triton_python_backend_stub")
    return into


def _link(source: Path, target: Path) -> None:
    if target.is_symlink() or target.exists():
        target.unlink()
    target.symlink_to(source)


def server_environment(options: ServerOptions, tree: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(options.env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    libs = [sysconfig.get_config_var("LIBDIR") or ""]
    if tree is not None:
        libs.append(str(tree.parent.parent / "nvidia_pytriton.libs"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs + [env.get("LD_LIBRARY_PATH", "")] if p)
    return env


def server_command(options: ServerOptions, binary: Path, backend_dir: Path | None, shm_prefix: str) -> list[str]:
    command = [
        str(binary),
        f"--model-repository={options.model_repository}",
        f"--http-address={options.host}",
        f"--http-port={options.http_port}",
        f"--grpc-address={options.host}",
        f"--grpc-port={options.grpc_port}",
        f"--metrics-address={options.host}",
        f"--metrics-port={options.metrics_port}",
        f"--exit-timeout-secs={options.exit_timeout_s}",
        f"--log-verbose={options.log_verbose}",
        "--strict-readiness=true",
        # a unique shared-memory prefix lets several servers run on one host
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        f"--backend-config=python,shm-default-byte-size={options.python_shm_mb * 1024 * 1024}",
    ]
    if options.admin_key is not None:
        restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={options.admin_key}"
        command += [f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}"]
    if backend_dir is not None:
        command.append(f"--backend-directory={backend_dir}")
    return command + options.extra_args


class TritonServer:
    """A running `tritonserver`; a context manager that stops it on exit."""

    def __init__(self, options: ServerOptions, log_path: Path | None = None):
        self.options = options
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="sd-triton-"))

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    def start(self) -> "TritonServer":
        binary, tree = find_tritonserver()
        backend_dir = prepare_backend_dir(tree, self._workdir / "backends") if tree is not None else None
        command = server_command(self.options, binary, backend_dir, f"sdt{os.getpid()}_{id(self) % 10000}_")
        log = open(self.log_path, "wb") if self.log_path else None
        self.process = subprocess.Popen(
            command,
            env=server_environment(self.options, tree),
            stdout=log or None,
            stderr=subprocess.STDOUT if log else None,
            start_new_session=True,  # Ctrl-C reaches us; we forward it once
        )
        return self

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.process.returncode} before it was ready")
            if self.is_ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"tritonserver was not ready within {timeout_s:.0f} s")

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGINT (Triton's graceful shutdown), then SIGKILL past the exit timeout."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        timeout_s = self.options.exit_timeout_s + 15 if timeout_s is None else timeout_s
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()
        finally:
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
