"""A local stand-in for the Hugging Face hub's HTTP API, serving one directory as one model
repository: the calls huggingface_hub's snapshot_download makes (revision, tree, and a HEAD
then a GET per file), each logged, so a test sees who asked for what."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from pathlib import Path


class StandInHub:
    def __init__(self, repo_id: str, directory: Path, gated: bool = False):
        self.repo_id = repo_id
        self.gated = gated  # answer as the hub does for a gated model and no accepted terms
        root = Path(directory)
        self.files = {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}
        self.sha = hashlib.sha1("\n".join(self.files).encode()).hexdigest()  # the one commit
        self.requests: list[tuple[str, str]] = []
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, path: str) -> tuple[int, bytes, dict]:
        api = f"/api/models/{self.repo_id}/"
        if self.gated and (path.startswith(api) or path.startswith(f"/{self.repo_id}/")):
            return 401, b'{"error": "Access to model is restricted."}', {"X-Error-Code": "GatedRepo"}
        if path.startswith(api + "revision/"):
            siblings = [{"rfilename": name} for name in self.files]
            return 200, json.dumps({"id": self.repo_id, "sha": self.sha, "siblings": siblings}).encode(), {}
        if path.startswith(api + "tree/"):
            tree = [
                {"type": "file", "path": name, "size": p.stat().st_size, "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                for name, p in self.files.items()
            ]
            return 200, json.dumps(tree).encode(), {}
        prefix = f"/{self.repo_id}/resolve/"
        if path.startswith(prefix):
            name = urllib.parse.unquote(path[len(prefix):].partition("/")[2])
            if name in self.files:
                data = self.files[name].read_bytes()
                return 200, data, {"X-Repo-Commit": self.sha, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
            return 404, b"", {"X-Error-Code": "EntryNotFound"}
        return 404, b"", {"X-Error-Code": "RepoNotFound"}

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, body_too: bool) -> None:
                path = urllib.parse.urlsplit(self.path).path
                hub.requests.append((self.command, path))
                status, body, headers = hub._answer(path)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body_too:
                    self.wfile.write(body)

            def do_GET(self):  # noqa: N802 - http.server's name
                self._reply(True)

            def do_HEAD(self):  # noqa: N802
                self._reply(False)

            def log_message(self, *args):
                pass

        return Handler
