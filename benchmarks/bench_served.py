"""The served path on a GPU: `tritonserver` with the ensemble, measured as a client sees it.

    python benchmarks/bench_served.py [--levels triton,deepspeed] [--concurrency 1,2,4,8,16]
        [--extra-perf-input skipping=client/perf_input_skipping.json]
    # SDXL at 1024², 30 Euler steps, guidance 5 (issue 14's served run):
    python benchmarks/bench_served.py --model sdxl-random --steps 30 --env SD_DEFAULT_GUIDANCE=5 \
        --env SD_DEFAULT_SCHEDULER=euler --perf-input client/perf_input_sdxl.json --concurrency 1,2,4 --skip stream,mixed
    # the unet as two instances (two stub processes) per GPU, an A/B of the served bubbles:
    python benchmarks/bench_served.py --unet-instances 2 --concurrency 1,4,8,16 --skip stream,mixed --tag unet2

For each optimization level, in one process on one host:
- start to ready (from the server's start, once the model's files are on this machine, to
  ready: imports, load, CUDA-graph capture of every batch bucket), then again after a
  restart (warm caches of compiled kernels); GPU memory in use (nvidia-smi: per GPU and
  per process) once ready and after the last measurement on that server;
- seconds per image at batch 1 through gRPC (median and min of --repeats), against the
  same engine in this process (`sd_backend.engine.Engine`, same config) after the server stops;
- a `perf_analyzer` concurrency sweep on the ensemble with a string prompt
  (client/perf_input.json): throughput and p50/p95/p99 latency; then, on the same server,
  each `--extra-perf-input NAME=PATH` at `--extra-concurrency`, its rows tagged NAME;
- the streaming model (`stable_diffusion_stream`, `SDClient.stream`; served_stream.py) beside the ensemble
  (`SDClient.generate`), same prompt, seeds, --steps, --size, guidance 7.5, default
  scheduler: batch-1 latency, time to the first progress message, progress messages and
  previews, the two images' largest pixel difference; images/s with --stream-concurrency
  clients; after a cancel, how soon the next request starts;
- mixed traffic: requests with different steps, sizes and schedulers at once: all
  must succeed; throughput reported.
Writes benchmarks/results/<gpu>-<date>-served.json and .md after every measurement, so a
run cut short keeps what it measured. `--deadline-s` skips what would not finish in time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sd_backend  # noqa: E402,F401  (maps sd_client to the checkout's client/ where it is not installed)
from record import result_path  # noqa: E402  (benchmarks/, the script's own folder)
from sd_backend.launcher import ServerOptions, TritonServer  # noqa: E402
from served_stream import PROMPT, STREAM_RUN_S, stream_markdown, stream_section  # noqa: E402  (benchmarks/)

MIXED = [  # (steps, height, width, scheduler)
    (50, 512, 512, "pndm"),
    (30, 512, 512, "euler_a"),
    (20, 448, 512, "ddim"),
    (50, 512, 512, "dpmpp_2m"),
]
# seconds the sweeps leave for what follows: the stream section, each extra perf_analyzer run, the rest
STREAM_RESERVE_S, EXTRA_RESERVE_S, REST_RESERVE_S = 180, 90, {"mixed": 60, "inprocess": 60, "restart": 60}


class Recorder:
    def __init__(self, out: Path, tag: str):
        import torch

        gpu = torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else "cpu"
        name = f"served{('-' + tag) if tag else ''}"
        self.json_path, self.md_path = (result_path(out, gpu, name, suffix) for suffix in (".json", ".md"))
        self.data = {"device": gpu, "gpus": torch.cuda.device_count(), "command": " ".join(sys.argv), "levels": {}}

    def put(self, level: str, key: str, value) -> None:
        self.data["levels"].setdefault(level, {})[key] = value
        self.json_path.write_text(json.dumps(self.data, indent=1))
        self.md_path.write_text(self.markdown())
        print(f"[{level}] {key}: {json.dumps(value)}", flush=True)

    def markdown(self) -> str:
        d = self.data
        lines = [f"# Served benchmark on {d['device']} x{d['gpus']}", "", f"`{d['command']}`", ""]
        lines += [
            "| level | cold start to ready s | warm restart s | gRPC b1 s (median/min) | in-process b1 s (median/min) | in-process img/s b4 / b8 | mixed img/s |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for level, r in d["levels"].items():
            b1, local, mixed = r.get("grpc_b1", {}), r.get("inprocess_b1", {}), r.get("mixed", {})
            lines.append(
                f"| {level} | {r.get('ready_s', '')} | {r.get('restart_ready_s', '')} | {b1.get('median', '')} / {b1.get('min', '')} | "
                f"{local.get('median', '')} / {local.get('min', '')} | {local.get('b4_images_per_s', '')} / {local.get('b8_images_per_s', '')} | "
                f"{mixed.get('images_per_s', '')} |"
            )
        files = [f"{level}'s files took {r['model_files_s']} s before it" for level, r in d["levels"].items() if "model_files_s" in r]
        if files:
            lines += ["", "Cold start to ready counts from the server's start, once the model's files are on this machine: " + "; ".join(files)]
        lines += ["", "| level | input | concurrency | images/s | p50 s | p95 s | p99 s | unet batches (size x runs); mean queue per request |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for level, r in d["levels"].items():
            for row in r.get("sweep", []) + r.get("sweep_extra", []):
                tag = row.get("input", "main")
                if "error" in row:
                    lines.append(f"| {level} | {tag} | {row['concurrency']} | error: {row['error'][-80:]!r} | | | | |")
                    continue
                lines.append(
                    f"| {level} | {tag} | {row['concurrency']} | {row['images_per_s']} | {row['p50_s']} | {row['p95_s']} | {row['p99_s']} | {_stages_cell(row)} |"
                )
        for level, r in d["levels"].items():
            lines += stream_markdown(level, r) + _memory_markdown(level, r)
        return "\n".join(lines) + "\n"



def _memory_markdown(level: str, r: dict) -> list[str]:
    lines = []
    for when, m in (("once ready", r.get("gpu_memory_ready", {})), ("at the end", r.get("gpu_memory_end", {}))):
        if m is None:
            lines.append(f"- {level}, GPU memory {when}: no nvidia-smi")
        elif m:
            apps = ", ".join(f"{p['name']} {p['used_mib']}" for p in m["processes"] or []) or "none listed"
            lines.append(f"- {level}, GPU memory {when}: {m['total_used_mib']} MiB (per GPU {m['used_mib']}); per process MiB: {apps}")
    return [""] + lines if lines else []


def deployment_env(args, level: str) -> dict[str, str]:
    """The SD_* settings a level's server runs with (the in-process engine reads the same)."""
    env = {
        "SD_MODEL": args.model,
        "SD_OPT_LEVEL": level,
        "SD_CACHE_DIR": args.cache_dir,
        "SD_DEFAULT_STEPS": str(args.steps),
    }
    if args.buckets:
        env["SD_BATCH_BUCKETS"] = args.buckets
    if args.stub_path:  # a folder the backend stubs put first on sys.path (numpy 1.26 on the GPU host)
        env["SD_STUB_EXTRA_PATH"] = args.stub_path
    return env | dict(setting.partition("=")[::2] for setting in args.env)


