"""The web page (`sd-client ui`) in a real headless Chromium against a real tritonserver:
progress and previews while an image is made, the gallery with the parameters used,
the server's errors on the page, Cancel stopping the server's work, and an uploaded image
making an image-to-image result.

Needs Debian's `chromium` (`.ci/run` installs it) and the `playwright` package, which
drives it without `playwright install`. Missing in CI, the tests fail; locally they skip.
SD_UI_SCREENSHOT=docs/ui.png saves a screenshot of the page with its gallery."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.utils import assert_same_image

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"]
WAIT_MS = 120_000


def missing(what: str):
    message = f"{what}; .ci/run installs it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def running_ui(server, log_dir):
    """`sd-client ui` in its own process, on a free port, talking to `server` (its gRPC and
    metrics addresses); yields the page's URL."""
    from sd_backend.launcher import free_port

    port = free_port()
    log = log_dir / "ui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sd_client.cli", "ui", "--url", server.grpc_url, "--metrics-url", server.metrics_url, "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"sd-client ui did not serve {url}:\n{log.read_text()}")
            time.sleep(0.2)
    assert f"sd-client ui: {url} " in log.read_text()  # loopback by default
    yield url
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0, log.read_text()


@pytest.fixture(scope="module")
def ui_url(server, tmp_path_factory):
    with running_ui(server, tmp_path_factory.mktemp("ui")) as url:
        yield url


