"""A real tritonserver on free loopback ports serving the tiny model, and what the served tests
read off it: clients, error statuses, metrics, shared memory, processes left behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path


@contextlib.contextmanager
def running_server(cache_dir: Path, log_dir: Path, env: dict | None = None, **options):
    """Start a server (options: sd_backend.launcher.ServerOptions fields), yield it ready, stop it.
    SD_TEST_SHOW_LOG=1 prints its log afterwards."""
    from sd_backend.launcher import ServerOptions, TritonServer

    log = Path(log_dir) / "tritonserver.log"
    env = {"SD_MODEL": "tiny", "SD_CACHE_DIR": str(cache_dir), **(env or {})}
    server = TritonServer(ServerOptions.on_free_ports(env=env, **options), log_path=log).start_ready(300)
    try:
        yield server
    finally:
        server.stop()
        if os.environ.get("SD_TEST_SHOW_LOG"):
            print(log.read_text())


def client(url: str, protocol: str = "grpc", timeout_s: float = 120):
    from sd_client import SDClient

    return SDClient(url, protocol, timeout_s=timeout_s)


def status_of(err) -> str:
    """The error's status as tritonclient reports it: 'StatusCode.X' (gRPC) or '400' (HTTP)."""
    return str(err.status())


def is_invalid_arg(err) -> bool:
    return status_of(err) in ("StatusCode.INVALID_ARGUMENT", "400")


def is_unavailable(err) -> bool:
    return status_of(err) in ("StatusCode.UNAVAILABLE", "503")


def http_status(url: str) -> int | str:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError as err:  # refused: the server is gone
        return type(err).__name__


def metric(server, name: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    match = re.search(rf"^{name}(?:\{{\}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def shm_mb(server) -> float:
    """/dev/shm pages in use by this server's Python-backend regions."""
    return sum(p.stat().st_blocks * 512 for p in Path("/dev/shm").glob(f"{server.shm_prefix}*")) / 2**20


def leftovers(server) -> tuple[list[int], list[str]]:
    """Stub processes and shared-memory regions of a stopped server (both should be none)."""
    stubs = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if server.shm_prefix.encode() in (entry / "cmdline").read_bytes():
                    stubs.append(int(entry.name))
    return stubs, [p.name for p in Path("/dev/shm").glob(f"{server.shm_prefix}*")]


def stub_rss_mib(server, model: str) -> float:
    """Resident memory of one model's Python-backend stub, MiB."""
    pid = next(pid for pid, name in server.stub_processes().items() if name == model)
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


class Serve:
    """`sd-triton serve` as a deployment runs it (the container's PID 1), output collected."""

    def __init__(self, cache_dir, exit_timeout_s: int = 30, env: dict | None = None, args: tuple = ()):
        from sd_backend.launcher import free_port

        self.http, self.grpc, metrics, self.health = (free_port() for _ in range(4))
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sd_backend.cli", "serve", "--http-port", str(self.http), "--grpc-port",
             str(self.grpc), "--metrics-port", str(metrics), "--health-port", str(self.health),
             "--exit-timeout", str(exit_timeout_s), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, SD_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", **(env or {})),
        )
        # keep reading: tritonserver logs to the same pipe and must never block on it
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("  try:"):
                self.ready.set()

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)
