"""The input checks every op's launcher repeats, with one wording for their errors.

Each check raises ValueError("<op>: <what> is <value>; allowed: <what is allowed>").
"""

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _probe():
    pass


# Under TRITON_INTERPRET=1 (read by triton when a kernel is defined) @triton.jit gives an
# InterpretedFunction, which runs on CPU tensors: the CPU tests use that.
INTERPRET = isinstance(_probe, InterpretedFunction)


def check_tensor(op, name, t, dtypes=FLOAT_DTYPES, device=None):
    """t is a tensor of one of `dtypes` on a kernel device (and on `device`, when given)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{op}: {name}.dtype is {t.dtype}; allowed: {', '.join(map(str, dtypes))}")
    check_device(op, name, t, device)


def check_device(op, name, t, device=None):
    """t is on a CUDA device (or the CPU under the interpreter), and on `device` when given."""
    if not (t.is_cuda or (INTERPRET and t.device.type == "cpu")):
        raise ValueError(
            f"{op}: {name}.device is {t.device}; allowed: a CUDA device "
            f"(or cpu with TRITON_INTERPRET=1 set before importing the kernels)"
        )
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name}.device is {t.device}; allowed: x's device {device}")


def check_channel_vector(op, name, t, channels, device):
    """t is None or a floating (channels,) tensor on `device` (a norm's weight, a bias)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.shape != (channels,):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} is {shape}; allowed: None or a tensor of shape ({channels},)")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{op}: {name}.dtype is {t.dtype}; allowed: a floating dtype")
    check_device(op, name, t, device)


def contiguous_or_none(t):
    """t made contiguous (a no-op when it is), or None."""
    return None if t is None else t.contiguous()
