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

import itertools
import os
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
from dataclasses import dataclass, field
from pathlib import Path

from . import processes
from .health import HealthServer
from .model_control import ADMIN_HEADER, UNREACHABLE, ModelControl

REPO_ROOT = Path(__file__).resolve().parents[1]
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "model_repository"


@dataclass
class ServerOptions:
    """What `sd-triton serve` starts."""

    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    host: str = "127.0.0.1"  # bind to loopback unless told otherwise
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    # the launcher's own /ready and /live for probes (sd_backend.health); None: not served
    health_port: int | None = None
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
        """Options whose HTTP, gRPC, metrics and health ports are free loopback ports (tests, demos, benchmarks)."""
        ports = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), health_port=free_port())
        return cls(**{**ports, **fields})


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
    # the launcher fetched the model before the server started: the stubs find it in the cache
    env["HF_HUB_OFFLINE"] = "1"
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
        f"--model-load-thread-count={load_threads(options.model_repository)}",
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


def load_threads(repository: Path) -> int:
    """One load thread per model of the repository (Triton's default is 4, fewer than the
    five Python-backend models here): every stage loads at once, so the time to ready is the
    slowest stage's load, not a queue of them."""
    return max(4, sum(1 for _ in Path(repository).glob("*/config.pbtxt")))


STOP_GRACE_S = 15  # past the deadline, how long the signalled server may take to exit
IDLE_EXIT_S = 3  # with every model unloaded, how long it may wait for clients' open connections (it exits in ~1 s without)
STUB_POLL_S = 0.5  # how often the watcher looks for dead Python-backend stubs


