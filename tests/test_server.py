"""End to end against a real tritonserver process serving the tiny model."""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from sd_backend.config import SCHEDULER_NAMES
from tests.conftest import reference_image
from tests.utils import assert_same_image, model_counts

STEPS = 12


@pytest.fixture(scope="module")
def http(server):
    from sd_client import SDClient

    client = SDClient(server.http_url, "http")
    yield client
    client.close()


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_image_matches_diffusers_pipeline(request, reference_pipeline, protocol, scheduler):
    client = request.getfixturevalue(protocol)
    params = dict(seed=1234, steps=STEPS, guidance=7.5, scheduler=scheduler, negative="blurry")
    result = client.generate(
        "a photo of an astronaut riding a horse",
        negative_prompt=params["negative"],
        seed=params["seed"],
        steps=STEPS,
        guidance_scale=7.5,
        scheduler=scheduler,
    )
    expected = reference_image(reference_pipeline, "a photo of an astronaut riding a horse", **params)
    assert result.seed == 1234
    # Served alone, the image is the pipeline's to the bit.
    assert_same_image(result.image, expected, max_diff=0)


def test_omitted_inputs_take_defaults_and_random_seed_is_reported(grpc, reference_pipeline):
    first = grpc.generate("a cat", steps=3)
    second = grpc.generate("a cat", steps=3)
    assert first.image.shape == (64, 64, 3)  # the tiny model's native size
    assert first.seed != second.seed
    again = grpc.generate("a cat", steps=3, seed=first.seed)
    assert_same_image(again.image, first.image, max_diff=0)
    # defaults: guidance 7.5, PNDM, empty negative prompt
    expected = reference_image(reference_pipeline, "a cat", seed=first.seed, steps=3, guidance=7.5, scheduler="pndm")
    assert_same_image(first.image, expected, max_diff=0)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_the_png_records_every_parameter_so_it_alone_reproduces_its_image(request, protocol, tmp_path):
    """Defaults included: a PNG made with nothing but a prompt names the steps, guidance,
    size, scheduler, seed and model the server used, and they make the same image again."""
    from PIL import Image

    from sd_client import save_png

    client = request.getfixturevalue(protocol)
    made = client.generate("a lighthouse", steps=2)  # everything else the deployment's
    path = save_png(made, tmp_path / "made.png")
    text = Image.open(path).text
    assert {k: text[k] for k in ("prompt", "model", "steps", "guidance_scale", "height", "width", "scheduler")} == {
        "prompt": "a lighthouse", "model": "tiny", "steps": "2", "guidance_scale": "7.5",
        "height": "64", "width": "64", "scheduler": "pndm",
    }
    assert "negative_prompt" not in text  # none was sent (SDXL reads that as zeros, not as "")
    assert text["seed"] == str(made.seed)
    again = client.generate(
        text["prompt"], negative_prompt=text.get("negative_prompt"), seed=int(text["seed"]), steps=int(text["steps"]),
        guidance_scale=float(text["guidance_scale"]), height=int(text["height"]), width=int(text["width"]),
        scheduler=text["scheduler"],
    )
    assert_same_image(again.image, made.image, max_diff=0)


def test_long_prompt_is_truncated_and_reported(grpc):
    result = grpc.generate("cat " * 100, steps=2, seed=1)
    assert result.prompt_tokens_dropped == 100 + 2 - 77  # 100 words + start/end tokens


def test_same_seed_same_image_inside_a_concurrent_mixed_batch(server, grpc):
    import tritonclient.grpc as tg

    target = dict(seed=77, steps=STEPS, scheduler="euler_a", guidance_scale=6.0)
    alone = grpc.generate("a dog in the city", **target)
    stats_client = tg.InferenceServerClient(server.grpc_url)
    before = model_counts(stats_client, "unet")
    mixed = [
        ("a dog in the city", target),
        ("a river", dict(seed=1, steps=STEPS, scheduler="euler_a", guidance_scale=3.0)),
        ("a forest", dict(seed=2, steps=STEPS, scheduler="euler_a")),
        ("a mountain", dict(seed=3, steps=8, scheduler="ddim")),
        ("a street", dict(seed=4, steps=STEPS, scheduler="dpmpp_2m", height=72, width=80)),
        ("the moon", dict(seed=5, steps=STEPS, scheduler="euler_a", guidance_scale=1.0)),
        ("a dog in the city", target),
        ("a horse", dict(seed=6, steps=STEPS, scheduler="pndm")),
    ] * 2
    with concurrent.futures.ThreadPoolExecutor(len(mixed)) as pool:
        results = list(pool.map(lambda item: grpc.generate(item[0], **item[1]), mixed))
    after = model_counts(stats_client, "unet")
    stats_client.close()
    for (prompt, params), result in zip(mixed, results):
        assert result.seed == params["seed"]
        expected_shape = (params.get("height", 64), params.get("width", 64), 3)
        assert result.image.shape == expected_shape
    for i in (0, 6, 8, 14):
        assert_same_image(results[i].image, alone.image)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == len(mixed)
    assert executions < inferences, f"no dynamic batching: {executions} executions for {inferences} inferences"


