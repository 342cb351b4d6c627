"""Start a server, generate one image from a prompt, stop the server: `./demo.sh "a prompt"`."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .launcher import ServerOptions, TritonServer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo.sh", description=__doc__)
    parser.add_argument("prompt")
    parser.add_argument("-o", "--output", help="PNG path (default out/<prompt>.png)")
    parser.add_argument("--model", default="tiny", help="tiny (default), sd15-random, a directory or a hub id")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    args = parser.parse_args(argv)

    from sd_client import SDClient, save_png

    slug = re.sub(r"[^a-z0-9]+", "-", args.prompt.lower()).strip("-")[:60] or "image"
    output = Path(args.output or f"out/{slug}.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    log = output.parent / "tritonserver.log"
    options = ServerOptions.on_free_ports(env={"SD_MODEL": args.model})
    print(f"demo: starting tritonserver with the {args.model!r} model (log: {log})", flush=True)
    with TritonServer(options, log_path=log) as server:
        client = SDClient(server.grpc_url)
        result = client.generate(args.prompt, seed=args.seed, steps=args.steps)
        client.close()
    path = save_png(result, output)
    print(f"demo: seed {result.seed}, {result.latency_s:.2f} s through gRPC")
    print(f"wrote {path.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
