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
            image, mask = io.read_image(pb_utils, request), io.read_mask(pb_utils, request)
            self.stage.check(image, mask, **io.read_generation_inputs(pb_utils, request))  # the whole request, before any work
            return image, mask

        def run(items):
            return [self.stage.encode(image, mask) for image, mask in items]

        def reply(_, encoded):
            names = ("INIT_MOMENTS", "MASKED_MOMENTS", "LATENT_MASK")  # the last two for inpainting only
            return pb_utils.InferenceResponse([io.from_torch(pb_utils, n, t[None]) for n, t in zip(names, encoded) if t is not None])

        return self.metrics.timed(requests, lambda: io.respond(pb_utils, requests, parse, run, reply))

    def finalize(self):
        self.metrics.close()
