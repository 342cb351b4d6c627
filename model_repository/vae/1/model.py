"""Triton adapter for the VAE decoder (the math lives in sd_backend.stages)."""

import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils

try:
    import sd_backend  # noqa: F401
except ImportError:  # served from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sd_backend import triton_io as io
from sd_backend.metrics import StageMetrics
from sd_backend.stages import VAEStage


class TritonPythonModel:
    def initialize(self, args):
        self.stage = io.load_stage(VAEStage, args)
        self.metrics = StageMetrics(pb_utils, "vae")

    def execute(self, requests):
        def parse(request):
            return io.to_torch(pb_utils.get_input_tensor_by_name(request, "LATENTS"))

        def reply(_, image):
            self.metrics.add("images", 1)
            return pb_utils.InferenceResponse([pb_utils.Tensor("IMAGE", image[None])])

        return self.metrics.timed(requests, lambda: io.respond(pb_utils, requests, parse, self.stage, reply))

    def finalize(self):
        self.metrics.close()
