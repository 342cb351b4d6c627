"""The streaming path: one request's denoising loop, step by step, with progress.

`stable_diffusion_stream` (a decoupled Python-backend model) sends a response per step
and, every `preview_every` steps, a preview computed from the latents alone (a fixed
linear map from the 4 latent channels to RGB at latent resolution: no VAE call, about
a microsecond of arithmetic per pixel).
"""

from __future__ import annotations

from typing import Any, Callable

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


def step_reporter(preview_every: int, send: Callable[[int, int, Any], None], cancelled: Callable[[], bool]):
    """A `denoise` callback: raises Cancelled when the client went away, else calls
    `send(step, total, preview_or_None)` with the 1-based step number."""

    def report(index: int, total: int, latents) -> None:
        if cancelled():
            raise Cancelled(f"cancelled by the client after step {index + 1} of {total}")
        step = index + 1
        show = preview_every > 0 and (step % preview_every == 0 or step == total)
        send(step, total, preview(latents) if show else None)

    return report
