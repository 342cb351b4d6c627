"""The launcher's health endpoints for probes: `GET /ready` and `GET /live`.

Tritonserver's own answers are not the whole truth about this deployment. Its
/v2/health/ready (strict readiness) counts every model the repository API was ever asked
to load, so one failed load of a name that is no model makes it fail forever; and a model
whose Python-backend stub died still reports ready while the launcher replaces the stub.
The launcher knows both, and whether it is draining, so probes ask it:

- `/ready`: 200 when every model this deployment serves is ready, no stub is being
  replaced and no stop has begun; else 503 with the reason as text.
- `/live`: 200 while tritonserver runs and answers its own liveness; else 503.
"""

from __future__ import annotations

import http.server
import threading
from typing import Callable

DEFAULT_PORT = 8003  # next to Triton's 8000-8002; docker/ and the rendered manifests probe it
READY_PATH, LIVE_PATH = "/ready", "/live"


class HealthServer:
    """`readiness` and `liveness` return (ok, reason); each request calls them afresh."""

    def __init__(self, host: str, port: int, readiness: Callable[[], tuple[bool, str]], liveness: Callable[[], tuple[bool, str]]):
        routes = {READY_PATH: readiness, LIVE_PATH: liveness}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                check = routes.get(self.path.split("?")[0])
                if check is None:
                    ok, reason, status = False, "unknown path; try /ready or /live", 404
                else:
                    ok, reason = check()
                    status = 200 if ok else 503
                body = (reason + "\n").encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # probes every few seconds: no line each
                pass

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="sd-triton-health", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> "HealthServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
