"""OpenAI-Triton ops for the Stable Diffusion UNet and VAE (`sd_kernels`).

One op per module, in the order of Triton's tutorials (the math as a docstring, the
@triton.jit kernels, a launcher that checks and launches, a plain-torch `<op>_reference`):
flash_attention, group_norm (with fused SiLU and pre-add), layer_norm, geglu, geglu_linear
(GEGLU with its projection as one GEMM), bias_residual. Tensors in, tensors out:
sd_backend.fast.modules swaps them into diffusers' modules.

An op's module (and OpenAI Triton) is imported when the op is first used, not with this
package. (The folder was `kernels/`, which from a checkout's root shadowed Hugging Face's
kernel-hub package of that name: transformers 5.25 installs it and imports from it.)
"""

import importlib
import sys
import types

_MODULES = ("bias_residual", "flash_attention", "geglu", "geglu_linear", "group_norm", "layer_norm")
__all__ = sorted(_MODULES + tuple(f"{m}_reference" for m in _MODULES))


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # importing `.group_norm` binds the module to that name: bind the op of the same name
        if name in _MODULES and isinstance(value, types.ModuleType):
            super().__setattr__(f"{name}_reference", getattr(value, f"{name}_reference"))
            value = getattr(value, name)
        super().__setattr__(name, value)


def __getattr__(name):
    module = name.removesuffix("_reference")
    if module not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(f".{module}", __name__)  # binds the op and its reference (_Package)
    return globals()[name]


sys.modules[__name__].__class__ = _Package
