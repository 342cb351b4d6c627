"""`sd-client "a prompt" -o out.png`: generate images through the Triton server.

With -n N, N requests go out concurrently (seeds seed, seed+1, ...) and files are
numbered: out-0.png, out-1.png, ...
"""

from __future__ import annotations

import argparse
import concurrent.futures
import sys
from pathlib import Path

from .api import SDClient, save_png


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-client", description=__doc__.split("\n")[0])
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", default="out.png", help="PNG path (numbered when -n > 1)")
    parser.add_argument("-n", "--count", type=int, default=1, help="number of images, sent concurrently")
    parser.add_argument("--negative", help="negative prompt")
    parser.add_argument("--seed", type=int, help="seed (default: random; the one used is printed)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--scheduler", help="pndm, ddim, euler, euler_a, dpmpp_2m")
    parser.add_argument("--url", help="server address (default 127.0.0.1:8001 for gRPC, :8000 for HTTP)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    return parser


def _paths(output: str, count: int) -> list[Path]:
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def main(argv: list[str] | None = None) -> int:
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
    )
    paths = _paths(args.output, args.count)

    def one(i: int):
        seed = None if args.seed is None else args.seed + i
        result = client.generate(args.prompt, seed=seed, **parameters)
        return save_png(result, paths[i]), result

    failures = 0
    progress = _progress(args.count)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(args.count, 32)) as pool:
        futures = [pool.submit(one, i) for i in range(args.count)]
        for future in concurrent.futures.as_completed(futures):
            try:
                path, result = future.result()
            except Exception as err:  # noqa: BLE001 - report each failed request and go on
                failures += 1
                message = err.message() if callable(getattr(err, "message", None)) else str(err)
                progress.write(f"error: {message}")
            else:
                note = f" ({result.prompt_tokens_dropped} prompt tokens past 77 were dropped)" if result.prompt_tokens_dropped else ""
                progress.write(f"wrote {path}  seed={result.seed}  latency={result.latency_s:.2f}s{note}")
            progress.update(1)
    progress.close()
    client.close()
    return 1 if failures else 0


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", disable=total == 1, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