def repository_with_unet_instances(repository: Path, count: int) -> Path:
    """A copy of `repository` (in a temporary folder) whose unet has `count` instances on
    each GPU (its config.pbtxt's instance_group): two loops of one GPU's unet run at once."""
    import re
    import tempfile

    copy = Path(tempfile.mkdtemp(prefix="sd-repo-")) / repository.name
    shutil.copytree(repository, copy)
    config = copy / "unet" / "config.pbtxt"
    text, found = re.subn(r"(instance_group \[ \{ count: )\d+", rf"\g<1>{count}", config.read_text())
    if found != 1:
        raise SystemExit(f"--unet-instances: no single 'instance_group [ {{ count: N' line in {config}")
    config.write_text(text)
    return copy


def server_options(args, level: str) -> ServerOptions:
    return ServerOptions.on_free_ports(env=deployment_env(args, level), python_shm_mb=64, model_repository=Path(args.model_repository))


def start(options: ServerOptions, log: Path) -> tuple[TritonServer, float, float]:
    """A ready server, the seconds from its start to ready, and the seconds the model's files
    took to get onto this machine before it (an offline model written, a hub model fetched;
    none on a restart): a deployment has its weights on disk or in its cache before a pod
    starts, so the time to ready leaves them out, as bench_e2e's start to first image does."""
    began = time.perf_counter()
    server = TritonServer(options, log_path=log).start_ready(900)
    files_s = server.model_files_s
    return server, round(time.perf_counter() - began - files_s, 1), round(files_s, 1)


