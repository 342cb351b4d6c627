"""`sd-triton`: serve the model repository, fetch its model, or write an offline model.

    sd-triton serve [--model tiny] [--host 127.0.0.1] [--grpc-port 8001] ...
    sd-triton fetch --model stable-diffusion-v1-5/stable-diffusion-v1-5
    sd-triton write-model tiny ./models/tiny          (or tiny.safetensors: one checkpoint file)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from . import health
from .config import OPT_LEVELS
from .launcher import DEFAULT_MODEL_REPOSITORY, ServerOptions, TritonServer
from .model_control import ADMIN_HEADER, GRPC_ADMIN_HEADER
from .offline import OFFLINE_MODELS, write_offline_model


def _serve(args: argparse.Namespace) -> int:
    env = _overrides(args)
    options = ServerOptions(
        model_repository=Path(args.model_repository).resolve(),
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        health_port=args.health_port or None,
        env=env,
        log_verbose=args.log_verbose,
        exit_timeout_s=args.exit_timeout,
        extra_args=args.tritonserver_args,
    )
    if args.open_admin_api:
        options.admin_key = None
    server = TritonServer(options)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        server.start()
    except (ValueError, FileNotFoundError) as err:
        server.stop()
        print(f"sd-triton: {err}", file=sys.stderr)
        return 2
    print(f"sd-triton: starting tritonserver on {options.model_repository}", flush=True)
    try:
        while not server.is_ready():
            if stop.wait(0.5):
                return _shutdown(server)
            if server.process.poll() is not None:
                print(f"sd-triton: tritonserver exited with code {server.process.returncode}", file=sys.stderr)
                return 1
        print(
            f"sd-triton: ready\n  gRPC     {server.grpc_url}\n  HTTP     http://{server.http_url}\n"
            f"  metrics  {server.metrics_url}\n"
            f"  model    {server.deployment().model} ({server.model_dir})\n"
            + (f"  probes   {server.health_url}/ready, {server.health_url}/live\n" if server.health_url else "")
            + (
                f"  model-control/shared-memory/trace/logging APIs need the header "
                f"'{ADMIN_HEADER}: {options.admin_key}' over HTTP, "
                f"'{GRPC_ADMIN_HEADER}: {options.admin_key}' over gRPC (--open-admin-api opens them)\n"
                if options.admin_key
                else "  model-control/shared-memory/trace/logging APIs are open\n"
            )
            + f"  try: sd-client \"a photo of a cat\" -o cat.png --url {server.grpc_url}",
            flush=True,
        )
        while not stop.wait(0.5):
            if server.process.poll() is not None:
                print(f"sd-triton: tritonserver exited with code {server.process.returncode}", file=sys.stderr)
                return 1
        return _shutdown(server)
    finally:
        server.stop()


def _shutdown(server: TritonServer) -> int:
    print("sd-triton: shutting down (in-flight requests finish first)", flush=True)
    code = server.stop()
    return 0 if code in (0, None, -signal.SIGINT) else code


def _write_model(args: argparse.Namespace) -> int:
    if Path(args.directory).suffix == ".safetensors":  # one file in the LDM layout, as checkpoints come
        from .checkpoints import write_checkpoint
        from .config import default_cache_dir

        path = write_checkpoint(args.name, args.directory, Path(args.cache_dir or default_cache_dir()))
    else:
        path = write_offline_model(args.name, args.directory)
    print(f"sd-triton: wrote {args.name} to {path}")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    """The deployment's model into its cache now (an init container, a pre-built image)."""
    from .config import DeploymentConfig
    from .fetch import local_model

    environ = dict(os.environ, **_overrides(args))
    try:
        path = local_model(DeploymentConfig.load(Path(args.model_repository), environ=environ), progress=True)
    except ValueError as err:
        print(f"sd-triton: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    """SD_* variables for the deployment settings given on the command line."""
    names = ("model", "device", "dtype", "opt_level", "cache_dir")
    return {f"SD_{name.upper()}": str(getattr(args, name)) for name in names if getattr(args, name, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd-triton", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start tritonserver on the model repository")
    serve.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY))
    serve.add_argument("--model", help="tiny, sd15-random, a diffusers directory or a hub id (default: config.pbtxt)")
    serve.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    serve.add_argument("--dtype", help="auto, float32, float16, bfloat16")
    serve.add_argument("--opt-level", choices=OPT_LEVELS)
    serve.add_argument("--cache-dir", help="where offline models are written")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument(
        "--health-port", type=int, default=health.DEFAULT_PORT,
        help="the launcher's /ready and /live for probes (0: none; default %(default)s)",
    )
    serve.add_argument("--log-verbose", type=int, default=0)
    serve.add_argument(
        "--exit-timeout",
        type=int,
        default=ServerOptions.exit_timeout_s,
        help="seconds requests in flight get to finish on SIGTERM/Ctrl-C (default %(default)s)",
    )
    serve.add_argument(
        "--open-admin-api",
        action="store_true",
        help="leave model control, shared memory, trace and logging open (default: they need the admin header)",
    )
    serve.add_argument("tritonserver_args", nargs="*", help="after --: passed to tritonserver as they are")
    serve.set_defaults(func=_serve)

    write = sub.add_parser("write-model", help="write an offline model in diffusers layout, or as a single-file checkpoint")
    write.add_argument("name", choices=OFFLINE_MODELS)
    write.add_argument("directory", help="a directory, or a .safetensors file for one checkpoint in the LDM layout")
    write.add_argument("--cache-dir", help="where the offline model is written first (for a .safetensors file)")
    write.set_defaults(func=_write_model)

    fetch = sub.add_parser("fetch", help="get the deployment's model into its cache now and print where it is")
    fetch.add_argument("--model-repository", default=str(DEFAULT_MODEL_REPOSITORY))
    fetch.add_argument("--model", help="tiny, sd15-random, a directory, a .safetensors checkpoint or a hub id")
    fetch.add_argument("--cache-dir", help="the deployment's cache (default: its cache_dir)")
    fetch.set_defaults(func=_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
