"""The streaming path against a real tritonserver: progress per step, previews, the same
image as the plain ensemble, cancellation that stops the server's work, clear errors."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.utils import assert_same_image, model_counts


@pytest.fixture(scope="module")
def client(server):
    from sd_client import SDClient

    client = SDClient(server.grpc_url, "grpc", timeout_s=300)
    yield client
    client.close()


def test_progress_per_step_then_the_ensembles_image(client):
    seen = []
    streamed = client.stream("a red cube", seed=21, steps=6, scheduler="euler_a", on_progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4, 5, 6]
    assert {p.total for p in seen} == {6}
    assert all(p.preview is None for p in seen)
    plain = client.generate("a red cube", seed=21, steps=6, scheduler="euler_a")
    assert streamed.seed == plain.seed == 21
    assert_same_image(streamed.image, plain.image, max_diff=0)


def test_previews_every_n_steps_at_latent_size(client):
    seen = []
    client.stream("a blue sphere", seed=3, steps=7, height=128, width=64, preview_every=3, on_progress=seen.append)
    with_preview = [p.step for p in seen if p.preview is not None]
    assert with_preview == [3, 6, 8]  # every 3rd step and the last (PNDM runs steps + 1)
    assert seen[-1].step == seen[-1].total == 8
    preview = seen[2].preview
    assert preview.dtype == np.uint8 and preview.shape == (16, 8, 3)
    assert preview.std() > 0  # a picture, not a constant


def test_cancel_stops_the_work_and_frees_the_model(client):
    from sd_client import Cancelled

    began = time.perf_counter()
    client.stream("a reference", seed=1, steps=10, height=256, width=256)
    per_step = (time.perf_counter() - began) / 10  # with the encoder and decoder: an overestimate

    seen = []

    def stop_after_two(progress):
        seen.append(progress.step)
        return progress.step < 2

    began = time.perf_counter()
    with pytest.raises(Cancelled):
        client.stream("a slow one", seed=1, steps=150, height=256, width=256, on_progress=stop_after_two)
    # the next request on the same (single-instance) model must not wait for 148 more steps
    quick = client.stream("next", seed=2, steps=2)
    after_cancel = time.perf_counter() - began
    assert quick.image.shape == (64, 64, 3)
    assert seen == [1, 2]  # no progress reaches the caller after its cancel
    # the whole request would take 150 steps: the server stopped soon after the cancel
    assert after_cancel < 40 * per_step, (after_cancel, per_step)


def test_cancel_event_from_another_thread(client):
    from sd_client import Cancelled

    cancel = threading.Event()
    timer = threading.Timer(0.5, cancel.set)
    timer.start()
    with pytest.raises(Cancelled):
        client.stream("cancel me", seed=5, steps=150, height=256, width=256, cancel=cancel)
    timer.cancel()
    assert client.stream("after", seed=6, steps=2).image.shape == (64, 64, 3)


def _streams_at_once(server, jobs: list[dict], on_progress) -> list:
    """Each job (SDClient.stream's keywords) on its own client, started together; results
    (or the exception raised) in order."""
    from sd_client import SDClient

    clients = [SDClient(server.grpc_url, "grpc", timeout_s=300) for _ in jobs]
    start = threading.Barrier(len(jobs))

    def one(i: int):
        start.wait()
        try:
            return clients[i].stream(on_progress=lambda p: on_progress(i, p), **jobs[i])
        except Exception as err:  # noqa: BLE001 - returned to the test
            return err
        finally:
            clients[i].close()

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, range(len(jobs))))


def test_concurrent_streams_share_the_unets_batches_each_with_its_own_progress(server, client):
    """No UNet of its own: streams arriving together denoise in one batch of the unet model
    (which batches them with the ensemble's too), each getting its own reports and image."""
    import tritonclient.grpc as tg

    jobs = [dict(prompt=f"a lantern {i}", seed=40 + i, steps=6, scheduler="euler", preview_every=3) for i in range(4)]
    alone = [client.generate(j["prompt"], seed=j["seed"], steps=6, scheduler="euler").image for j in jobs]
    stats = tg.InferenceServerClient(server.grpc_url)
    before = model_counts(stats, "unet")
    seen = [[] for _ in jobs]
    results = _streams_at_once(server, jobs, lambda i, p: seen[i].append(p))
    after = model_counts(stats, "unet")
    stats.close()
    for i, result in enumerate(results):
        assert not isinstance(result, Exception), result
        assert [p.step for p in seen[i]] == [1, 2, 3, 4, 5, 6]
        assert [p.step for p in seen[i] if p.preview is not None] == [3, 6]
        assert_same_image(result.image, alone[i])  # one level where the batch size changes rounding
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == len(jobs)
    assert executions < inferences, f"streams not batched: {executions} unet executions for {inferences} streams"


def test_a_stream_cancelled_inside_a_batch_leaves_the_others_running(server, client):
    from sd_client import Cancelled

    common = dict(steps=40, height=128, width=128, scheduler="euler")
    jobs = [dict(prompt="kept", seed=51, **common), dict(prompt="dropped", seed=52, **common)]
    seen = [[] for _ in jobs]

    def progress(i, p):
        seen[i].append(p.step)
        return i == 0 or p.step < 3  # the second cancels at its third step

    kept, dropped = _streams_at_once(server, jobs, progress)
    assert isinstance(dropped, Cancelled), dropped
    assert seen[1] == [1, 2, 3]
    assert not isinstance(kept, Exception), kept
    assert seen[0] == list(range(1, 41))
    assert_same_image(kept.image, client.generate("kept", seed=51, **common).image)


@pytest.mark.parametrize(
    "parameters, words",
    [
        (dict(height=65), ["HEIGHT", "65"]),
        (dict(steps=0), ["STEPS", "0"]),
        (dict(scheduler="warp"), ["SCHEDULER", "warp"]),
        (dict(steps=5, preview_every=9), ["PREVIEW_EVERY", "9"]),
        (dict(preview_every=-1), ["PREVIEW_EVERY", "-1"]),
    ],
)
def test_bad_input_gets_a_clear_error_on_the_stream(client, parameters, words):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        client.stream("x", **parameters)
    message = caught.value.message()
    assert all(w in message for w in words), message
    assert client.stream("fine", seed=1, steps=2).image.shape == (64, 64, 3)  # and the model goes on


def test_prompt_missing_or_too_long_is_named_on_the_stream(server, client):
    import queue

    import numpy as np
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as caught:
        client.stream("x" * 9000, steps=2)
    assert "PROMPT: 9000 bytes; allowed at most 8192" in caught.value.message()

    answers: queue.Queue = queue.Queue()
    raw = tg.InferenceServerClient(server.grpc_url)
    raw.start_stream(callback=lambda result, error: answers.put(error))
    steps = tg.InferInput("STEPS", [1, 1], "INT32")
    steps.set_data_from_numpy(np.array([[2]], np.int32))
    raw.async_stream_infer("stable_diffusion_stream", [steps])
    error = answers.get(timeout=60)
    raw.stop_stream()
    raw.close()
    assert error is not None and "PROMPT: missing; a text string is required" in error.message(), error


def test_http_has_no_stream(server):
    from sd_client import SDClient

    with pytest.raises(ValueError, match="gRPC"):
        SDClient(server.http_url, "http").stream("x")


def test_cli_progress_bar(server, tmp_path):
    out = tmp_path / "p.png"
    done = subprocess.run(
        [sys.executable, "-m", "sd_client.cli", "a cat", "--progress", "--steps", "5", "--scheduler", "euler", "--seed", "4", "-o", str(out), "--url", server.grpc_url],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert out.exists()
    assert "5/5" in done.stderr  # the bar reached the last step
    assert f"wrote {out}" in done.stdout + done.stderr
