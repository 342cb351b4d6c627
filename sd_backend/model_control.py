"""Triton's model-repository API (index, load, unload, readiness) as the launcher uses it:
over HTTP, with the admin header when the server restricts those APIs."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Iterable

ADMIN_HEADER = "sd-admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"  # the same key as gRPC metadata (Triton's prefix)
# what a call to a server that is gone or going raises
UNREACHABLE = (urllib.error.URLError, ConnectionError, OSError)
RELOAD_PARAMETER = "sd_reloads"  # how many times the launcher reloaded the model in place


class ModelControl:
    def __init__(self, http_url: str, admin_key: str | None):
        self.http_url = http_url
        self.admin_key = admin_key

    def answers_ok(self, path: str, timeout_s: float = 2) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=timeout_s) as reply:
                return reply.status == 200
        except UNREACHABLE:
            return False

    def is_model_ready(self, model: str) -> bool:
        return self.answers_ok(f"/v2/models/{model}/ready")

    def _admin(self, path: str, timeout_s: float, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.admin_key is not None:
            headers[ADMIN_HEADER] = self.admin_key
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(f"http://{self.http_url}{path}", data=data, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            text = reply.read()
        return json.loads(text) if text else None

    def states(self, timeout_s: float = 10) -> dict[str, str]:
        """{model: READY | UNLOADING | UNAVAILABLE | ...} of the repository's models."""
        return {m["name"]: m.get("state", "") for m in self._admin("/v2/repository/index", timeout_s)}

    def load(self, model: str, timeout_s: float) -> None:
        """Load a model (a loaded model whose files did not change is left as it is)."""
        self._admin(f"/v2/repository/models/{model}/load", timeout_s)

    def reload_in_place(self, model: str, timeout_s: float) -> None:
        """New instances of a loaded model, swapped in once they are ready; the ensembles that
        run it stay loaded. Triton reloads only a model whose configuration changed, so the
        load carries the model's own configuration with a reload counter in its parameters."""
        with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/config", timeout=timeout_s) as reply:
            config = json.loads(reply.read())
        parameters = config.setdefault("parameters", {})
        count = int(parameters.get(RELOAD_PARAMETER, {}).get("string_value", "0")) + 1
        parameters[RELOAD_PARAMETER] = {"string_value": str(count)}
        self._admin(f"/v2/repository/models/{model}/load", timeout_s, {"parameters": {"config": json.dumps(config)}})

    def unload(self, model: str, timeout_s: float) -> None:
        self._admin(f"/v2/repository/models/{model}/unload", timeout_s)

    def entry_models(self, states: dict[str, str], timeout_s: float = 10) -> list[str]:
        """Loaded models that no ensemble runs as a step: where requests come in."""
        steps = set()
        for model, state in states.items():
            if state == "READY":
                with urllib.request.urlopen(f"http://{self.http_url}/v2/models/{model}/config", timeout=timeout_s) as reply:
                    config = json.loads(reply.read())
                steps |= {step["model_name"] for step in config.get("ensemble_scheduling", {}).get("step", [])}
        return [model for model, state in states.items() if state == "READY" and model not in steps]

    def unload_and_wait(self, models: Iterable[str], deadline: float) -> bool:
        """Unload `models` and wait until each is done: an unloading model keeps serving the
        requests it holds and is UNAVAILABLE once they are finished. False at the deadline."""
        models = list(models)

        def left() -> float:  # no call outlives the deadline
            return max(0.1, min(10.0, deadline - time.monotonic()))

        for model in models:
            self.unload(model, left())
        while time.monotonic() < deadline:
            states = self.states(left())
            if all(states.get(model) not in ("READY", "UNLOADING") for model in models):
                return True
            time.sleep(0.2)
        return False
