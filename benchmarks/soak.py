"""Soak: perf_analyzer against the ensemble for a long time, memory sampled throughout.

    python benchmarks/soak.py [--minutes 30] [--concurrency 8] [--model sd15-random] [--opt-level triton]

Runs perf_analyzer at a fixed concurrency in three measurement windows of minutes/3 each
(so its stability check cannot end the run early; perf_analyzer stretches each window to
1.2x the interval it is given, which the interval allows for) and samples, every --every-s seconds,
the GPU memory in use (nvidia-smi, when there is one) and the resident memory of
tritonserver and its backend stubs. Each sample also reads the
server's own request counters (Triton's metrics endpoint), and the samples so far are
rewritten to soak-progress.json every time, so a run cut short still leaves its record.
Passes when perf_analyzer saw no failed request, the server counted no failed request,
and memory at the end is within --slack-mib of memory after the first window (warm-up).
Writes benchmarks/results/<device>-<date>-soak.json and .md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from record import result_path  # noqa: E402  (benchmarks/, the script's own folder)
from sd_backend.launcher import ServerOptions, TritonServer  # noqa: E402


def gpu_used_mib() -> list[float]:
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True)
    return [float(x) for x in out.stdout.split()] if out.returncode == 0 else []


def request_counts(metrics_url: str, model: str) -> dict[str, int]:
    """The server's success and failure counters for one model (Prometheus text format)."""
    counts = {"success": 0, "failure": 0}
    try:
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    except OSError:
        return counts
    for line in text.splitlines():
        for kind in counts:
            if line.startswith(f"nv_inference_request_{kind}{{") and f'model="{model}"' in line:
                counts[kind] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", default="sd15-random")
    parser.add_argument("--opt-level", default="triton")
    parser.add_argument("--perf-input", default=str(ROOT / "client" / "perf_input.json"))
    parser.add_argument("--every-s", type=float, default=30)
    parser.add_argument("--slack-mib", type=float, default=256)
    parser.add_argument("--stub-path", default="", help="folder put first on the backend stubs' sys.path")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--from-progress", default="", help="write the record from a soak-progress.json of a run cut short")
    parser.add_argument("--warm-up-s", type=float, default=0, help="with --from-progress: perf_analyzer's first window, s")
    parser.add_argument("--note", default="", help="with --from-progress: what happened, for the record")
    parser.add_argument("--device", default="", help="with --from-progress: the GPU the run had (nvidia-smi's name)")
    args = parser.parse_args()
    if args.from_progress:
        samples = json.loads(Path(args.from_progress).read_text())
        command = f"python benchmarks/soak.py --from-progress {Path(args.from_progress).name} --warm-up-s {args.warm_up_s:g}"
        write_record(Path(args.out), command, samples, args.warm_up_s, args.slack_mib, note=args.note, device=args.device)
        return 0

    from sd_client.perf import perf_analyzer

    env = {"SD_MODEL": args.model, "SD_OPT_LEVEL": args.opt_level}
    if args.stub_path:
        env["SD_STUB_EXTRA_PATH"] = args.stub_path
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    options = ServerOptions.on_free_ports(env=env)
    samples: list[dict] = []
    stop = threading.Event()
    with TritonServer(options, log_path=out / "soak-server.log") as server:
        began = time.monotonic()

        def take_sample() -> None:
            samples.append({"t_s": round(time.monotonic() - began, 1), "host_rss_mib": round(server.rss_mib(), 1), "gpu_mib": gpu_used_mib(),
                            "requests": request_counts(server.metrics_url, "stable_diffusion")})
            (out / "soak-progress.json").write_text(json.dumps(samples, indent=1))

        def sample() -> None:
            while not stop.is_set():
                take_sample()
                stop.wait(args.every_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        binary, perf_env = perf_analyzer()
        # perf_analyzer sleeps 1.2x --measurement-interval per window: three windows fill the minutes
        window_s = args.minutes * 60 / 3 / 1.2
        report = out / "soak-perf.csv"
        done = subprocess.run(
            [binary, "-m", "stable_diffusion", "-i", "grpc", "-u", server.grpc_url, "--input-data", args.perf_input,
             "--concurrency-range", f"{args.concurrency}:{args.concurrency}", "--measurement-interval", str(int(window_s * 1000)),
             "--stability-percentage", "999", "--max-trials", "3", "-f", str(report), "--percentile", "99"],
            env=perf_env, capture_output=True, text=True,
        )
        stop.set()
        sampler.join()
        take_sample()
    (out / "soak-perf.log").write_text(done.stdout + done.stderr)
    result = write_record(out, " ".join(sys.argv), samples, warm_up_s=window_s * 1.2, slack_mib=args.slack_mib, perf=done)
    return 0 if result["passed"] else 1


def write_record(out: Path, command: str, samples: list[dict], warm_up_s: float, slack_mib: float, perf=None, note: str = "",
                 device: str = "") -> dict:
    """The soak's verdict from its samples (and perf_analyzer's run, when it finished):
    <device>-<date>-soak.json and .md under out. Memory growth counts from the first sample
    after warm_up_s (perf_analyzer's first window) to the last."""
    failed = [line for line in perf.stdout.splitlines() if "failed" in line.lower() or "error" in line.lower()] if perf else []
    warm = next((s for s in samples if s["t_s"] >= warm_up_s), samples[0])
    last = samples[-1]
    grew_host = last["host_rss_mib"] - warm["host_rss_mib"]
    grew_gpu = max((b - a for a, b in zip(warm["gpu_mib"], last["gpu_mib"])), default=0.0)
    served = last["requests"]
    result = {
        "command": command, "note": note, "loaded_s": last["t_s"], "server_requests": served,
        "perf_analyzer_rc": perf.returncode if perf else None, "failure_lines": failed,
        "summary": perf.stdout[-1500:] if perf else None, "warm_up_s": warm_up_s,
        "host_rss_mib": [warm["host_rss_mib"], last["host_rss_mib"]], "gpu_mib": [warm["gpu_mib"], last["gpu_mib"]],
        "host_rss_growth_mib": round(grew_host, 1), "gpu_growth_mib": round(grew_gpu, 1), "samples": samples,
    }
    result["passed"] = (perf is None or perf.returncode == 0) and not failed and served["failure"] == 0 \
        and grew_host <= slack_mib and grew_gpu <= slack_mib
    steps = [(a["t_s"], b["t_s"], b["gpu_mib"]) for a, b in zip(samples, samples[1:]) if a["gpu_mib"] != b["gpu_mib"]]
    device = device or gpu_name() or "cpu"
    json_path, md_path = (result_path(out, device, "soak", suffix) for suffix in (".json", ".md"))
    json_path.write_text(json.dumps(result, indent=1))
    perf_line = f"perf_analyzer rc {perf.returncode}, {len(failed)} failure lines" if perf else "perf_analyzer did not finish"
    md_path.write_text(
        f"# Soak on {device.replace(' ', '-')}\n\n`{command}`\n\n{note + chr(10) + chr(10) if note else ''}"
        f"- passed{'' if perf else ' by the samples (server counters, memory)'}: {result['passed']} ({perf_line})\n"
        f"- load for {last['t_s'] / 60:.1f} min; requests counted by the server: {served['success']} succeeded, {served['failure']} failed\n"
        f"- host RSS after warm-up ({warm['t_s']:.0f} s) {warm['host_rss_mib']} MiB, at the end {last['host_rss_mib']} MiB\n"
        f"- GPU MiB after warm-up {warm['gpu_mib']}, at the end {last['gpu_mib']}; changes between samples: "
        f"{', '.join(f'{a:.0f}-{b:.0f} s to {m}' for a, b, m in steps) or 'none'}\n"
        + (f"\n```\n{perf.stdout[-1500:]}\n```\n" if perf else "")
    )
    print(md_path.read_text())
    return result


def gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return out.stdout.splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else None


if __name__ == "__main__":
    sys.exit(main())