@contextlib.contextmanager
def browser_session():
    """Headless Chromium driven by playwright (missing in CI: the test fails; locally: skips)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        missing("Debian's chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def browser():
    with browser_session() as browser:
        yield browser


@pytest.fixture
def page(browser, ui_url):
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    page.set_default_timeout(WAIT_MS)
    page.goto(ui_url)
    # every text the status line shows, with when, as the page's own events set it
    page.evaluate(
        """() => {
          const status = document.getElementById("status");
          window.statuses = [];
          new MutationObserver(() => statuses.push([performance.now(), status.textContent]))
            .observe(status, {childList: true, characterData: true, subtree: true});
        }"""
    )
    yield page
    page.close()


@pytest.fixture(scope="module")
def client(server):
    from sd_client import SDClient

    client = SDClient(server.grpc_url, "grpc", timeout_s=300)
    yield client
    client.close()


def generate(page, **fields) -> None:
    """Fill the form (blank fields stay blank) and press Generate."""
    for name, value in fields.items():
        selector = f"[name={name}]"
        if name == "scheduler":
            page.select_option(selector, value)
        else:
            page.fill(selector, str(value))
    page.click("#generate")


def wait_until_ready(page) -> None:
    page.wait_for_function("() => !document.getElementById('generate').disabled")


def gallery(page) -> list[dict]:
    """Each gallery card, newest first: its prompt, parameters, seed and image."""
    cards = page.eval_on_selector_all(
        "#gallery figure",
        """cards => cards.map(c => ({
          prompt: c.querySelector('.prompt').textContent,
          params: [...c.querySelectorAll('figcaption span')].map(s => s.textContent),
          seed: c.dataset.seed,
          src: c.querySelector('img').src,
        }))""",
    )
    for card in cards:
        card["image"] = decode_png(card.pop("src"))
    return cards


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def upload(page, name: str, data: bytes, field: str = "init_image") -> None:
    page.set_input_files(f"#{field}", files=[{"name": name, "mimeType": "image/png", "buffer": data}])


def decode_png(data_url: str) -> np.ndarray:
    from PIL import Image

    assert data_url.startswith("data:image/png;base64,"), data_url[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


def test_generate_shows_every_step_then_the_image_with_its_parameters(page, client):
    generate(page, prompt="a lighthouse at dusk", steps=4, width=64, height=64, scheduler="euler")
    page.wait_for_selector("#gallery figure")
    wait_until_ready(page)
    statuses = [text for _, text in page.evaluate("statuses")]
    assert [s for s in statuses if s.startswith("Step")] == [f"Step {i} of 4" for i in range(1, 5)]
    assert page.eval_on_selector("#bar", "bar => [bar.value, bar.max]") == [4, 4]

    (card,) = gallery(page)
    seed = int(card["seed"])  # the form's seed was blank: the server picked one
    assert statuses[-1].startswith(f"Done: seed {seed}, ")
    assert card["prompt"] == "a lighthouse at dusk"
    assert card["params"][:5] == [f"seed {seed}", "4 steps", "guidance 7.5", "64\u00d764", "euler"]
    assert card["params"][5].endswith(" s")  # the latency
    # the image on the page is the one the seed shown makes
    expected = client.generate("a lighthouse at dusk", seed=seed, steps=4, guidance_scale=7.5, height=64, width=64, scheduler="euler")
    assert_same_image(card["image"], expected.image, max_diff=0)

    # a second image goes first in the gallery, with the seed and negative prompt asked for
    generate(page, prompt="a red fox in snow", negative_prompt="blurry", seed=7, steps=6, width=128, height=96, scheduler="dpmpp_2m")
    page.wait_for_selector("#gallery figure:nth-child(2)")
    newest, oldest = gallery(page)
    assert newest["prompt"] == "a red fox in snow"
    assert newest["params"][:6] == ["negative: blurry", "seed 7", "6 steps", "guidance 7.5", "128\u00d796", "dpmpp_2m"]
    assert newest["image"].shape == (96, 128, 3) and oldest["seed"] == str(seed)
    assert page.eval_on_selector("#preview", "img => [img.naturalWidth, img.naturalHeight]") == [128, 96]
    if os.environ.get("SD_UI_SCREENSHOT"):
        page.screenshot(path=os.environ["SD_UI_SCREENSHOT"], full_page=True)


def test_a_server_error_shows_on_the_page_and_the_page_goes_on(page):
    generate(page, prompt="a bad size", steps=2, width=64, height=65)
    page.wait_for_selector("#message.error")
    message = page.inner_text("#message")
    assert "HEIGHT" in message and "65" in message, message
    wait_until_ready(page)
    assert page.query_selector("#gallery figure") is None

    generate(page, height=64)
    page.wait_for_selector("#gallery figure")
    assert page.inner_text("#message") == ""  # the error is gone with the next request
    assert "64\u00d764" in gallery(page)[0]["params"]


def test_the_adapter_fields_reach_the_server(page):
    """LoRA and LoRA scale go to the server as LORA / LORA_SCALE: this deployment preloads no
    adapters, so the server's INVALID_ARG (which lists the known ones) shows on the page
    (tests/test_lora.py serves adapters chosen per request, the streaming model's included)."""
    generate(page, prompt="a fox", steps=2, width=64, height=64, lora="wolf", lora_scale=0.5)
    page.wait_for_selector("#message.error")
    message = page.inner_text("#message")
    assert "LORA: 'wolf' is not one of this deployment's adapters; known: none" in message, message
    wait_until_ready(page)
    assert page.query_selector("#gallery figure") is None


def test_a_deployment_without_adapters_offers_none(page, ui_url):
    """The page's adapter list is the server's (its `sd_lora_choice` metrics): empty here;
    tests/test_lora.py has a deployment that lists two."""
    with urllib.request.urlopen(ui_url + "api/adapters", timeout=10) as reply:
        assert json.loads(reply.read()) == {"adapters": []}
    page.wait_for_function("document.querySelector('input[name=lora]').placeholder === 'none'")
    assert page.evaluate("document.querySelectorAll('#adapters option').length") == 0


def test_unreadable_metrics_leave_the_adapter_field_free_text():
    from sd_backend.launcher import free_port
    from sd_client import SDClient
    from sd_client.ui import App, default_metrics_url

    assert default_metrics_url("gpu-node:8001") == "http://gpu-node:8002/metrics"
    assert default_metrics_url("10.0.0.7") == "http://10.0.0.7:8002/metrics"

    url = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens there
    reply = App(SDClient("127.0.0.1:1"), url).adapters()
    assert reply["adapters"] == [] and reply["error"].startswith(f"cannot read {url}: ")


def test_cancel_stops_the_servers_work_and_the_next_request_runs(page):
    generate(page, prompt="a slow one", steps=150, width=256, height=256, scheduler="euler")
    page.wait_for_function("() => /^Step ([5-9]|\\d\\d+) of 150$/.test(document.getElementById('status').textContent)")
    # the latent preview, at 1/8 of the image's size, updates while the image is made
    assert page.eval_on_selector("#preview", "img => [img.naturalWidth, img.naturalHeight]") == [32, 32]
    page.click("#cancel")
    wait_until_ready(page)
    assert page.inner_text("#message").startswith("Cancelled"), page.inner_text("#message")
    steps = [(t, int(text.split()[1])) for t, text in page.evaluate("statuses") if text.startswith("Step")]
    (t0, first), (t1, last) = steps[0], steps[-1]
    per_step = (t1 - t0) / 1000 / (last - first)
    assert last < 150 and page.query_selector("#gallery figure") is None

    began = time.perf_counter()
    generate(page, prompt="the next one", steps=2, width=64, height=64)
    page.wait_for_selector("#gallery figure")
    # had the server gone on with the cancelled request, this one would wait for its remaining steps
    assert time.perf_counter() - began < 40 * per_step, (time.perf_counter() - began, per_step, last)


def test_an_uploaded_image_is_image_to_image_and_clear_image_goes_back(page, client):
    from tests.test_img2img import init_image

    start = init_image(64, 64, seed=4)
    # a file that is not an image: the page says so, naming the field, and goes on
    upload(page, "notes.png", b"not a picture")
    assert page.is_enabled("#strength") and page.is_disabled("[name=width]")  # the size is the image's
    generate(page, prompt="a paper boat", seed=11, steps=5, scheduler="euler", strength=0.6)
    page.wait_for_selector("#message.error")
    assert page.inner_text("#message").startswith("init_image: not an image file"), page.inner_text("#message")
    wait_until_ready(page)

    upload(page, "start.png", png_bytes(start))
    page.click("#generate")
    page.wait_for_selector("#gallery figure")
    wait_until_ready(page)
    (made,) = gallery(page)
    assert made["params"][:6] == ["seed 11", "5 steps", "guidance 7.5", "64\u00d764", "euler", "strength 0.6"]
    # the streamed image-to-image result is the ensemble's (stable_diffusion_img2img) to the bit
    expected = client.generate("a paper boat", init_image=start, strength=0.6, seed=11, steps=5, guidance_scale=7.5, scheduler="euler")
    assert_same_image(made["image"], expected.image, max_diff=0)

    # Clear image: text-to-image again, strength off and the size fields back
    page.click("#clear_image")
    assert page.is_disabled("#strength") and page.is_disabled("#clear_image") and page.is_enabled("[name=width]")
    generate(page, width=64, height=64)
    page.wait_for_selector("#gallery figure:nth-child(2)")
    plain = gallery(page)[0]
    assert plain["params"][:5] == ["seed 11", "5 steps", "guidance 7.5", "64\u00d764", "euler"] and plain["params"][5].endswith(" s")
    expected = client.generate("a paper boat", seed=11, steps=5, guidance_scale=7.5, height=64, width=64, scheduler="euler")
    assert_same_image(plain["image"], expected.image, max_diff=0)
    assert np.abs(made["image"].astype(np.int16) - plain["image"]).max() > 16  # the start image made the difference


def test_parse_form_decodes_an_uploaded_image():
    from PIL import Image

    from sd_client.ui import parse_form

    def data_url(data: bytes, mime="image/png") -> str:
        return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")

    image = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    prompt, parameters = parse_form({"prompt": "p", "init_image": data_url(png_bytes(image)), "strength": "0.6"})
    assert parameters["strength"] == 0.6 and parameters["init_image"].dtype == np.uint8
    assert_same_image(parameters["init_image"], image, max_diff=0)
    rgba = io.BytesIO()
    Image.new("RGBA", (8, 16), (10, 20, 30, 0)).save(rgba, "PNG")
    assert parse_form({"init_image": data_url(rgba.getvalue())})[1]["init_image"].shape == (16, 8, 3)  # alpha dropped
    assert "init_image" not in parse_form({"init_image": ""})[1]  # no image: text-to-image

    def error(form) -> str:
        with pytest.raises(ValueError) as err:
            parse_form(form)
        return str(err.value)

    assert error({"init_image": data_url(b"not a picture", "text/plain")}) == "init_image: not an image file (13 bytes); send a PNG, JPEG or WebP image"
    assert error({"init_image": "data:"}).startswith("init_image: not an image file (0 bytes)")  # an empty file
    assert error({"init_image": "start.png"}).startswith("init_image: expected an image file as a base64 data: URL")
    assert error({"init_image": "data:image/png;base64,#"}).startswith("init_image: the data: URL is not valid base64")
    assert error({"init_image": data_url(png_bytes(image)[:60])}).startswith("init_image: cannot decode this PNG file")
    huge = io.BytesIO()
    Image.new("L", (5000, 8)).save(huge, "PNG")  # small as a file, refused before decoding
    assert error({"init_image": data_url(huge.getvalue())}) == "init_image: 5000x8 pixels is too large; this page takes at most 4096 a side"
    assert error({"strength": "0.6"}).startswith("strength: needs an image (init_image)")
    mask = np.zeros((16, 24), np.uint8)
    mask[4:12, 6:18] = 255
    decoded = parse_form({"init_image": data_url(png_bytes(image)), "mask_image": data_url(png_bytes(mask))})[1]["mask_image"]
    assert decoded.shape == (16, 24) and decoded.dtype == np.uint8 and np.array_equal(decoded, mask)  # grayscale
    assert error({"init_image": data_url(png_bytes(image)), "mask_image": "data:"}).startswith("mask_image: not an image file")
    assert error({"mask_image": data_url(png_bytes(mask))}).startswith("mask_image: needs an image (init_image)")


def test_an_uploaded_mask_inpaints_as_the_ensemble(page, client):
    from tests.test_img2img import init_image
    from tests.test_inpaint import a_mask

    if page.is_enabled("#clear_image"):  # a start image left by another test
        page.click("#clear_image")
    assert page.is_disabled("#mask_image")  # a mask needs its image
    start, mask = init_image(64, 64, seed=5), a_mask()
    upload(page, "start.png", png_bytes(start))
    upload(page, "mask.png", png_bytes(mask), "mask_image")
    generate(page, prompt="a paper boat", seed=12, steps=4, scheduler="ddim", strength=0.9)
    page.wait_for_selector("#gallery figure")
    wait_until_ready(page)
    made = gallery(page)[0]
    expected = client.generate("a paper boat", init_image=start, mask_image=mask, strength=0.9, seed=12, steps=4, guidance_scale=7.5, scheduler="ddim")
    assert_same_image(made["image"], expected.image, max_diff=0)  # the streamed inpainting is stable_diffusion_inpaint's
    page.click("#clear_image")


def test_a_painted_mask_inpaints_as_the_ensemble(page, client):
    """Strokes painted over the start image are the mask: the page sends them as a
    black-and-white PNG of the image's size, and the result is stable_diffusion_inpaint's."""
    from sd_client.ui import decode_image
    from tests.test_img2img import init_image

    if page.is_enabled("#clear_image"):
        page.click("#clear_image")
    assert page.is_hidden("#paint")
    start = init_image(64, 64, seed=6)
    upload(page, "start.png", png_bytes(start))
    page.wait_for_function("() => document.getElementById('mask_canvas').width === 64")
    box = page.locator("#mask_canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6, steps=8)
    page.mouse.up()
    mask = decode_image(page.evaluate("paintedMask()"), "mask_image", "L")
    assert mask.shape == (64, 64) and 200 < (mask >= 128).sum() < 64 * 64 - 200  # a stroke, not all or nothing
    generate(page, prompt="a paper boat", seed=13, steps=4, scheduler="ddim", strength=0.9)
    page.wait_for_selector("#gallery figure")
    wait_until_ready(page)
    made = gallery(page)[0]
    expected = client.generate("a paper boat", init_image=start, mask_image=mask, strength=0.9, seed=13, steps=4, guidance_scale=7.5, scheduler="ddim")
    assert_same_image(made["image"], expected.image, max_diff=0)
    page.click("#clear_mask")
    assert page.evaluate("painted") is False
    page.click("#clear_image")
    assert page.is_hidden("#paint")


def test_bad_form_values_get_a_clear_error(ui_url):
    def post(body: bytes, content_type="application/json"):
        request = urllib.request.Request(ui_url + "api/generate", body, {"Content-Type": content_type})
        try:
            urllib.request.urlopen(request, timeout=10)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())["error"]
        pytest.fail("the request was accepted")

    assert post(b'{"steps": "four"}') == (400, "steps: 'four' is not a whole number")
    assert post(b'{"guidance_scale": "nan"}') == (400, "guidance_scale: 'nan' is not a number")
    assert post(b'{"lora": "fox", "lora_scale": "half"}') == (400, "lora_scale: 'half' is not a number")
    assert post(b'{"seed": "%d"}' % 2**64) == (400, f"seed: {2**64} does not fit the server's 64-bit integer")
    code, error = post(b'{"size": 64}')
    assert code == 400 and "size" in error
    code, error = post(b"steps=4", "application/x-www-form-urlencoded")  # another site's plain form
    assert code == 415
    code, error = post(b'{"init_image": "data:text/plain;base64,aGk="}')
    assert code == 400 and error.startswith("init_image: not an image file"), error
    from sd_client.ui import MAX_BODY

    code, error = post(b'{"init_image": "' + b"A" * MAX_BODY + b'"}')
    assert code == 413 and error.startswith("init_image: the request is 8.0 MB, over the 8 MB"), error
