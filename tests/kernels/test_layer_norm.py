"""layer_norm against F.layer_norm in fp32: SD transformer and CLIP widths on CUDA, small ones on the interpreter."""

import pytest
import torch

pytest.importorskip("triton")

from sd_kernels.layer_norm import layer_norm, layer_norm_reference  # noqa: E402
from tests.kernels.utils import DEVICE, FLOAT_DTYPES, ON_CUDA, assert_close  # noqa: E402

TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}

if ON_CUDA:
    # (shape): UNet transformer blocks at batch 2, CLIP ViT-L and OpenCLIP-H text encoders, odd sizes
    SHAPES = [(2, 4096, 320), (2, 1024, 640), (2, 256, 1280), (2, 64, 1280), (2, 77, 768), (2, 77, 1024), (3, 5, 1000)]
else:
    SHAPES = [(2, 37, 320), (77, 64), (3, 5, 100)]


def _inputs(shape, dtype, affine=True, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = (torch.randn(*shape, generator=g, device=DEVICE) * 2 + 0.5).to(dtype)
    d = shape[-1]
    if not affine:
        return x, None, None
    return x, torch.randn(d, generator=g, device=DEVICE).to(dtype), torch.randn(d, generator=g, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_reference(shape, dtype):
    x, weight, bias = _inputs(shape, dtype)
    out = layer_norm(x, weight, bias, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    atol, rtol = TOLERANCES[dtype]
    assert_close(out, layer_norm_reference(x, weight, bias, 1e-5), atol, rtol, f"layer_norm {shape}")


def test_layer_norm_no_affine_strided_rows():
    x, _, _ = _inputs((4, 10, 96), torch.float32, affine=False, seed=1)
    x = x[:, ::3]  # row stride 3 * 96
    out = layer_norm(x, None, None, 1e-6)
    assert_close(out, layer_norm_reference(x, None, None, 1e-6), 1e-4, 1e-4, "layer_norm strided")


def test_layer_norm_large_mean():
    x, weight, bias = _inputs((8, 320), torch.float32, seed=2)
    x = x + 1e4
    assert_close(layer_norm(x, weight, bias), layer_norm_reference(x, weight, bias), 2e-3, 2e-3, "layer_norm mean 1e4")


@pytest.mark.parametrize("case,match", [("float64", "x.dtype"), ("weight_shape", "weight"), ("too_wide", "x.shape")])
def test_layer_norm_rejects(case, match):
    x, weight, bias = _inputs((2, 64), torch.float32)
    if case == "float64":
        x = x.double()
    elif case == "weight_shape":
        weight = weight[:10]
    elif case == "too_wide":
        x, weight, bias = torch.zeros(1, 10000, device=DEVICE), None, None
    with pytest.raises(ValueError, match=match):
        layer_norm(x, weight, bias)