# the stages' own start-up lines in the server's log (sd_backend.triton_io and the stages)
STARTUP_LINES = ("stub process up", "imported in", "weights loaded", "captured", "kernel dispatch", "loaded in")


def startup_log(log: Path) -> list[str]:
    """What each stage logged about its start-up (imports, weights, captures, dispatch timing)."""
    if not log.exists():
        return []
    return [line.strip() for line in log.read_text(errors="replace").splitlines() if "sd_backend" in line and any(s in line for s in STARTUP_LINES)]


def client_b1(url: str, repeats: int) -> dict:
    from sd_client import SDClient

    client = SDClient(url)
    client.generate(PROMPT, seed=0)  # warm-up
    times = [client.generate(PROMPT, seed=i).latency_s for i in range(repeats)]
    client.close()
    return {"median": round(statistics.median(times), 4), "min": round(min(times), 4), "all": [round(t, 4) for t in times]}


def sweep(url: str, levels: list[int], out: Path, tag: str, deadline: float, perf_input: str) -> list[dict]:
    from sd_client.perf import perf_analyzer

    binary, env = perf_analyzer()
    rows = []
    for c in levels:
        if time.monotonic() > deadline:
            print(f"skipping concurrency {c}: deadline", flush=True)
            break
        before = stage_stats(url)
        report = out / f"perf_{tag}_c{c}.csv"
        command = [
            binary, "-m", "stable_diffusion", "-i", "grpc", "-u", url,
            "--input-data", perf_input,
            "--concurrency-range", f"{c}:{c}", "--measurement-mode", "count_windows",
            "--measurement-request-count", str(max(12, 3 * c)), "--max-trials", "5",
            "--stability-percentage", "25", "-f", str(report), "--percentile", "99",
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=max(60, deadline - time.monotonic()))
        (out / f"perf_{tag}_c{c}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0 or not report.exists():
            print(done.stdout[-2000:], done.stderr[-2000:], flush=True)
            rows.append({"concurrency": c, "error": (done.stderr or done.stdout)[-300:]})
            continue
        with open(report) as f:
            row = next(csv.DictReader(f))
        us = lambda key: round(float(row[key]) / 1e6, 3)  # noqa: E731
        rows.append({
            "concurrency": c,
            "images_per_s": round(float(row["Inferences/Second"]), 3),
            "p50_s": us("p50 latency"), "p95_s": us("p95 latency"), "p99_s": us("p99 latency"),
            "server_queue_s": us("Server Queue"), "server_compute_s": round((float(row["Server Compute Input"]) + float(row["Server Compute Infer"]) + float(row["Server Compute Output"])) / 1e6, 3),
            "stages": stats_delta(before, stage_stats(url)),
        })
    return rows


STAGES = ("text_encoder", "unet", "vae")


def stage_stats(url: str) -> dict:
    """Triton's statistics of each stage: executions per batch size, requests, their queue time."""
    from tritonclient.grpc import InferenceServerClient

    client = InferenceServerClient(url)
    try:
        out = {}
        for model in STAGES:
            stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
            queue = stats.get("inference_stats", {}).get("queue", {})
            batches = {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])}
            out[model] = {"batches": batches, "requests": int(queue.get("count", 0)), "queue_ns": int(queue.get("ns", 0))}
        return out
    finally:
        client.close()


def stats_delta(before: dict, after: dict) -> dict:
    """What ran between two stage_stats: {model: {"batches": {size: executions}, "queue_ms": mean per request}}."""
    rows = {}
    for model, now in after.items():
        then = before[model]
        batches = {size: n - then["batches"].get(size, 0) for size, n in sorted(now["batches"].items())}
        requests = now["requests"] - then["requests"]
        rows[model] = {
            "batches": {size: n for size, n in batches.items() if n},
            "queue_ms": round((now["queue_ns"] - then["queue_ns"]) / max(requests, 1) / 1e6, 2),
        }
    return rows


