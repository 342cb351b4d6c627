"""The streaming path's reports: after every denoising step, which step, and every
`preview_every` steps a preview computed from the latents alone (a fixed linear map from the
4 latent channels to RGB at latent resolution: no VAE call, about a microsecond of
arithmetic per pixel).

`stable_diffusion_stream` (a decoupled model) sends its request to the `unet` model with a
PROGRESS_TOKEN; there, each such request's `JobProgress` reports over the channel
(sd_backend.progress_channel) while the loop runs, on the captured graphs or step by step.
"""

from __future__ import annotations

from typing import Any, Sequence

from .progress_channel import Progress, Reporter

# latent channels -> RGB in [-1, 1] for Stable Diffusion 1.x/2.x latents, the
# least-squares fit that image UIs use for live previews
LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


class Cancelled(Exception):
    """The client cancelled the request."""


def preview(latents) -> Any:
    """(h/8, w/8, 3) uint8 RGB of the first latent in (B, 4, h/8, w/8)."""
    import torch

    table = torch.tensor(LATENT_RGB, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents[0].float(), table)
    return ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).cpu().numpy()


class JobProgress:
    """One request's reports: `report(index, total, latents)` after each step (latents its
    own (1, C, h, w) row); stops reporting once the streaming model cancels."""

    def __init__(self, reporter: Reporter, preview_every: int):
        self.reporter = reporter
        self.preview_every = preview_every
        self.cancelled = False

    def report(self, index: int, total: int, latents) -> None:
        if self.cancelled or self.reporter.cancelled():
            self.cancelled = True
            return
        step = index + 1
        show = self.preview_every > 0 and (step % self.preview_every == 0 or step == total)
        self.reporter.send(Progress(step, total, preview(latents) if show else None))

    def close(self) -> None:
        self.reporter.close()


def group_reporter(progress: Sequence[JobProgress | None]):
    """A `denoise` callback for one batch whose rows are `progress`' requests (None: a
    request without reports): each row's report, then Cancelled when every row is a
    cancelled stream (the batch's work is for nobody). None when no row reports."""
    if all(p is None for p in progress):
        return None

    def report(index: int, total: int, latents) -> None:
        for row, job in enumerate(progress):
            if job is not None:
                job.report(index, total, latents[row : row + 1])
        if all(job is not None and job.cancelled for job in progress):
            raise Cancelled(f"cancelled by the client after step {index + 1} of {total}")

    return report