def _bytes_input(module, name, value):
    tensor = module.InferInput(name, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[value]], dtype=object))
    return tensor


def _number_input(module, name, value, dtype):
    array = np.array([[value]], dtype={"INT64": np.int64, "INT32": np.int32, "FP32": np.float32}[dtype])
    tensor = module.InferInput(name, [1, 1], dtype)
    tensor.set_data_from_numpy(array)
    return tensor


# (id, inputs beyond PROMPT as (name, value, dtype), words the error must contain)
BAD_REQUESTS = [
    ("height-not-multiple-of-8", [("HEIGHT", 70, "INT32")], ["HEIGHT", "70", "multiple of 8"]),
    ("height-too-small", [("HEIGHT", 8, "INT32")], ["HEIGHT", "8", "64"]),
    ("width-too-large", [("WIDTH", 4096, "INT32")], ["WIDTH", "4096", "1024"]),
    ("steps-zero", [("STEPS", 0, "INT32")], ["STEPS", "0", "1..150"]),
    ("steps-huge", [("STEPS", 100000, "INT32")], ["STEPS", "100000", "1..150"]),
    ("guidance-nan", [("GUIDANCE_SCALE", float("nan"), "FP32")], ["GUIDANCE_SCALE", "nan", "finite"]),
    ("guidance-inf", [("GUIDANCE_SCALE", float("inf"), "FP32")], ["GUIDANCE_SCALE", "inf", "finite"]),
    ("guidance-negative", [("GUIDANCE_SCALE", -1.0, "FP32")], ["GUIDANCE_SCALE", "-1", "0..50"]),
    ("guidance-huge", [("GUIDANCE_SCALE", 1e6, "FP32")], ["GUIDANCE_SCALE", "1000000", "0..50"]),
    ("unknown-scheduler", [("SCHEDULER", b"lms", "BYTES")], ["SCHEDULER", "lms", "pndm"]),
    ("negative-seed", [("SEED", -5, "INT64")], ["SEED", "-5", "-1 for a random seed"]),
    ("steps-wrong-dtype", [("STEPS", 10.0, "FP32")], ["STEPS", "FP32", "INT32"]),
    ("prompt-not-utf8", [("PROMPT", b"\xff\xfe bad", "BYTES")], ["PROMPT", "UTF-8"]),
    ("negative-prompt-not-utf8", [("NEGATIVE_PROMPT", b"\xc3", "BYTES")], ["NEGATIVE_PROMPT", "UTF-8"]),
    ("prompt-missing", [("PROMPT", None, None), ("SEED", 3, "INT64"), ("STEPS", 4, "INT32")], ["PROMPT", "missing", "required"]),
    ("negative-prompt-only", [("PROMPT", None, None), ("NEGATIVE_PROMPT", b"blurry", "BYTES")], ["PROMPT", "required"]),
    # Triton's own check; 2.51 declares PROMPT optional to the ensemble (model_repository/stable_diffusion)
    ("no-inputs-at-all", [("PROMPT", None, None)], ["0 inputs"]),
    ("prompt-too-long", [("PROMPT", b"x" * 9000, "BYTES")], ["PROMPT", "9000 bytes", "at most 8192", "max_prompt_bytes"]),
    ("negative-prompt-too-long", [("NEGATIVE_PROMPT", "é".encode() * 4097, "BYTES")], ["NEGATIVE_PROMPT", "8194 bytes", "8192"]),
]