def _stages_cell(row: dict) -> str:
    """`unet 8x12 4x1; queue ms text_encoder 1.9, unet 30.1, vae 0.4`."""
    stages = row.get("stages")
    if not stages:
        return ""
    unet = " ".join(f"{size}x{n}" for size, n in stages["unet"]["batches"].items())
    queues = ", ".join(f"{model} {s['queue_ms']}" for model, s in stages.items())
    return f"unet {unet}; queue ms {queues}"


def mixed(url: str, per_kind: int, concurrency: int) -> dict:
    from sd_client import SDClient

    client = SDClient(url)
    work = [kind for kind in MIXED for _ in range(per_kind)]
    began = time.perf_counter()

    def one(i: int):
        steps, height, width, scheduler = work[i]
        return client.generate(PROMPT, seed=i, steps=steps, height=height, width=width, scheduler=scheduler)

    failures = []
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        for future in concurrent.futures.as_completed([pool.submit(one, i) for i in range(len(work))]):
            try:
                future.result()
            except Exception as err:  # noqa: BLE001 - count and report every failure
                failures.append(str(err)[:200])
    seconds = time.perf_counter() - began
    client.close()
    return {"requests": len(work), "failed": len(failures), "errors": failures[:3], "seconds": round(seconds, 2),
            "images_per_s": round((len(work) - len(failures)) / seconds, 3), "kinds": MIXED}


def extra_sweeps(url: str, extras: list[str], levels: list[int], out: Path, tag: str, deadline: float) -> list[dict]:
    """perf_analyzer with each extra input file (NAME=PATH) at `levels`, as the main sweep runs
    it; each row tagged with its NAME under "input"."""
    rows = []
    for extra in extras:
        name, _, path = extra.partition("=")
        rows += [{"input": name, **row} for row in sweep(url, levels, out, f"{tag}-{name}", deadline, path)]
    return rows


def _mib(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]" where the driver does not say
        return None


