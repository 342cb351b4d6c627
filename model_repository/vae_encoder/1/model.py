"""Triton adapter for the VAE encoder of image-to-image (the math lives in sd_backend.stages)."""

import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils

try:
    import sd_backend  # noqa: F401
except ImportError:  # served from a checkout that was not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from sd_backend import triton_io as io
from sd_backend.metrics import StageMetrics
from sd_backend.stages import VAEEncoderStage


class TritonPythonModel:
    def initialize(self, args):
        self.stage = io.load_stage(VAEEncoderStage, args)
        self.metrics = StageMetrics(pb_utils, "vae_encoder")

    def execute(self, requests):
        def parse(request):
            image = io.read_image(pb_utils, request)
            self.stage.check(image, **io.read_generation_inputs(pb_utils, request))  # the whole request, before any work
            return image

        def reply(_, moments):
            return pb_utils.InferenceResponse([io.from_torch(pb_utils, "INIT_MOMENTS", moments[None])])

        return self.metrics.timed(requests, lambda: io.respond(pb_utils, requests, parse, self.stage, reply))

    def finalize(self):
        self.metrics.close()
