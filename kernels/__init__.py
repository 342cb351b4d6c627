"""Triton kernels for the Stable Diffusion 1.x/2.x UNet, VAE and CLIP.

One op per module, each with a launcher and a plain-torch `<op>_reference`:
flash_attention, group_norm (with fused SiLU and pre-add), layer_norm, geglu,
bias_residual. `kernels.patch` swaps them into a diffusers model.

The ops need OpenAI Triton. Without it this package still imports (so that
`kernels.patch` works and falls back to torch off CUDA); using an op raises ImportError.
"""

__all__ = [
    "bias_residual",
    "bias_residual_reference",
    "flash_attention",
    "flash_attention_reference",
    "geglu",
    "geglu_reference",
    "group_norm",
    "group_norm_reference",
    "layer_norm",
    "layer_norm_reference",
]

try:
    from .bias_residual import bias_residual, bias_residual_reference
    from .flash_attention import flash_attention, flash_attention_reference
    from .geglu import geglu, geglu_reference
    from .group_norm import group_norm, group_norm_reference
    from .layer_norm import layer_norm, layer_norm_reference
except ModuleNotFoundError as _err:
    if _err.name != "triton":
        raise
    _TRITON_IMPORT_ERROR = _err

    def __getattr__(name):
        if name in __all__:
            raise ImportError(
                f"kernels.{name} needs OpenAI Triton, which is not installed (pip install triton)"
            ) from _TRITON_IMPORT_ERROR
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
