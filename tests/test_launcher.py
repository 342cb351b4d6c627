"""The launcher finds tritonserver and prepares a backend directory for this Python."""

from __future__ import annotations

import sys

import pytest

from sd_backend.launcher import DEFAULT_MODEL_REPOSITORY, ServerOptions, find_tritonserver, prepare_backend_dir, server_command


def test_backend_dir_uses_the_stub_of_this_python(tmp_path):
    binary, tree = find_tritonserver()
    assert binary.exists()
    backend = prepare_backend_dir(tree, tmp_path / "backends")
    stub = (backend / "python" / "triton_python_backend_stub").resolve()
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in stub.parts
    assert (backend / "python" / "libtriton_python.so").exists()


def test_server_binds_loopback_by_default(tmp_path):
    command = server_command(ServerOptions(), tmp_path / "tritonserver", None, "x_")
    assert "--http-address=127.0.0.1" in command
    assert "--grpc-address=127.0.0.1" in command
    assert "--metrics-address=127.0.0.1" in command
    restricted = [arg for arg in command if arg.startswith(("--grpc-restricted-protocol=", "--http-restricted-api="))]
    assert len(restricted) == 2 and all("model-repository,shared-memory" in arg for arg in restricted)


def test_every_model_of_the_repository_loads_at_once(tmp_path):
    models = [p for p in DEFAULT_MODEL_REPOSITORY.iterdir() if (p / "config.pbtxt").is_file()]
    assert len(models) > 4  # more than Triton's default of 4 load threads
    command = server_command(ServerOptions(), tmp_path / "tritonserver", None, "x_")
    assert f"--model-load-thread-count={len(models)}" in command


def test_serve_prints_endpoints_and_stops_cleanly_on_ctrl_c(tmp_path, cache_dir, tiny_dir):
    import os
    import signal
    import subprocess
    import time

    from sd_backend.launcher import free_port

    ports = [str(free_port()) for _ in range(4)]
    env = dict(os.environ, SD_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sd_backend.cli", "serve", "--http-port", ports[0], "--grpc-port", ports[1],
         "--metrics-port", ports[2], "--health-port", ports[3]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    lines = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("  try:"):
            break
    output = "".join(lines)
    assert f"gRPC     127.0.0.1:{ports[1]}" in output, output[-3000:]
    assert f"probes   http://127.0.0.1:{ports[3]}/ready" in output, output[-3000:]
    # the admin key's header, as HTTP and as gRPC take it
    assert "'sd-admin-key: " in output and "'triton-grpc-protocol-sd-admin-key: " in output, output[-3000:]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0
    with pytest.raises(OSError):  # the port is free again: the server is gone
        import socket

        socket.create_connection(("127.0.0.1", int(ports[1])), timeout=2)
