"""Triton adapter for the denoising loop (the math lives in sd_backend.stages).

The streaming model's requests come here too (BLS, with PROGRESS_TOKEN): they batch with
the ensemble's and report every step over their progress channel (sd_backend.streaming).
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


class TritonPythonModel:
    def initialize(self, args):
        self.stage = io.load_stage(UNetStage, args)
        self.metrics = StageMetrics(pb_utils, "unet", self.stage.lora_defaults())

    def execute(self, requests):
        jobs = []

        def parse(request):
            inputs = [io.to_torch(pb_utils.get_input_tensor_by_name(request, name))[0] for name in io.CONDITIONING]
            moments, masked, mask = (io.read_optional(pb_utils, request, n) for n in ("INIT_MOMENTS", "MASKED_MOMENTS", "LATENT_MASK"))
            image_size = None if moments is None else tuple(d * self.stage.vae_scale for d in moments.shape[-2:])
            params = self.stage.check(image_size=image_size, inpaint=mask is not None, **io.read_generation_inputs(pb_utils, request))
            job = DenoiseJob(params, *inputs, init_moments=moments, masked_moments=masked, latent_mask=mask)
            job.progress = io.read_progress(pb_utils, request, params.steps)  # last: it connects
            jobs.append(job)
            return job

        def reply(job, latents):
            if latents is None or (job.progress is not None and job.progress.cancelled):  # its stream was cancelled
                return pb_utils.InferenceResponse(error=pb_utils.TritonError("cancelled by the client", pb_utils.TritonError.CANCELLED))
            self.metrics.add("steps", job.params.steps)
            return pb_utils.InferenceResponse(
                [
                    io.from_torch(pb_utils, "LATENTS", latents.float()),
                    pb_utils.Tensor("SEED_USED", np.array([[job.params.seed]], np.int64)),
                    io.parameters_tensor(pb_utils, job.params, self.stage.config),
                ]
            )

        try:
            return self.metrics.timed(requests, lambda: io.respond(pb_utils, requests, parse, self.stage, reply))
        finally:
            for job in jobs:
                if job.progress is not None:
                    job.progress.close()

    def finalize(self):
        self.metrics.close()
