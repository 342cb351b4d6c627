"""The diffusers version whose internals sd_backend.fast.modules mirrors.

TritonAttnProcessor takes AttnProcessor2_0.__call__'s steps, TritonTransformer2DModel
overrides Transformer2DModel._operate_on_continuous_inputs and
_get_output_for_continuous_inputs, TritonResnetBlock2D copies ResnetBlock2D.forward, and
StepConstants calls UNet2DConditionModel.get_time_embed: all as in diffusers 0.42. Another
minor version may have changed any of them, so patching refuses it (pyproject.toml pins
the same range).
"""

from __future__ import annotations

MIRRORED_DIFFUSERS = (0, 42)


def check_diffusers(version: str | None = None) -> None:
    """Raise RuntimeError unless `version` (the installed diffusers by default) is 0.42.x."""
    if version is None:
        import diffusers

        version = diffusers.__version__
    try:
        minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        minor = None
    if minor != MIRRORED_DIFFUSERS:
        want = ".".join(map(str, MIRRORED_DIFFUSERS))
        raise RuntimeError(
            f"the triton level's modules mirror diffusers {want}'s internals (AttnProcessor2_0, "
            f"Transformer2DModel, ResnetBlock2D, UNet2DConditionModel.get_time_embed), but diffusers {version} "
            f"is installed: install diffusers=={want}.* or serve with opt_level eager or compile"
        )
