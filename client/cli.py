"""`sd-client "a prompt" -o out.png`: generate images through the Triton server.

With -n N, N requests go out concurrently (seeds seed, seed+1, ...) and files are
numbered: out-0.png, out-1.png, ...  `sd-client ui` serves a web page instead (ui.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
import threading
from pathlib import Path

import numpy as np

from .api import SDClient, save_png


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd-client", description=__doc__.split("\n")[0], epilog="sd-client ui serves a web page instead: see sd-client ui --help"
    )
    # a parameter left out takes the deployment's default (model_repository/deployment.toml)
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", default="out.png", help="PNG path, numbered when -n > 1 (default %(default)s)")
    parser.add_argument("-n", "--count", type=int, default=1, help="number of images, sent concurrently (default %(default)s)")
    parser.add_argument("--negative", help='negative prompt (default: none; SD 1.x/2.x read none as "", SDXL as zeros, as diffusers does)')
    parser.add_argument("--seed", type=int, help="seed (default: random; the one used is printed and saved in the PNG)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the server's default_steps, 50 as shipped)")
    parser.add_argument("--guidance", type=float, help="guidance scale; <= 1 turns guidance off (default: the server's, 7.5 as shipped)")
    parser.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's native size, 512 for SD 1.5)")
    parser.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's native size, 512 for SD 1.5)")
    parser.add_argument("--scheduler", help="pndm, ddim, euler, euler_a, dpmpp_2m, lcm (default: the server's, pndm as shipped)")
    parser.add_argument("--guidance-cutoff", type=float, help="stop guidance after this fraction of the steps: faster, not exact (default: the server's, 1 = never, as shipped)")
    parser.add_argument("--cache-interval", type=int, help="DeepCache: run the whole UNet at every N-th step only: faster, not exact (default: the server's, 1 = every step, as shipped)")
    parser.add_argument("--init-image", help="image-to-image: start from this image (its size is the result's; sides multiples of 8)")
    parser.add_argument("--mask", help="inpainting, with --init-image: repaint where this image is white (its size is the image's; read as grayscale)")
    parser.add_argument("--strength", type=float, help="image-to-image: how much of the image is noised away, above 0 up to 1 (default: the server's, 0.8 as shipped)")
    parser.add_argument("--lora", metavar="NAME[:SCALE]", help="one of the server's lora_choices adapters, optionally with its scale (default: none; the scale: the server's for it, 1 unless set)")
    parser.add_argument("--url", help="server address (default 127.0.0.1:8001 for gRPC, :8000 for HTTP)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="(default %(default)s)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request (default %(default)s)")
    parser.add_argument("--progress", action="store_true", help="live progress per denoising step (gRPC streaming); Ctrl-C cancels on the server")
    return parser


def _paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def _read_picture(option: str, path: str, mode: str):
    """The image file at `path` as a uint8 array in PIL `mode` ("RGB", or "L" for a mask); None,
    having said why, when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as picture:
            return np.asarray(picture.convert(mode))
    except OSError as err:
        print(f"sd-client: {option}: cannot read {path}: {err}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ui"]:  # a subcommand beside the prompt form (a prompt "ui": `sd-client -o out.png ui`)
        from .ui import main as ui_main

        return ui_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.count < 1:
        print("sd-client: -n must be at least 1", file=sys.stderr)
        return 2
    client = SDClient(args.url, args.protocol, timeout_s=args.timeout)
    parameters = dict(
        negative_prompt=args.negative,
        steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        scheduler=args.scheduler,
        guidance_cutoff=args.guidance_cutoff,
        cache_interval=args.cache_interval,
    )
    if args.lora:
        name, sep, scale = args.lora.rpartition(":")
        try:
            parameters["lora"], parameters["lora_scale"] = (name, float(scale)) if sep else (args.lora, None)
        except ValueError:
            print(f"sd-client: --lora: {scale!r} after the last ':' is not a scale (NAME or NAME:SCALE)", file=sys.stderr)
            return 2
    if args.init_image:
        pictures = (("init_image", "--init-image", args.init_image, "RGB"), ("mask_image", "--mask", args.mask, "L"))
        for key, option, path, mode in pictures:
            if path:
                parameters[key] = _read_picture(option, path, mode)
                if parameters[key] is None:
                    return 2
        parameters["strength"] = args.strength
    elif args.strength is not None or args.mask:
        print(f"sd-client: {'--strength' if args.strength is not None else '--mask'} needs --init-image", file=sys.stderr)
        return 2
    if args.progress and args.protocol != "grpc":
        print("sd-client: --progress needs --protocol grpc (streaming)", file=sys.stderr)
        return 2
    paths = _paths(args.output, args.count)
    cancel = threading.Event()
    bar = _bar(args.count, args.progress)
    steps_done = [0] * args.count
    lock = threading.Lock()

    def one(i: int):
        seed = None if args.seed is None else args.seed + i
        if not args.progress:
            result = client.generate(args.prompt, seed=seed, **parameters)
            return save_png(result, paths[i]), result

        def advance(p):
            with lock:
                if bar.total != args.count * p.total:
                    bar.total = args.count * p.total
                    bar.refresh()
                bar.update(p.step - steps_done[i])
                steps_done[i] = p.step

        result = client.stream(args.prompt, seed=seed, on_progress=advance, cancel=cancel, **parameters)
        return save_png(result, paths[i]), result

    errors: dict[str, int] = {}  # message -> requests that failed with it
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(args.count, 32))
    futures = [pool.submit(one, i) for i in range(args.count)]
    try:
        for future in concurrent.futures.as_completed(futures):
            try:
                path, result = future.result()
            except Exception as err:  # noqa: BLE001 - report each failed request and go on
                message = err.message() if callable(getattr(err, "message", None)) else str(err)
                if message not in errors:  # once: n requests to a server that is not there fail alike
                    bar.write(f"error: {message}")
                errors[message] = errors.get(message, 0) + 1
                continue
            note = f" ({result.prompt_tokens_dropped} prompt tokens past 77 were dropped)" if result.prompt_tokens_dropped else ""
            bar.write(f"wrote {path}  seed={result.seed}  latency={result.latency_s:.2f}s{note}")
            if not args.progress:
                bar.update(1)  # images done: failures are not
    except KeyboardInterrupt:
        cancel.set()  # streamed requests are cancelled on the server at their next step
        bar.write("cancelled")
        return 130
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        client.close()
    failed = sum(errors.values())
    if failed and args.count > 1:
        print(f"sd-client: {failed} of {args.count} requests failed", file=sys.stderr)
    return 1 if failed else 0


def _bar(count: int, steps: bool):
    """Images done (for -n > 1), or denoising steps done (--progress)."""
    from tqdm import tqdm

    if steps:
        return tqdm(total=None, unit="step", file=sys.stderr)
    return tqdm(total=count, unit="img", disable=count == 1, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