def gpu_memory(server: TritonServer) -> dict | None:
    """GPU memory in use, MiB, as nvidia-smi reports it: per GPU and their total, and per compute
    process (named tritonserver or by the model whose stub it is); None without nvidia-smi."""
    if not shutil.which("nvidia-smi"):
        return None

    def query(what: str) -> list[list[str]] | None:
        try:
            done = subprocess.run(["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=60)
        except subprocess.SubprocessError:  # a hung driver: no figure, the benchmark goes on
            return None
        return [[c.strip() for c in line.split(",")] for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else None

    used = [_mib(row[0]) for row in query("gpu=memory.used") or []]
    apps = query("compute-apps=pid,process_name,used_memory")
    names = {server.process.pid: "tritonserver", **server.stub_processes()}
    processes = None if apps is None else [{"pid": int(pid), "name": names.get(int(pid), name), "used_mib": _mib(m)} for pid, name, m in apps]
    return {"used_mib": used, "total_used_mib": sum(u for u in used if u is not None), "processes": processes}


def in_process(args, level: str) -> dict:
    import torch

    from sd_backend.config import DeploymentConfig
    from sd_backend.engine import Engine

    # the served repository's deployment, as its server ran it
    config = DeploymentConfig.load(Path(args.model_repository), environ=deployment_env(args, level))
    engine = Engine(config)
    engine.generate([PROMPT], seed=0)
    times = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for i in range(args.repeats):
        sync()
        began = time.perf_counter()
        engine.generate([PROMPT], seed=i)
        sync()
        times.append(time.perf_counter() - began)
    rates = {}
    for batch in (4, 8):  # the rates the served concurrency sweep is held against
        engine.generate([PROMPT] * batch, seed=0)
        sync()
        began = time.perf_counter()
        for i in range(3):
            engine.generate([PROMPT] * batch, seed=i)
        sync()
        rates[f"b{batch}_images_per_s"] = round(3 * batch / (time.perf_counter() - began), 3)
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"median": round(statistics.median(times), 4), "min": round(min(times), 4), **rates}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--levels", default="triton")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--buckets", default="", help="batch_buckets (default: the deployment's)")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--perf-input", default=str(ROOT / "client" / "perf_input.json"))
    parser.add_argument("--extra-perf-input", action="append", default=[], metavar="NAME=PATH",
                        help="after the sweep, perf_analyzer with this input file too, rows tagged NAME (repeatable)")
    parser.add_argument("--extra-concurrency", default="8", help="the concurrency levels of the extra inputs")
    parser.add_argument("--size", type=int, default=512, help="height and width of the stream section's requests")
    parser.add_argument("--stream-concurrency", default="4,8")
    parser.add_argument("--stream-requests", type=int, default=0,
                        help=f"requests per client in a concurrent stream/ensemble run; 0: ~{STREAM_RUN_S} s at batch-1 speed")
    parser.add_argument("--mixed-per-kind", type=int, default=4)
    parser.add_argument("--skip", default="", help="comma list of: restart, inprocess, mixed, sweep, stream")
    parser.add_argument("--stub-path", default="", help="folder put first on the backend stubs' sys.path")
    parser.add_argument("--cache-dir", default="/tmp/sd-cache")
    parser.add_argument("--model-repository", default=str(ROOT / "model_repository"), help="the repository served (a variant's copy)")
    parser.add_argument("--unet-instances", type=int, default=0, help="serve a copy of the repository whose unet has this many instances per GPU")
    parser.add_argument("--env", action="append", default=[], metavar="SD_NAME=VALUE",
                        help="a deployment setting for the server and the in-process engine, e.g. SD_FAST_PATH_CUDNN_SEARCH=false")
    parser.add_argument("--tag", default="")
    parser.add_argument("--deadline-s", type=float, default=3600)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    deadline = time.monotonic() + args.deadline_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(","))
    if bad := [e for e in args.extra_perf_input if not all(e.partition("="))]:
        parser.error(f"--extra-perf-input: {bad[0]!r} is not NAME=PATH")
    if bad := [e for e in args.env if not e.startswith("SD_") or not all(e.partition("="))]:
        parser.error(f"--env: {bad[0]!r} is not SD_NAME=VALUE")
    extra_levels = [int(c) for c in args.extra_concurrency.split(",") if c]
    if args.unet_instances:
        args.model_repository = str(repository_with_unet_instances(Path(args.model_repository), args.unet_instances))
    # seconds each step leaves for the steps after it on the same server, and after the server
    rest = sum(seconds for part, seconds in REST_RESERVE_S.items() if part not in skip)
    after_extras = rest + (0 if "stream" in skip else STREAM_RESERVE_S)
    after_sweep = after_extras + EXTRA_RESERVE_S * len(args.extra_perf_input) * len(extra_levels)
    record = Recorder(out, args.tag)
    for level in args.levels.split(","):
        if time.monotonic() > deadline:
            break
        options = server_options(args, level)
        log = out / f"server-{level}{('-' + args.tag) if args.tag else ''}.log"
        server, ready, fetch_s = start(options, log)
        record.put(level, "ready_s", ready)
        record.put(level, "model_files_s", fetch_s)
        record.put(level, "startup_log", startup_log(log))
        try:
            record.put(level, "gpu_memory_ready", gpu_memory(server))
            record.put(level, "grpc_b1", client_b1(server.grpc_url, args.repeats))
            if "sweep" not in skip:
                record.put(level, "sweep", sweep(server.grpc_url, [int(c) for c in args.concurrency.split(",")], out, level, deadline - after_sweep, args.perf_input))
            if args.extra_perf_input:
                record.put(level, "sweep_extra", extra_sweeps(server.grpc_url, args.extra_perf_input, extra_levels, out, level, deadline - after_extras))
            if "stream" not in skip:
                stream_section(record, level, server.grpc_url, args, deadline - rest)
            if "mixed" not in skip and time.monotonic() < deadline - 90:
                record.put(level, "mixed", mixed(server.grpc_url, args.mixed_per_kind, 8))
            record.put(level, "gpu_memory_end", gpu_memory(server))
        finally:
            server.stop()
        if "inprocess" not in skip and time.monotonic() < deadline - 90:
            record.put(level, "inprocess_b1", in_process(args, level))
        if "restart" not in skip and time.monotonic() < deadline - 120:
            log = out / f"server-{level}-restart.log"
            server, ready, _ = start(server_options(args, level), log)
            record.put(level, "restart_ready_s", ready)
            record.put(level, "restart_startup_log", startup_log(log))
            server.stop()
    print(record.md_path.read_text())


if __name__ == "__main__":
    main()
