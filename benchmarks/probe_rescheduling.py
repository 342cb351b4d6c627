"""What Triton's request rescheduling (iterative sequences) offers a denoising loop, measured
on a real tritonserver with a stand-in model: no Stable Diffusion, only the scheduling.

    python benchmarks/probe_rescheduling.py [--iterations 50] [--clients 8]

The stand-in is a Python-backend model under `sequence_batching { iterative_sequence: true }`
that counts each request's executions (by its implicit correlation id) and reschedules it
(`TRITONSERVER_REQUEST_RELEASE_RESCHEDULE`) until it has had --iterations, then answers: a
loop of that many steps, one step per execute, with requests free to join at any step. It
runs behind an ensemble too, as the unet would. Reported: the time per iteration of one
request alone (Triton's scheduling, the stub round trip, nothing else: the cost a per-step
loop would add to every step), the batch sizes Triton formed under --clients closed-loop
clients, and whether requests that arrived at different times ran in one batch at different
steps (what joining groups at step granularity needs). benchmarks/NOTES.md has the figures.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.done = {{}}
        self.log = open({log!r}, "a")

    def execute(self, requests):
        responses, steps = [], []
        for request in requests:
            cid = request.correlation_id()
            n = self.done.get(cid, 0) + 1
            self.done[cid] = n
            steps.append(str(n))
            if n < {iterations}:
                request.set_release_flags(pb_utils.TRITONSERVER_REQUEST_RELEASE_RESCHEDULE)
                responses.append(None)
            else:
                del self.done[cid]
                x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", (x + n).astype(np.float32))]))
        self.log.write(" ".join(steps) + "\\n")
        self.log.flush()
        return responses
'''

STEPPER = """name: "stepper"
backend: "python"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
sequence_batching {
  iterative_sequence: true
  oldest { max_candidate_sequences: 8 preferred_batch_size: [ 8 ] max_queue_delay_microseconds: 100 }
}
instance_group [ { count: 1 kind: KIND_CPU } ]
"""

ENSEMBLE = """name: "ens"
platform: "ensemble"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]
ensemble_scheduling { step [ { model_name: "stepper" model_version: -1
  input_map { key: "X" value: "X" } output_map { key: "Y" value: "Y" } } ] }
"""


def write_repository(root: Path, iterations: int, log: Path) -> Path:
    repo = root / "repo"
    (repo / "stepper" / "1").mkdir(parents=True)
    (repo / "ens" / "1").mkdir(parents=True)
    (repo / "stepper" / "config.pbtxt").write_text(STEPPER)
    (repo / "stepper" / "1" / "model.py").write_text(MODEL.format(log=str(log), iterations=iterations))
    (repo / "ens" / "config.pbtxt").write_text(ENSEMBLE)
    return repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    args = parser.parse_args()

    import numpy as np
    import tritonclient.grpc as grpc

    from sd_backend import launcher

    root = Path(tempfile.mkdtemp(prefix="resched-"))
    log = root / "batches.log"
    options = launcher.ServerOptions.on_free_ports(model_repository=write_repository(root, args.iterations, log), env={})
    binary, tree = launcher.find_tritonserver()
    backend = launcher.prepare_backend_dir(tree, root / "backends") if tree is not None else None
    command = launcher.server_command(options, binary, backend, f"resched{root.name[-6:]}")
    server = subprocess.Popen(command, env=launcher.server_environment(options, tree),
                              stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"{options.host}:{options.grpc_port}"
    try:
        client = grpc.InferenceServerClient(url)
        for _ in range(240):
            try:
                if client.is_server_ready():
                    break
            except Exception:
                pass
            if server.poll() is not None:
                raise SystemExit(f"tritonserver exited; its log: {root / 'server.log'}")
            time.sleep(0.5)
        x = grpc.InferInput("X", [1, 1], "FP32")
        x.set_data_from_numpy(np.array([[1.0]], np.float32))
        for model in ("stepper", "ens"):
            times = []
            for _ in range(7):
                began = time.perf_counter()
                client.infer(model, [x])
                times.append(time.perf_counter() - began)
            alone = statistics.median(times[1:])
            print(f"{model}, one request alone: {alone * 1e3:.1f} ms for {args.iterations} iterations, "
                  f"{alone / args.iterations * 1e3:.3f} ms per iteration")
        log.write_text("")  # the batches of the concurrent part only

        def loop(latencies: list) -> None:
            own = grpc.InferenceServerClient(url)
            for _ in range(args.requests):
                began = time.perf_counter()
                own.infer("ens", [x])
                latencies.append(time.perf_counter() - began)

        per_client = [[] for _ in range(args.clients)]
        threads = [threading.Thread(target=loop, args=(lat,)) for lat in per_client]
        began = time.perf_counter()
        for i, thread in enumerate(threads):
            thread.start()
            time.sleep(0.002 * i)  # staggered arrivals
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        batches = [line.split() for line in log.read_text().splitlines() if line.strip()]
        sizes = collections.Counter(len(b) for b in batches)
        mixed = sum(1 for b in batches if len(set(b)) > 1)
        latencies = [t for lat in per_client for t in lat]
        print(f"{args.clients} clients x {args.requests} requests through the ensemble: {wall:.2f} s, "
              f"median latency {statistics.median(latencies) * 1e3:.1f} ms")
        print(f"batch sizes (size: executions): {dict(sorted(sizes.items()))}; "
              f"executions whose requests were at different steps: {mixed} of {len(batches)}")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
