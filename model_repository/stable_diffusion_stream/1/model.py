"""Triton adapter for the streaming path: progress per step, previews, cancellation.

Decoupled: each request gets a response per denoising step, then the image (or an
error), then the final flag. The math lives in sd_backend (stages, streaming).
"""

import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import sd_backend  # noqa: F401
except ImportError:  # served from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sd_backend import triton_io as io
from sd_backend.metrics import StageMetrics
from sd_backend.stages import DenoiseJob, UNetStage
from sd_backend.streaming import Cancelled, step_reporter

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# what the vae_encoder model reads of a request (model_repository/vae_encoder/config.pbtxt)
_ENCODER_INPUTS = (
    "INIT_IMAGE", "MASK_IMAGE", "SEED", "STEPS", "GUIDANCE_SCALE", "GUIDANCE_CUTOFF", "CACHE_INTERVAL", "HEIGHT", "WIDTH", "SCHEDULER",
    "STRENGTH",
)
_MASK_OUTPUTS = ("MASKED_MOMENTS", "LATENT_MASK")  # vae_encoder's, for inpainting


def _call(model: str, inputs: list, outputs: list[str]) -> dict:
    """A BLS call to another model of this repository; its INVALID_ARG becomes ValueError."""
    reply = pb_utils.InferenceRequest(model_name=model, requested_output_names=outputs, inputs=inputs).exec()
    if reply.has_error():
        error = reply.error()
        if error.code() == pb_utils.TritonError.INVALID_ARG:
            raise ValueError(error.message())
        raise RuntimeError(f"{model}: {error.message()}")
    return {name: pb_utils.get_output_tensor_by_name(reply, name) for name in outputs}


class TritonPythonModel:
    def initialize(self, args):
        # kernels yes, whole-loop graphs no: this loop reports every step
        self.stage = io.load_stage(UNetStage, args, capture=False)
        self.metrics = StageMetrics(pb_utils, "stream")

    def execute(self, requests):
        for request in requests:
            self.metrics.timed([request], lambda: self._serve(request))
        return None

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            final = self._generate(request, sender)
        except Cancelled as err:
            final = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err), pb_utils.TritonError.CANCELLED))
        except Exception as err:  # noqa: BLE001 - the client must get an answer
            final = io.error_response(pb_utils, err)
        sender.send(final, flags=_FINAL)

    def _generate(self, request, sender):
        io.read_prompts(pb_utils, request, self.stage.config.max_prompt_bytes)  # PROMPT present, both within limits
        mask = io.read_mask(pb_utils, request)  # inpainting, with INIT_IMAGE
        image_to_image = mask is not None or pb_utils.get_input_tensor_by_name(request, "INIT_IMAGE") is not None
        image_size = tuple(io.read_image(pb_utils, request).shape[:2]) if image_to_image else None
        mask_size = None if mask is None else tuple(mask.shape)
        params = self.stage.check(image_size=image_size, mask_size=mask_size, inpaint=mask is not None, **io.read_generation_inputs(pb_utils, request))
        every = io.read_scalar(pb_utils, request, "PREVIEW_EVERY") or 0
        if not 0 <= every <= params.steps:
            raise ValueError(f"PREVIEW_EVERY: {every} is out of range; allowed 0 (no previews) to STEPS ({params.steps})")

        texts = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in ("PROMPT", "NEGATIVE_PROMPT")) if t]
        encoded = _call("text_encoder", texts, [*io.CONDITIONING, "PROMPT_TOKENS_DROPPED"])
        images = {}  # INIT_MOMENTS, and for inpainting MASKED_MOMENTS and LATENT_MASK
        if image_to_image:  # the image's latent distribution, by the vae_encoder model (which checks it too)
            given = [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in _ENCODER_INPUTS) if t]
            wanted = ["INIT_MOMENTS", *(_MASK_OUTPUTS if mask is not None else ())]
            images = {name: io.to_torch(tensor)[0] for name, tensor in _call("vae_encoder", given, wanted).items()}
        job = DenoiseJob(
            params, *(io.to_torch(encoded[name])[0] for name in io.CONDITIONING), init_moments=images.get("INIT_MOMENTS"),
            masked_moments=images.get("MASKED_MOMENTS"), latent_mask=images.get("LATENT_MASK"),
        )

        def send(step, total, preview):
            outputs = [
                pb_utils.Tensor("STEP", np.array([[step]], np.int32)),
                pb_utils.Tensor("TOTAL_STEPS", np.array([[total]], np.int32)),
            ]
            if preview is not None:
                outputs.append(pb_utils.Tensor("PREVIEW", preview[None]))
            sender.send(pb_utils.InferenceResponse(outputs))

        latents = self.stage.run_group([job], callback=step_reporter(int(every), send, request.is_cancelled))
        self.metrics.add("steps", params.steps)
        image = _call("vae", [io.from_torch(pb_utils, "LATENTS", latents.float())], ["IMAGE"])["IMAGE"]
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor("IMAGE", image.as_numpy()),
                pb_utils.Tensor("SEED_USED", np.array([[params.seed]], np.int64)),
                pb_utils.Tensor("PROMPT_TOKENS_DROPPED", encoded["PROMPT_TOKENS_DROPPED"].as_numpy()),
                io.parameters_tensor(pb_utils, params, self.stage.config),
            ]
        )

    def finalize(self):
        self.metrics.close()
