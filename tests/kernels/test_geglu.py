"""geglu against diffusers' chunk + exact GELU + multiply in fp32."""

import pytest
import torch

pytest.importorskip("triton")

from sd_kernels.geglu import geglu, geglu_reference  # noqa: E402
from tests.kernels.utils import DEVICE, FLOAT_DTYPES, ON_CUDA, assert_close  # noqa: E402

TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}

if ON_CUDA:
    # (batch, seq, 2F): the UNet feed-forward at batch 2, F = 4 * channels; odd sizes
    SHAPES = [(2, 4096, 2 * 1280), (2, 1024, 2 * 2560), (2, 256, 2 * 5120), (2, 64, 2 * 5120), (3, 77, 2 * 999)]
else:
    SHAPES = [(2, 37, 2 * 320), (1, 16, 2 * 1280), (3, 5, 2 * 100)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_geglu_matches_reference(shape, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = (torch.randn(*shape, generator=g, device=DEVICE) * 2).to(dtype)
    out = geglu(x)
    assert out.dtype == dtype and out.shape == (*shape[:-1], shape[-1] // 2) and out.is_contiguous()
    atol, rtol = TOLERANCES[dtype]
    assert_close(out, geglu_reference(x), atol, rtol, f"geglu {shape}")


def test_geglu_matches_diffusers_math_on_strided_rows():
    x = torch.randn(4, 12, 2 * 96, device=DEVICE)[:, ::2]
    a, gate = x.chunk(2, dim=-1)
    assert_close(geglu(x), a * torch.nn.functional.gelu(gate), 1e-5, 1e-5, "geglu strided")


@pytest.mark.parametrize("case,match", [("odd", "even"), ("float64", "x.dtype")])
def test_geglu_rejects(case, match):
    dtype = torch.float64 if case == "float64" else torch.float32
    x = torch.zeros(2, 7 if case == "odd" else 8, device=DEVICE, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        geglu(x)
