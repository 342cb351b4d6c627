"""geglu_linear against diffusers' GEGLU (Linear, chunk, exact GELU, multiply) in float64.

The tolerance is each element's own error bound: the fp32 accumulation of K products
(gamma_K of float32 times the sum of |x||w|, through the gate's slope of at most 1.13),
float32's rounding in the epilogue, and the output's rounding to its dtype.
"""

import pytest
import torch

pytest.importorskip("triton")

from sd_kernels.geglu_linear import geglu_linear, geglu_linear_reference  # noqa: E402
# ATTN_DTYPES: the interpreter's tl.dot multiplies bfloat16 as integers, so bf16 on CUDA only
from tests.kernels.utils import ATTN_DTYPES, DEVICE, ON_CUDA, rounding_bound  # noqa: E402

if ON_CUDA:
    # (batch, seq, K, F): the UNet feed-forward at batch 2 and 16 (F = 4 K), an odd one
    SHAPES = [(2, 4096, 320, 1280), (2, 1024, 640, 2560), (2, 256, 1280, 5120), (2, 64, 1280, 5120)]
    SHAPES += [(16, 4096, 320, 1280), (16, 64, 1280, 5120), (3, 77, 100, 999)]
else:
    # several tiles in M and N with tails, K a multiple of the interpreter's BLOCK_K and not
    SHAPES = [(2, 37, 48, 40), (1, 19, 40, 24), (3, 5, 7, 9)]

_GELU_SLOPE = 1.13  # max |d gelu(g) / dg|, at g = sqrt(2)


def _inputs(b, s, k, f, dtype, bias=True, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(b, s, k, generator=g, device=DEVICE).to(dtype)
    w = (torch.randn(2 * f, k, generator=g, device=DEVICE) / k**0.5).to(dtype)
    bvec = torch.randn(2 * f, generator=g, device=DEVICE).to(dtype) if bias else None
    return x, w, bvec


def _assert_within_bound(out, x, w, bias):
    """|out - exact| within the arithmetic's bound, element by element (module docstring)."""
    k, f = x.shape[-1], w.shape[0] // 2
    xd, wd = x.double(), w.double()  # on x's device: the batch-16 shapes' float64 GEMMs on the GPU
    bd = None if bias is None else bias.double()
    exact = geglu_linear_reference(xd, wd, bd).double()
    h = torch.nn.functional.linear(xd, wd, bd)
    a, gate = h.chunk(2, dim=-1)
    mags = torch.nn.functional.linear(xd.abs(), wd.abs(), None if bd is None else bd.abs())  # sum |x||w| (+|b|)
    mag_a, mag_g = mags.chunk(2, dim=-1)
    acc = 2 * rounding_bound(torch.float32, k + 1)  # two orders of summation, the bias one more term
    u32, u_out = torch.finfo(torch.float32).eps, torch.finfo(out.dtype).eps / 2
    gelu = torch.nn.functional.gelu(gate)
    bound = (
        acc * (mag_a * gelu.abs() + a.abs() * _GELU_SLOPE * mag_g)
        + 8 * u32 * (a.abs() * (gate.abs() + 1))  # erf, multiplies and adds of the epilogue in fp32
        + u_out * exact.abs()
        + torch.finfo(out.dtype).tiny
    )
    err = (out.double() - exact).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"geglu_linear {tuple(x.shape)} K={k} F={f}: {int((err > bound).sum())} of {err.numel()} outside the bound; "
        f"worst {err.flatten()[worst]:.3g} against {bound.flatten()[worst]:.3g} (exact {exact.flatten()[worst]:.4g})"
    )


@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_geglu_linear_matches_diffusers_math(shape, dtype):
    x, w, bias = _inputs(*shape, dtype)
    out = geglu_linear(x, w, bias)
    assert out.dtype == dtype and out.shape == (*shape[:2], shape[3]) and out.is_contiguous()
    _assert_within_bound(out, x, w, bias)


def test_geglu_linear_without_bias_and_on_strided_rows():
    x, w, _ = _inputs(4, 12, 32, 24, torch.float32)
    x = x[:, ::2]  # rows two apart
    _assert_within_bound(geglu_linear(x, w), x, w, None)


def test_geglu_linear_is_diffusers_geglu_module():
    from diffusers.models.activations import GEGLU

    torch.manual_seed(0)
    module = GEGLU(48, 40).to(DEVICE)
    x = torch.randn(2, 21, 48, device=DEVICE)
    with torch.no_grad():
        expected = module(x)
        out = geglu_linear(x, module.proj.weight, module.proj.bias)
    _assert_within_bound(out, x, module.proj.weight, module.proj.bias)
    # the module in fp32 rounds a and g once more than the kernel: within a few fp32 ulps
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, w, b: (x, w[:, :-1], b), r"weight is \(80, 47\); allowed: \(2F, 48\)"),
        (lambda x, w, b: (x, w[:-1], b[:-1]), r"weight is \(79, 48\)"),
        (lambda x, w, b: (x, w.half(), b), r"weight.dtype is torch.float16; allowed: torch.float32"),
        (lambda x, w, b: (x, w, b[:-2]), r"bias is \(78,\); allowed: None or a tensor of shape \(80,\)"),
        (lambda x, w, b: (x.double(), w, b), r"x.dtype is torch.float64"),
    ],
)
def test_geglu_linear_rejects_bad_arguments_naming_them(make, match):
    x, w, b = _inputs(1, 4, 48, 40, torch.float32)
    with pytest.raises(ValueError, match=match):
        geglu_linear(*make(x, w, b))


def test_geglu_linear_empty_rows():
    x, w, b = _inputs(0, 3, 16, 8, torch.float32)
    assert geglu_linear(x, w, b).shape == (0, 3, 8)
