"""Image-to-image on the captured loops against text-to-image, one process: the UNet stage
(sd15-random, 512², 50 PNDM steps, guidance 7.5, `triton` level) at strength S replays a loop
captured for its start step (int(50 x S) steps), beside text-to-image's loop and the same
image-to-image request on the eager loop; the VAE encoder's time for one 512² image is added
as the served path adds it (the vae_encoder model runs before the UNet).

    python benchmarks/bench_img2img.py [--strength 0.6] [--batches 1,8] [--repeats 5] [--out DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stage_bench import median_seconds, offline_model, stage_parser, write_record  # noqa: E402


def main() -> int:
    parser = stage_parser(__doc__)
    parser.add_argument("--strength", type=float, default=0.6)
    args = parser.parse_args()

    from sd_backend.config import DeploymentConfig
    from sd_backend.stages import DenoiseJob, UNetStage, VAEEncoderStage

    model_dir = offline_model(args)
    batches = [int(b) for b in args.batches.split(",")]
    config = DeploymentConfig(model=str(model_dir), opt_level="triton", dtype="float16", default_steps=args.steps, batch_buckets=tuple(batches))
    stage = UNetStage.from_config(config)  # text-to-image's default loops captured
    encoder = VAEEncoderStage.from_config(config)
    size = stage.family.native_size
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    capture_s = stage.graphs.capture(stage.check(seed=0, strength=args.strength, image_size=(size, size)), batches)
    hidden = stage.unet.config.cross_attention_dim
    moments = encoder([image])[0]

    def jobs(n, strength):
        made = []
        for i in range(n):
            params = stage.check(seed=i, strength=strength, image_size=(size, size) if strength else None)
            job = DenoiseJob(params, torch.randn(77, hidden).cuda().half(), torch.randn(77, hidden).cuda().half())
            job.init_moments = moments if strength else None
            made.append(job)
        return made

    def timed(fn, make):
        return median_seconds(fn, lambda _: make(), args.repeats)

    def eager(batch):
        graphs, stage.graphs = stage.graphs, None
        try:
            return stage(batch)
        finally:
            stage.graphs = graphs

    encode_s = timed(lambda images: encoder(images), lambda: [image])
    rows = []
    for n in batches:
        text = timed(stage, lambda: jobs(n, None))
        graphed = timed(stage, lambda: jobs(n, args.strength))
        slow = timed(eager, lambda: jobs(n, args.strength))
        target = args.strength * text + n * encode_s
        rows.append({"batch": n, "text_to_image_s": text, "image_to_image_s": graphed, "image_to_image_eager_s": slow,
                     "encoder_s": n * encode_s, "target_s": target})
        print(f"batch {n}: text-to-image {text:.4f} s; image-to-image {args.strength} captured {graphed:.4f} s "
              f"({graphed / text:.2f}x) + encoder {n * encode_s:.4f} s = {graphed + n * encode_s:.4f} s "
              f"(target {args.strength} x text + encoder = {target:.4f} s); eager loop {slow:.4f} s", flush=True)
    write_record(args, "img2img", {"strength": args.strength, "rows": rows, "encoder_s_per_image": encode_s, "capture_s": capture_s})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
