"""Triton adapter for the CLIP text encoder (the math lives in sd_backend.stages)."""

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
from sd_backend.stages import TextEncoderStage


class TritonPythonModel:
    def initialize(self, args):
        self.stage = io.load_stage(TextEncoderStage, args)
        self.metrics = StageMetrics(pb_utils, "text_encoder")

    def execute(self, requests):
        def parse(request):
            prompt, negative = io.read_prompts(pb_utils, request, self.stage.config.max_prompt_bytes)
            params = self.stage.check(**io.read_generation_inputs(pb_utils, request))  # the whole request, before any work
            return prompt, negative, (params.lora, params.lora_scale)

        def run(items):
            return self.stage([p for p, _, _ in items], [n for _, n, _ in items], [a for _, _, a in items])

        def reply(_, encoded):
            return pb_utils.InferenceResponse(
                [
                    io.from_torch(pb_utils, "PROMPT_EMBEDS", encoded.prompt_embeds.float()[None]),
                    io.from_torch(pb_utils, "NEGATIVE_EMBEDS", encoded.negative_embeds.float()[None]),
                    pb_utils.Tensor("PROMPT_TOKENS_DROPPED", np.array([[encoded.dropped_tokens]], np.int32)),
                    io.from_torch(pb_utils, "POOLED_EMBEDS", encoded.pooled.float()[None]),
                    io.from_torch(pb_utils, "NEGATIVE_POOLED_EMBEDS", encoded.negative_pooled.float()[None]),
                ]
            )

        return self.metrics.timed(requests, lambda: io.respond(pb_utils, requests, parse, run, reply))

    def finalize(self):
        self.metrics.close()
