"""Triton adapter for the streaming path: progress per step, previews, cancellation.

Decoupled: each request gets a response per denoising step, then the image (or an
error), then the final flag. It holds no model and loads none: each stream is one BLS call
to the ensemble its image inputs name (stable_diffusion, _img2img or _inpaint), with the
token of the stream's progress channel (sd_backend.progress_channel) as PROGRESS_TOKEN,
which the ensemble hands the `unet` model; so a stream's loop batches with the ensemble's
and other streams' on the same captured graphs, its tensors stay on the GPU between the
models as the ensemble's do, and its image is the ensemble's. The unet reports each step
over the channel, which this model forwards while the call runs.

One request at a time per instance, answered before `execute` returns; concurrent streams
run on the model's instances (config.pbtxt), which are light processes. Threads that answer
requests after `execute` returned, or several BLS calls in flight from one process, crashed
tritonserver 2.51's Python backend in testing (its shared-memory bookkeeping, see
benchmarks/NOTES.md), so each instance keeps one BLS call in flight.
"""

import sys
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import sd_backend  # noqa: F401
except ImportError:  # served from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sd_backend import triton_io as io
from sd_backend.metrics import StageMetrics
from sd_backend.progress_channel import Listener
from sd_backend.streaming import Cancelled

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_POLL_S = 0.02  # how often a stream waiting on its loop checks for its client's cancel
_OUTPUTS = ["IMAGE", "SEED_USED", "PROMPT_TOKENS_DROPPED", "PARAMETERS"]  # what each ensemble answers


def _ensemble(names: set) -> str:
    """The ensemble a stream runs through, by its image inputs (the encoder there names a missing INIT_IMAGE)."""
    if "MASK_IMAGE" in names:
        return "stable_diffusion_inpaint"
    return "stable_diffusion_img2img" if "INIT_IMAGE" in names else "stable_diffusion"


def _call(model: str, inputs: list, outputs: list[str]) -> dict:
    """A BLS call to another model of this repository; its INVALID_ARG becomes ValueError,
    its CANCELLED Cancelled. The outputs come in host memory (embeddings, moments, latents:
    at most a few MB): this process never opens a GPU, so an instance costs no GPU memory.
    (PreferredMemory exists once the stub has set the module up, not at import.)"""
    host = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU)
    reply = pb_utils.InferenceRequest(
        model_name=model, requested_output_names=outputs, inputs=inputs, preferred_memory=host
    ).exec()
    if reply.has_error():
        error = reply.error()
        if error.code() == pb_utils.TritonError.INVALID_ARG:
            raise ValueError(error.message())
        if error.code() == pb_utils.TritonError.CANCELLED:
            raise Cancelled(error.message())
        raise RuntimeError(f"{model}: {error.message()}")
    return {name: pb_utils.get_output_tensor_by_name(reply, name) for name in outputs}


class TritonPythonModel:
    def initialize(self, args):
        self.metrics = StageMetrics(pb_utils, "stream")

    def execute(self, requests):
        for request in requests:
            self.metrics.timed([request], lambda: self._answer(request))
        return None

    def _answer(self, request):
        sender = request.get_response_sender()
        try:
            final = self._generate(request, sender)
        except Cancelled as err:
            final = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), pb_utils.TritonError.CANCELLED))
        except Exception as err:  # noqa: BLE001 - the client must get an answer
            final = io.error_response(pb_utils, err)
        sender.send(final, flags=_FINAL)

    def _generate(self, request, sender):
        """The ensemble's answer to this request's inputs (the one of its image inputs: text-,
        image-to-image or inpainting), its step reports forwarded as they come."""
        given = request.inputs()
        ensemble = _ensemble({t.name() for t in given})
        if request.is_cancelled():
            raise Cancelled("cancelled by the client before it started")
        outputs = self._run(request, sender, ensemble, given)
        return pb_utils.InferenceResponse([outputs[name] for name in _OUTPUTS])

    def _run(self, request, sender, ensemble: str, inputs: list) -> dict:
        """The ensemble's outputs for this request; its unet reports each step over a progress
        channel whose token goes with the request, forwarded while the call runs."""
        listener = Listener()
        outcome = {}
        try:
            token = pb_utils.Tensor("PROGRESS_TOKEN", np.array([[listener.token.encode()]], dtype=object))

            def call():
                try:
                    outcome["outputs"] = _call(ensemble, inputs + [token], _OUTPUTS)
                except Exception as err:  # noqa: BLE001 - raised on the request's thread below
                    outcome["error"] = err

            worker = threading.Thread(target=call, name="stream-ensemble")
            worker.start()
            cancelled, next_check = False, 0.0
            # until the unet hangs up (its loop is over), or the call ends without it connecting
            # (a request the text encoder or the unet refused)
            while not listener.closed and (worker.is_alive() or listener.connected(0.0)):
                # is_cancelled() is a round trip to the server: once per poll, not once per step
                if not cancelled and time.monotonic() >= next_check:
                    next_check = time.monotonic() + _POLL_S
                    if request.is_cancelled():
                        cancelled = True
                        listener.cancel()
                progress = listener.receive(_POLL_S)
                if progress is not None and not cancelled:
                    sender.send(self._progress_response(progress))
            worker.join()
        finally:
            listener.close()
        if "error" in outcome:
            raise outcome["error"]
        if cancelled:
            raise Cancelled("cancelled by the client")
        return outcome["outputs"]

    @staticmethod
    def _progress_response(progress):
        outputs = [
            pb_utils.Tensor("STEP", np.array([[progress.step]], np.int32)),
            pb_utils.Tensor("TOTAL_STEPS", np.array([[progress.total]], np.int32)),
        ]
        if progress.preview is not None:
            outputs.append(pb_utils.Tensor("PREVIEW", progress.preview[None]))
        return pb_utils.InferenceResponse(outputs)

    def finalize(self):
        self.metrics.close()
