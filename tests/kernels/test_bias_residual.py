"""bias_residual against the fp32 sum and division: SD UNet shapes on CUDA, small ones on the interpreter."""

import pytest
import torch

pytest.importorskip("triton")

from sd_kernels.bias_residual import bias_residual, bias_residual_reference  # noqa: E402
from tests.kernels.utils import DEVICE, FLOAT_DTYPES, ON_CUDA, assert_close  # noqa: E402

# (atol, rtol) against fp32 math on the same (rounded) inputs: the output's own rounding
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}

if ON_CUDA:
    # (N, C, H, W): the UNet's ResNet outputs at C=320/640/1280, H=W=64/32/16/8, batch 2 and 16
    SHAPES = [(n, c, hw, hw) for n in (2, 16) for c in (320, 640, 1280) for hw in (64, 32, 16, 8)]
    SHAPES += [(3, 96, 17, 23), (1, 512, 64, 64)]  # odd spatial size, VAE decoder
    DTYPES = [torch.float16]
else:
    # odd C, odd spatial sizes, more than one program, H * W = 1
    SHAPES = [(2, 32, 8, 8), (2, 5, 7, 9), (3, 33, 13, 11), (2, 7, 1, 1)]
    DTYPES = FLOAT_DTYPES


def _inputs(shape, dtype, channels_last, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    c = shape[1]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(*shape, generator=g, device=DEVICE) * 2).to(dtype).contiguous(memory_format=fmt)
    residual = (torch.randn(*shape, generator=g, device=DEVICE) * 2).to(dtype).contiguous(memory_format=fmt)
    bias = torch.randn(c, generator=g, device=DEVICE).to(dtype)
    residual_bias = torch.randn(c, generator=g, device=DEVICE).to(dtype)
    return x, bias, residual, residual_bias


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_residual_matches_reference(shape, channels_last, dtype):
    x, bias, residual, residual_bias = _inputs(shape, dtype, channels_last)
    out = bias_residual(x, bias, residual=residual, residual_bias=residual_bias, scale=1.0)
    assert out.dtype == dtype and out.shape == x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"output strides {out.stride()} lost the input's memory format"
    atol, rtol = TOLERANCES[dtype]
    expected = bias_residual_reference(x, bias, residual, residual_bias, 1.0)
    assert_close(out, expected, atol, rtol, f"bias_residual {shape} {'cl' if channels_last else 'nchw'}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize(
    "terms", ["bias", "residual", "residual_bias", "bias+residual", "none"], ids=str
)
def test_bias_residual_optional_terms(terms, channels_last):
    """Any of bias, residual, residual_bias may be None; scale divides the sum."""
    dtype = torch.float16 if ON_CUDA else torch.float32
    shape = (2, 640, 16, 16) if ON_CUDA else (2, 5, 7, 9)
    x, bias, residual, residual_bias = _inputs(shape, dtype, channels_last, seed=1)
    parts = terms.split("+")
    kwargs = dict(
        bias=bias if "bias" in parts else None,
        residual=residual if "residual" in parts else None,
        residual_bias=residual_bias if "residual_bias" in parts else None,
        scale=1.4142135,
    )
    out = bias_residual(x, **kwargs)
    atol, rtol = TOLERANCES[dtype]
    assert_close(out, bias_residual_reference(x, **kwargs), atol, rtol, f"bias_residual {terms}")


def test_bias_residual_mixed_dtypes():
    """A float32 residual and float32 biases with a lower-precision x: read as fp32, written in x's dtype."""
    x, bias, residual, residual_bias = _inputs((2, 33, 5, 7), torch.float32, True, seed=2)
    x16 = x.to(torch.float16)
    out = bias_residual(x16, bias, residual=residual, residual_bias=residual_bias, scale=2.0)
    assert out.dtype == torch.float16
    expected = bias_residual_reference(x16, bias, residual, residual_bias, 2.0)
    assert_close(out, expected, *TOLERANCES[torch.float16], "bias_residual mixed dtypes")


@pytest.mark.parametrize(
    "case,match",
    [
        ("mixed_format", "residual.stride"),
        ("strided_x", "x.stride"),
        ("residual_shape", "residual"),
        ("bias_shape", "bias"),
        ("3d", "x.shape"),
        ("float64", "x.dtype"),
        ("scale", "scale"),
    ],
)
def test_bias_residual_rejects(case, match):
    x, bias, residual, residual_bias = _inputs((2, 8, 4, 6), torch.float32, False)
    scale = 1.0
    if case == "mixed_format":
        residual = residual.to(memory_format=torch.channels_last)
    elif case == "strided_x":
        x = torch.randn(2, 8, 4, 12, device=DEVICE)[..., ::2]
    elif case == "residual_shape":
        residual = residual[:1]
    elif case == "bias_shape":
        bias = bias[:4]
    elif case == "3d":
        x = x.flatten(2)
    elif case == "float64":
        x = x.double()
    elif case == "scale":
        scale = 0.0
    with pytest.raises(ValueError, match=match):
        bias_residual(x, bias, residual=residual, residual_bias=residual_bias, scale=scale)
