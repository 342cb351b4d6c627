"""The launcher finds tritonserver and prepares a backend directory for this Python."""

from __future__ import annotations

import sys

from sd_backend.launcher import ServerOptions, find_tritonserver, prepare_backend_dir, server_command


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