class TritonServer:
    """A running `tritonserver`; a context manager that stops it on exit.

    Graceful stop: on SIGINT/SIGTERM Triton 2.51 stops every model's scheduler at once, so
    an ensemble request in flight fails at its next step ("Server is stopping"). `stop()`
    first drains (the entry models, then the rest; see `stop`), then signals the server.

    Dead stubs: when a Python-backend stub process dies (OOM killer, segfault, kill -9),
    Triton 2.51 fails that model's requests ("Stub process ... is not healthy") until it is
    reloaded, restarts nothing, and still reports the model ready. A watcher thread sees
    the stub gone within STUB_POLL_S and reloads the model in place: a new stub, while the
    ensembles that run it stay loaded. `stub_deaths` lists the models it found dead.
    """

    def __init__(self, options: ServerOptions, log_path: Path | None = None):
        self.options = options
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.shm_prefix = f"sdt{os.getpid()}_{id(self) % 10000}_"  # Python-backend regions in /dev/shm
        self.stub_deaths: list[str] = []
        self.control = ModelControl(self.http_url, options.admin_key)
        self.health: HealthServer | None = None
        self.model_dir: Path | None = None  # the local copy of the deployment's model, once started
        self.model_files_s = 0.0  # how long start() took to get that copy (written, fetched or found)
        self._replacing: set[str] = set()  # models whose dead stub is being replaced
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
        """Check the repository against its deployment (ValueError naming what disagrees), get
        the model's files onto this machine once (sd_backend.fetch; ModelUnavailable, a
        ValueError, naming what is wrong), then start, the stubs resolving the model offline."""
        from .fetch import local_model
        from .repository import check_repository

        deployment = self.deployment()
        check_repository(self.options.model_repository, deployment)
        began = time.perf_counter()
        self.model_dir = local_model(deployment, progress=True)
        self.model_files_s = time.perf_counter() - began
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
        if self.options.health_port is not None:
            self.health = HealthServer(self.options.host, self.options.health_port, self.readiness, self.liveness).start()
        return self

    @property
    def health_url(self) -> str | None:
        return None if self.health is None else f"http://{self.options.host}:{self.health.port}"

    def readiness(self) -> tuple[bool, str]:
        """(ready, why): every model this deployment serves is ready, no dead stub is being
        replaced and no stop has begun (sd_backend.health says why Triton's own check is not enough)."""
        from .repository import SERVED_MODELS

        if self.process is None or self.process.poll() is not None:
            return False, "tritonserver is not running"
        if self._stopping.is_set():
            return False, "stopping: requests in flight are finishing"
        if self._replacing:
            return False, f"replacing the dead Python-backend stub of {', '.join(sorted(self._replacing))}"
        waiting = [model for model in SERVED_MODELS if not self.control.is_model_ready(model)]
        return (False, f"not ready: {', '.join(waiting)}") if waiting else (True, "ready")

    def liveness(self) -> tuple[bool, str]:
        """(live, why): tritonserver runs and answers its own liveness check."""
        if self.process is None or self.process.poll() is not None:
            return False, "tritonserver is not running"
        return (True, "live") if self.control.answers_ok("/v2/health/live") else (False, "tritonserver does not answer")

    def is_ready(self) -> bool:
        return self.readiness()[0]

    def is_model_ready(self, model: str) -> bool:
        return self.control.is_model_ready(model)

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
        if self.process is None:
            return {}
        found = processes.stubs(parent=self.process.pid).items()
        return {pid: Path(argv[1]).parent.parent.name for pid, argv in found if processes.alive(pid)}

    def rss_mib(self) -> float:
        """Resident memory of tritonserver and its Python-backend stubs, MiB (Linux /proc)."""
        return processes.rss_mib(([self.process.pid] if self.process else []) + list(self.stub_processes()))

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Drain, then stop; returns the exit code (0 for a clean stop).

        Requests in flight get `exit_timeout_s` (or `timeout_s`) to finish:
        1. the entry models are unloaded: new requests get NOT_FOUND and readiness goes false,
           while requests in flight finish through the composing models, which stay loaded;
        2. once those requests are done the composing models are unloaded too, so nothing
           can be in flight and every stub has finalized;
        3. SIGINT. Tritonserver 2.51 then waits for every open HTTP connection, idle
           keep-alive ones included (load balancers, probes, tritonclient keep them), up to
           its exit timeout, and exits with code 1. With everything unloaded there is nothing
           left to wait for: past IDLE_EXIT_S it is killed, and the stop is clean.
        A drain that does not finish by the deadline gets STOP_GRACE_S more, then SIGKILL.
        Stubs left behind and their shared memory go too.
        """
        self._stopping.set()
        try:
            if self.process is None or self.process.poll() is not None:
                return None if self.process is None else self.process.returncode
            deadline = time.monotonic() + (self.options.exit_timeout_s if timeout_s is None else timeout_s)
            drained = self._drain(deadline)
            self.process.send_signal(signal.SIGINT)
            try:
                return self.process.wait(IDLE_EXIT_S if drained else max(0.0, deadline - time.monotonic()) + STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                code = self.process.wait()
            if not drained:
                return code
            print(
                "sd-triton: every model was unloaded with nothing in flight; tritonserver was still waiting for "
                "clients' open connections, so it was stopped",
                file=sys.stderr,
                flush=True,
            )
            return 0
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

    def _drain(self, deadline: float) -> bool:
        """Unload the entry models, then the rest, each once its requests are done; True
        when everything was unloaded by the deadline."""
        try:
            control = self.control
            if not control.unload_and_wait(control.entry_models(control.states()), deadline):
                return False
            return control.unload_and_wait([m for m, state in control.states().items() if state == "READY"], deadline)
        except UNREACHABLE + (ValueError, KeyError) as err:
            if not isinstance(getattr(err, "reason", err), ConnectionRefusedError):  # refused: nothing to drain
                print(f"sd-triton: could not drain before stopping ({err}); stopping anyway", file=sys.stderr, flush=True)
            return False

    # --- dead stubs ----------------------------------------------------------------------

    def _watch_stubs(self) -> None:
        watched: dict[int, str] = {}  # stubs seen while their model was ready
        seen: dict[int, int] = {}  # stub -> the poll it was first listed at
        for poll in itertools.count():
            if self._stopping.wait(STUB_POLL_S) or self.process is None or self.process.poll() is not None:
                return
            stubs = self.stub_processes()
            for pid, model in stubs.items():
                seen.setdefault(pid, poll)
                # a stub of a model that is loading (or an auto-complete stub) is not watched yet
                if pid not in watched and self.is_model_ready(model):
                    watched[pid] = model
            for pid, model in list(watched.items()):
                if pid not in watched or processes.alive(pid):
                    continue
                del watched[pid]
                # A stub also exits on purpose when its model is unloaded (then the model is not
                # ready) or loaded again: Triton stops a model's instances one after another, the
                # last ones maybe after the new ones are ready. Stubs of one load start within a
                # poll of each other; a stub listed two polls or more after this one is a newer load's.
                load = seen[pid] + 1  # the last poll at which a stub of the same load was listed
                reloaded = any(m == model and seen[p] > load for p, m in stubs.items())
                if not reloaded and not self._stopping.is_set() and self.is_model_ready(model):
                    self._reload(model)
                    reloaded = True
                if reloaded:  # the other stubs of the old load go too, on purpose
                    watched = {p: m for p, m in watched.items() if m != model or seen[p] > load}

    def _reload(self, model: str) -> None:
        self.stub_deaths.append(model)
        again = len(self.stub_deaths) <= self.options.max_stub_restarts
        print(
            f"sd-triton: the Python-backend stub of model '{model}' died; "
            + ("reloading the model" if again else f"leaving it unloaded ({self.options.max_stub_restarts} reloads done)"),
            file=sys.stderr,
            flush=True,
        )
        self._replacing.add(model)
        try:
            if again:
                # in place: the new instance replaces the dead one once it is ready, and the
                # ensembles that run the model as a step stay loaded
                self.control.reload_in_place(model, 900)
                print(f"sd-triton: model '{model}' reloaded", file=sys.stderr, flush=True)
            else:
                self.control.unload(model, 30)  # its ensembles go with it
        except UNREACHABLE as err:
            print(f"sd-triton: reloading model '{model}' failed: {err}", file=sys.stderr, flush=True)
        finally:
            self._replacing.discard(model)

    def _clean_up(self) -> None:
        """Kill stubs the server left behind (it crashed, or was killed) and remove their shared memory."""
        if self.health is not None:
            self.health.stop()
            self.health = None
        for pid, argv in processes.stubs().items():
            if argv[2].startswith(self.shm_prefix):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
        shutil.rmtree(self._workdir, ignore_errors=True)