def _bad_inputs(module, extra):
    inputs = {"PROMPT": _bytes_input(module, "PROMPT", b"a photo")}
    for name, value, dtype in extra:
        if value is None:
            inputs.pop(name)
        elif dtype == "BYTES":
            inputs[name] = _bytes_input(module, name, value)
        else:
            inputs[name] = _number_input(module, name, value, dtype)
    return list(inputs.values())


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bad_inputs_fail_alone_with_clear_errors(server, grpc, protocol):
    import tritonclient.grpc as tg
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    module = tg if protocol == "grpc" else th
    url = server.grpc_url if protocol == "grpc" else server.http_url

    def send(extra):
        client = module.InferenceServerClient(url)
        try:
            client.infer("stable_diffusion", _bad_inputs(module, extra))
            return None
        except InferenceServerException as err:
            return err
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        good = [pool.submit(grpc.generate, "a good request", seed=i, steps=4) for i in range(3)]
        bad = {case: pool.submit(send, extra) for case, extra, _ in BAD_REQUESTS}
        good_images = [f.result() for f in good]
    for case, extra, words in BAD_REQUESTS:
        err = bad[case].result()
        assert err is not None, f"{case}: accepted"
        status = str(err.status())
        assert "INVALID_ARG" in status or status == "400", f"{case}: status {status}: {err.message()}"
        for word in words:
            assert word in err.message(), f"{case}: {word!r} not in {err.message()!r}"
    assert all(r.image.shape == (64, 64, 3) for r in good_images)
    assert grpc.is_ready()


def test_perf_analyzer_runs_against_the_ensemble(server, tmp_path):
    from sd_client.perf import perf_analyzer

    try:
        binary, env = perf_analyzer()
    except FileNotFoundError as err:
        pytest.fail(str(err))
    data = Path(__file__).resolve().parents[1] / "client" / "perf_input_tiny.json"
    report = tmp_path / "perf.csv"
    proc = subprocess.run(
        [
            str(binary),
            "-m", "stable_diffusion",
            "-u", server.grpc_url,
            "-i", "grpc",
            "--input-data", str(data),
            "--concurrency-range", "1:2",
            "--measurement-mode", "count_windows",
            "--measurement-request-count", "10",
            "--stability-percentage", "100",
            "-f", str(report),
        ],
        capture_output=True, text=True, timeout=600, env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "Concurrency: 1, throughput:" in output and "Concurrency: 2, throughput:" in output, output[-3000:]
    rows = report.read_text().strip().splitlines()
    assert rows[0].startswith("Concurrency,Inferences/Second")
    throughputs = [float(row.split(",")[1]) for row in rows[1:]]
    assert len(throughputs) == 2 and all(t > 0 for t in throughputs), rows


def test_admin_apis_need_the_admin_header(server):
    import urllib.error
    import urllib.request

    from sd_backend.model_control import ADMIN_HEADER

    url = f"http://{server.http_url}/v2/repository/index"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urllib.request.Request(url, data=b"{}", method="POST"), timeout=10)
    assert info.value.code == 403
    request = urllib.request.Request(
        url, data=b"{}", method="POST", headers={ADMIN_HEADER: server.options.admin_key}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        names = {model["name"] for model in json.loads(reply.read())}
    assert {"stable_diffusion", "text_encoder", "unet", "vae"} <= names
    # inference, health, metadata and statistics stay open
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/unet/stats", timeout=10) as reply:
        assert reply.status == 200


def test_admin_apis_over_grpc_need_the_prefixed_header(server):
    """The key the start banner prints, as gRPC metadata: Triton prefixes the header's name."""
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    from sd_backend.model_control import GRPC_ADMIN_HEADER

    client = tg.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        client.get_model_repository_index()
    assert "UNAVAILABLE" in str(info.value.status()) or "PERMISSION" in str(info.value.status()), info.value
    index = client.get_model_repository_index(headers={GRPC_ADMIN_HEADER: server.options.admin_key}, as_json=True)
    assert {"stable_diffusion", "unet"} <= {model["name"] for model in index["models"]}
    client.close()


def test_custom_metrics_are_scraped_next_to_tritons(server, grpc):
    import re
    import urllib.request

    def scrape():
        with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
            return reply.read().decode()

    def value(text, pattern):
        match = re.search(rf"^{pattern} (?P<value>\S+)$", text, re.M)
        return float(match.group("value")) if match else 0.0

    before = scrape()
    grpc.generate("metrics please", seed=1, steps=5)
    grpc.generate("metrics again", seed=2, steps=7)
    after = scrape()
    assert value(after, r"sd_images_generated_total(?:\{\})?") - value(before, r"sd_images_generated_total(?:\{\})?") == 2
    assert value(after, r"sd_denoise_steps_total(?:\{\})?") - value(before, r"sd_denoise_steps_total(?:\{\})?") == 12
    for stage in ("text_encoder", "unet", "vae"):
        assert value(after, rf'sd_stage_seconds_count\{{stage="{stage}"\}}') >= 2
        assert value(after, rf'sd_batch_size_count\{{stage="{stage}"\}}') >= 2
    assert "nv_inference_request_success" in after  # Triton's own metrics on the same port
