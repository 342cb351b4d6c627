"""Start `tritonserver` on the model repository with a Python backend that sees this
interpreter's packages.

Where `tritonserver` is on PATH (NVIDIA's container) it is used with its own
backends. Elsewhere the binary inside the `nvidia-pytriton` wheel is used, with a
backend directory made here: the Python backend plus the stub built for this
interpreter's Python version. The stub embeds libpython in isolated mode and finds
packages through the interpreter on PATH (it ignores PYTHONPATH in some builds), so
this interpreter's `bin` goes first on PATH.

`TritonServer` also does two things Triton 2.51 does not do by itself (README,
"Reliability"): it drains requests in flight before the server stops, and it reloads a
model whose Python-backend stub process died.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
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
    # On stop, requests in flight get this long to finish (Triton's --exit-timeout-secs too);
    # the process is gone at most STOP_GRACE_S later.
    exit_timeout_s: int = 30
    # Reloads of a model whose Python-backend stub died, per server; past it the model stays
    # unloaded, so the server reports not ready and an orchestrator can replace it.
    max_stub_restarts: int = 3
    python_shm_mb: int = 64  # Python-backend shared memory per model (a 1024x1024 image is 3 MB)
    # Model control, shared-memory, trace and logging APIs answer only requests that carry
    # the header `sd-admin-key: <admin_key>` (random per start unless set); None opens them.
    admin_key: str | None = field(default_factory=lambda: os.environ.get("SD_TRITON_ADMIN_KEY") or secrets.token_urlsafe(18))
    extra_args: list[str] = field(default_factory=list)

    @classmethod
    def on_free_ports(cls, **fields) -> "ServerOptions":
        """Options whose HTTP, gRPC and metrics ports are free loopback ports (tests, demos, benchmarks)."""
        return cls(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), **fields)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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
        # explicit model control (every model still loads at start) lets the launcher drain
        # the entry models on stop and reload a model whose stub died
        "--model-control-mode=explicit",
        "--load-model=*",
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


STOP_GRACE_S = 15  # after the drain, how long the signalled server may take to exit
STUB_POLL_S = 0.5  # how often the watcher looks for dead Python-backend stubs


class TritonServer:
    """A running `tritonserver`; a context manager that stops it on exit.

    Graceful stop: on SIGINT/SIGTERM Triton 2.51 stops every model's scheduler at once, so
    an ensemble request in flight fails at its next step ("Server is stopping"). `stop()`
    first unloads the entry models (those no ensemble runs as a step): new requests get
    NOT_FOUND and the server reports not ready, while requests in flight finish through
    the composing models, which stay loaded. Then it signals the server.

    Dead stubs: when a Python-backend stub process dies (OOM killer, segfault, kill -9),
    Triton 2.51 fails that model's requests ("Stub process ... is not healthy") until it is
    reloaded, restarts nothing, and still reports the model ready. A watcher thread sees
    the stub gone within STUB_POLL_S, unloads the model (the server reports not ready),
    then loads it again: a new stub. `stub_deaths` lists the models it found dead.
    """

    def __init__(self, options: ServerOptions, log_path: Path | None = None):
        self.options = options
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.shm_prefix = f"sdt{os.getpid()}_{id(self) % 10000}_"  # Python-backend regions in /dev/shm
        self.stub_deaths: list[str] = []
        self._workdir = Path(tempfile.mkdtemp(prefix="sd-triton-"))
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        return f"{self.options.host}:{self.options.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.options.host}:{self.options.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.options.host}:{self.options.metrics_port}/metrics"

    def deployment(self):
        """The DeploymentConfig the served models will read (their repository's
        deployment.toml, then the SD_* variables of this environment and of `options.env`)."""
        from .config import DeploymentConfig

        return DeploymentConfig.load(self.options.model_repository, environ={**os.environ, **self.options.env})

    def start(self) -> "TritonServer":
        """Check the repository against its deployment (ValueError naming what disagrees), then start."""
        from .repository import check_repository

        check_repository(self.options.model_repository, self.deployment())
        binary, tree = find_tritonserver()
        backend_dir = prepare_backend_dir(tree, self._workdir / "backends") if tree is not None else None
        command = server_command(self.options, binary, backend_dir, self.shm_prefix)
        log = open(self.log_path, "wb") if self.log_path else None
        self.process = subprocess.Popen(
            command,
            env=server_environment(self.options, tree),
            stdout=log or None,
            stderr=subprocess.STDOUT if log else None,
            start_new_session=True,  # Ctrl-C reaches us; we forward it once
        )
        self._watcher = threading.Thread(target=self._watch_stubs, name="sd-triton-stub-watcher", daemon=True)
        self._watcher.start()
        return self

    def is_ready(self) -> bool:
        return self._answers_ok("/v2/health/ready")

    def is_model_ready(self, model: str) -> bool:
        return self._answers_ok(f"/v2/models/{model}/ready")

    def _answers_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as reply:
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

    def stub_processes(self) -> dict[int, str]:
        """{pid: model name} of the live Python-backend stubs of this server."""
        stubs: dict[int, str] = {}
        if self.process is None:
            return stubs
        for pid, argv in _stubs(parent=self.process.pid).items():
            if _alive(pid):
                stubs[pid] = Path(argv[1]).parent.parent.name
        return stubs

    def rss_mib(self) -> float:
        """Resident memory of tritonserver and its Python-backend stubs, MiB (Linux /proc)."""
        total_kb = 0
        for pid in ([self.process.pid] if self.process else []) + list(self.stub_processes()):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:  # gone since it was listed
                continue
            total_kb += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))
        return total_kb / 1024

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Drain the entry models, SIGINT (Triton's graceful shutdown), SIGKILL past the deadline.

        Requests in flight get `exit_timeout_s` (or `timeout_s`) to finish; the process is
        gone at most STOP_GRACE_S later. Stubs left behind and their shared memory go too.
        """
        self._stopping.set()
        try:
            if self.process is None or self.process.poll() is not None:
                return None if self.process is None else self.process.returncode
            deadline = time.monotonic() + (self.options.exit_timeout_s if timeout_s is None else timeout_s)
            self._drain(deadline)
            self.process.send_signal(signal.SIGINT)
            try:
                return self.process.wait(max(0.0, deadline - time.monotonic()) + STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                return self.process.wait()
        finally:
            self._clean_up()

    def start_ready(self, timeout_s: float = 300.0) -> "TritonServer":
        """start() and wait_ready(); on failure the server is stopped and the end of its
        log printed to stderr."""
        self.start()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            if self.log_path is not None and Path(self.log_path).exists():
                print(Path(self.log_path).read_text(errors="replace")[-5000:], file=sys.stderr)
            raise
        return self

    def __enter__(self) -> "TritonServer":
        return self.start_ready()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- model control (the admin API) ---------------------------------------------------

    def _admin(self, path: str, timeout_s: float, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.options.admin_key is not None:
            headers[ADMIN_HEADER] = self.options.admin_key
        request = urllib.request.Request(
            f"http://{self.http_url}{path}", data=json.dumps(body or {}).encode(), headers=headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            text = reply.read()
        return json.loads(text) if text else None

    def _model_states(self, timeout_s: float = 10) -> dict[str, str]:
        return {m["name"]: m.get("state", "") for m in self._admin("/v2/repository/index", timeout_s)}

    def _entry_models(self, states: dict[str, str], timeout_s: float = 10) -> list[str]:
        """Loaded models that no ensemble runs as a step: where requests come in."""
        steps = set()
        for model, state in states.items():
            if state == "READY":
                url = f"http://{self.http_url}/v2/models/{model}/config"
                with urllib.request.urlopen(url, timeout=timeout_s) as reply:
                    config = json.loads(reply.read())
                steps |= {step["model_name"] for step in config.get("ensemble_scheduling", {}).get("step", [])}
        return [model for model, state in states.items() if state == "READY" and model not in steps]

    def _drain(self, deadline: float) -> None:
        """Unload the entry models and wait until their requests in flight are done."""

        def left() -> float:  # no call outlives the deadline
            return max(0.1, min(10.0, deadline - time.monotonic()))

        try:
            entry = self._entry_models(self._model_states(left()), left())
            for model in entry:
                self._admin(f"/v2/repository/models/{model}/unload", left())
            # an unloading model keeps serving the requests it holds; it is UNAVAILABLE once they are done
            while time.monotonic() < deadline:
                states = self._model_states(left())
                if all(states.get(model) not in ("READY", "UNLOADING") for model in entry):
                    return
                time.sleep(0.2)
        except (urllib.error.URLError, ConnectionError, OSError, ValueError, KeyError) as err:
            if not isinstance(getattr(err, "reason", err), ConnectionRefusedError):  # refused: nothing to drain
                print(f"sd-triton: could not drain before stopping ({err}); stopping anyway", file=sys.stderr, flush=True)

    # --- dead stubs ----------------------------------------------------------------------

    def _watch_stubs(self) -> None:
        watched: dict[int, str] = {}  # stubs seen while their model was ready
        while not self._stopping.wait(STUB_POLL_S):
            if self.process is None or self.process.poll() is not None:
                return
            for pid, model in self.stub_processes().items():
                # a stub of a model that is loading (or an auto-complete stub) is not watched yet
                if pid not in watched and self.is_model_ready(model):
                    watched[pid] = model
            for pid, model in list(watched.items()):
                if _alive(pid):
                    continue
                del watched[pid]
                # a stub also exits when its model is unloaded on purpose; then the model is not ready
                if not self._stopping.is_set() and self.is_model_ready(model):
                    self._reload(model)

    def _reload(self, model: str) -> None:
        self.stub_deaths.append(model)
        again = len(self.stub_deaths) <= self.options.max_stub_restarts
        print(
            f"sd-triton: the Python-backend stub of model '{model}' died; "
            + ("reloading the model" if again else f"leaving it unloaded ({self.options.max_stub_restarts} reloads done)"),
            file=sys.stderr,
            flush=True,
        )
        try:
            self._admin(f"/v2/repository/models/{model}/unload", 30)
            if again:
                # ensembles that run the model as a step are unloaded with it and load again after it
                self._admin(f"/v2/repository/models/{model}/load", 900)
                print(f"sd-triton: model '{model}' reloaded", file=sys.stderr, flush=True)
        except (urllib.error.URLError, ConnectionError, OSError) as err:
            print(f"sd-triton: reloading model '{model}' failed: {err}", file=sys.stderr, flush=True)

    def _clean_up(self) -> None:
        """Kill stubs the server left behind (it crashed, or was killed) and remove their shared memory."""
        for pid, argv in _stubs().items():
            if argv[2].startswith(self.shm_prefix):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        shutil.rmtree(self._workdir, ignore_errors=True)


def _processes(parent: int | None = None) -> dict[int, list[str]]:
    """{pid: argv} of the processes this user can see (from /proc), or of `parent`'s children."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if parent is not None and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        found[int(entry.name)] = [arg.decode(errors="replace") for arg in argv if arg]
    return found


def _stubs(parent: int | None = None) -> dict[int, list[str]]:
    """{pid: argv} of Python-backend stubs (of `parent` when given); argv is the stub,
    <repository>/<model>/<version>/model.py, its shared-memory region, ..."""
    return {
        pid: argv
        for pid, argv in _processes(parent).items()
        if len(argv) > 2 and argv[0].endswith("triton_python_backend_stub")
    }


def _alive(pid: int) -> bool:
    """Running, not exited: an exited stub stays a zombie until the server reaps it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
