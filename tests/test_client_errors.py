"""What a person at the keyboard sees when no server answers: one line that says what
happened and what to do, from every client path, and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sd_backend.launcher import free_port


@pytest.fixture
def nowhere() -> str:
    return f"127.0.0.1:{free_port()}"  # free: nothing listens there


@pytest.mark.parametrize(
    "args, protocol",
    [([], "gRPC"), (["--protocol", "http"], "HTTP"), (["--progress"], "gRPC"), (["-n", "3"], "gRPC")],
    ids=["grpc", "http", "progress", "three"],
)
def test_sd_client_without_a_server_says_what_to_do(tmp_path, nowhere, args, protocol):
    done = subprocess.run(
        [sys.executable, "-m", "sd_client.cli", "a cat", "--url", nowhere, "-o", str(tmp_path / "x.png"), *args],
        capture_output=True, text=True, timeout=120,
    )
    output = done.stdout + done.stderr
    expected = f"cannot reach Triton at {nowhere} over {protocol}: connection refused - is `sd-triton serve` running"
    assert done.returncode == 1, output
    assert output.count(expected) == 1, output  # once, even for three requests
    assert "failed to connect to all addresses" not in output and "no longer in valid state" not in output
    if "-n" in args:
        assert "3/3" not in output and "3 of 3 requests failed" in output  # failures are not images done


def test_the_web_page_gets_the_same_words(nowhere):
    from sd_client import SDClient
    from sd_client.ui import App, default_metrics_url

    app = App(SDClient(nowhere), default_metrics_url(nowhere))
    job = app.start("a cat", {"steps": 2})
    job.thread.join(60)
    name, payload = job.events.get(timeout=1)
    assert name == "failed" and payload["message"].startswith(f"cannot reach Triton at {nowhere} over gRPC"), payload


def test_is_ready_says_the_same(nowhere):
    from sd_client import SDClient, ServerUnreachable

    for protocol in ("grpc", "http"):
        with pytest.raises(ServerUnreachable, match="cannot reach Triton"):
            SDClient(nowhere, protocol).is_ready()
