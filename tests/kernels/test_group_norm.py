"""group_norm (+ fused SiLU) against F.group_norm in fp32: SD UNet/VAE shapes on CUDA, small ones on the interpreter."""

import pytest
import torch

pytest.importorskip("triton")

from sd_kernels.group_norm import group_norm, group_norm_reference  # noqa: E402
from tests.kernels.utils import DEVICE, FLOAT_DTYPES, ON_CUDA, assert_close  # noqa: E402

# (atol, rtol) against fp32 math on the same (rounded) input: the output's own rounding
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}

if ON_CUDA:
    # (N, C, H, W, groups): the UNet's 32 groups at C=320/640/1280, H=W=64/32/16/8, batch 2
    SHAPES = [(2, c, hw, hw, 32) for c in (320, 640, 1280) for hw in (64, 32, 16, 8)]
    SHAPES += [
        (2, 1920, 16, 16, 32),  # UNet up blocks (skip concatenation)
        (2, 2560, 8, 8, 32),
        (1, 512, 64, 64, 32),  # VAE decoder
        (1, 256, 256, 256, 32),
        (1, 128, 512, 512, 32),
        (3, 96, 17, 23, 32),  # odd spatial size
        (2, 64, 9, 9, 1),  # one group
    ]
else:
    # single-tile path, split path (C/G = 8 and 33x33 > one tile), odd sizes
    SHAPES = [(2, 64, 8, 8, 32), (1, 64, 33, 33, 8), (2, 64, 5, 7, 32)]


def _inputs(n, c, spatial, dtype, affine=True, offset=1.0, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = (torch.randn(n, c, *spatial, generator=g, device=DEVICE) * 3 + offset).to(dtype)
    if not affine:
        return x, None, None
    w = torch.randn(c, generator=g, device=DEVICE).to(dtype)
    b = torch.randn(c, generator=g, device=DEVICE).to(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("n,c,h,w,groups", SHAPES)
def test_group_norm_matches_reference(n, c, h, w, groups, channels_last, activation, dtype):
    x, weight, bias = _inputs(n, c, (h, w), dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = group_norm(x, groups, weight, bias, 1e-5, activation=activation)
    assert out.dtype == dtype and out.shape == x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"output strides {out.stride()} lost the input's memory format"
    atol, rtol = TOLERANCES[dtype]
    expected = group_norm_reference(x, groups, weight, bias, 1e-5, activation)
    assert_close(out, expected, atol, rtol, f"group_norm {tuple(x.shape)} G={groups} {activation}")


if ON_CUDA:
    # the ResNet norm2 inputs of the UNet (conv1 output + bias + time embedding), single-tile and split
    PRE_ADD_SHAPES = [(2, c, hw, hw, 32) for c, hw in ((320, 64), (640, 32), (1280, 16), (1280, 8))]
    PRE_ADD_SHAPES += [(16, 320, 64, 64, 32), (3, 96, 17, 23, 32)]
else:
    PRE_ADD_SHAPES = [(2, 64, 8, 8, 32), (1, 64, 33, 33, 8), (2, 64, 5, 7, 32)]


@pytest.mark.parametrize("pre_add_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("n,c,h,w,groups", PRE_ADD_SHAPES)
def test_group_norm_pre_add(n, c, h, w, groups, channels_last, dtype, pre_add_dtype):
    """group_norm(x, pre_add=p) == group_norm(x + p[:, :, None, None]), p added in fp32 before the statistics."""
    x, weight, bias = _inputs(n, c, (h, w), dtype, seed=5)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    g = torch.Generator(device=DEVICE).manual_seed(6)
    # large enough to move each channel's mean well away from the others
    pre_add = (torch.randn(n, c, generator=g, device=DEVICE) * 4).to(pre_add_dtype)
    out = group_norm(x, groups, weight, bias, 1e-5, activation="silu", pre_add=pre_add)
    assert out.dtype == dtype and out.shape == x.shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"output strides {out.stride()} lost the input's memory format"
    atol, rtol = TOLERANCES[dtype]
    expected = group_norm_reference(x, groups, weight, bias, 1e-5, "silu", pre_add=pre_add)
    assert_close(out, expected, atol, rtol, f"group_norm pre_add {tuple(x.shape)} G={groups}")


@pytest.mark.parametrize("spatial", [(8, 8), (33, 33)], ids=["single_tile", "split"])
def test_group_norm_pre_add_broadcast_view(spatial):
    """A stride-0 (N, C) pre_add (one time embedding expanded over the batch) is read through its strides."""
    x, weight, bias = _inputs(3, 64, spatial, torch.float32, seed=7)
    row = torch.randn(1, 64, device=DEVICE) + 2.0
    pre_add = row.expand(3, 64)
    out = group_norm(x, 8, weight, bias, 1e-5, pre_add=pre_add)
    expected = group_norm_reference(x + row[:, :, None, None], 8, weight, bias, 1e-5)
    assert_close(out, expected, 1e-4, 1e-4, "group_norm pre_add expanded")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["ncl", "vae_attention_view"])
def test_group_norm_3d(transposed, dtype):
    """(N, C, L) inputs, including the (N, L, C).transpose(1, 2) view that diffusers' VAE attention normalizes."""
    n, c, length = (1, 512, 4096) if ON_CUDA else (2, 64, 50)
    x, weight, bias = _inputs(n, c, (length,), dtype, seed=1)
    if transposed:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
        assert x.stride(1) == 1
    out = group_norm(x, 32, weight, bias, 1e-6)
    # a size-1 dimension has no meaningful stride
    assert [st for st, n in zip(out.stride(), out.shape) if n > 1] == [st for st, n in zip(x.stride(), x.shape) if n > 1]
    atol, rtol = TOLERANCES[dtype]
    assert_close(out, group_norm_reference(x, 32, weight, bias, 1e-6), atol, rtol, "group_norm 3d")


@pytest.mark.parametrize("spatial", [(8, 8), (33, 33)], ids=["single_tile", "split"])
def test_group_norm_large_mean(spatial):
    """Two-pass / Chan statistics stay exact where E[x^2] - E[x]^2 would cancel."""
    x, weight, bias = _inputs(1, 64, spatial, torch.float32, offset=1e4, seed=2)
    out = group_norm(x, 8, weight, bias, 1e-5)
    assert_close(out, group_norm_reference(x, 8, weight, bias, 1e-5), 2e-3, 2e-3, "group_norm mean 1e4")


def test_group_norm_no_affine():
    x, _, _ = _inputs(2, 64, (6, 6), torch.float32, affine=False, seed=3)
    out = group_norm(x, 16, None, None, 1e-5, activation="silu")
    assert_close(out, group_norm_reference(x, 16, None, None, 1e-5, "silu"), 1e-4, 1e-4, "group_norm no affine")


def test_group_norm_strided_input():
    """A view whose spatial dims cannot be merged is copied first, and the answer is unchanged."""
    x, weight, bias = _inputs(1, 64, (10, 12), torch.float32, seed=4)
    x = x[:, :, :, ::2]
    out = group_norm(x, 32, weight, bias, 1e-5)
    assert_close(out, group_norm_reference(x, 32, weight, bias, 1e-5), 1e-4, 1e-4, "group_norm strided")


# the split path's shapes (groups larger than one tile): SD's CFG batch 16 on CUDA
LOOPED_SHAPES = [(16, 320, 64, 64, 32), (16, 640, 32, 32, 32), (16, 960, 64, 64, 32), (4, 512, 128, 128, 32)] if ON_CUDA else [
    (1, 64, 33, 33, 8), (3, 32, 40, 40, 4)]


@pytest.mark.parametrize("pre_add", [False, True], ids=["plain", "pre_add"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("n,c,h,w,groups", LOOPED_SHAPES)
def test_looped_schedule_equals_the_split_path_to_the_bit(n, c, h, w, groups, channels_last, activation, pre_add):
    import triton

    from sd_kernels.group_norm import _MAX_SINGLE_TILE

    assert triton.next_power_of_2(c // groups) * triton.next_power_of_2(h * w) > _MAX_SINGLE_TILE  # not one tile
    x, weight, bias = _inputs(n, c, (h, w), torch.float16, seed=7)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    add = torch.randn(n, c, device=DEVICE) if pre_add else None
    split = group_norm(x, groups, weight, bias, 1e-5, activation=activation, pre_add=add, schedule="split")
    looped = group_norm(x, groups, weight, bias, 1e-5, activation=activation, pre_add=add, schedule="looped")
    assert looped.stride() == split.stride()
    assert torch.equal(looped, split)
    expected = group_norm_reference(x, groups, weight, bias, 1e-5, activation, pre_add=add)
    assert_close(looped, expected, *TOLERANCES[torch.float16], "group_norm looped")


def test_auto_schedule_is_one_of_the_two():
    x, weight, bias = _inputs(2, 64, (33, 33), torch.float32, seed=8)
    auto = group_norm(x, 8, weight, bias, 1e-5, schedule="auto")
    assert torch.equal(auto, group_norm(x, 8, weight, bias, 1e-5, schedule="split"))


@pytest.mark.parametrize(
    "case,match",
    [
        ("activation", "activation"),
        ("groups", "num_groups"),
        ("weight_shape", "weight"),
        ("float64", "x.dtype"),
        ("1d", "x.shape"),
        ("pre_add_shape", "pre_add"),
        ("pre_add_int", "pre_add.dtype"),
        ("schedule", "schedule"),
    ],
)
def test_group_norm_rejects(case, match):
    x, weight, bias = _inputs(1, 64, (4, 4), torch.float32)
    groups, activation = 32, None
    if case == "activation":
        activation = "gelu"
    elif case == "groups":
        groups = 7
    elif case == "weight_shape":
        weight = weight[:32]
    elif case == "float64":
        x = x.double()
    elif case == "1d":
        x = x.flatten()
    pre_add = None
    if case == "pre_add_shape":
        pre_add = torch.zeros(1, 32, device=DEVICE)
    elif case == "pre_add_int":
        pre_add = torch.zeros(1, 64, device=DEVICE, dtype=torch.int32)
    schedule = "ring" if case == "schedule" else "split"
    with pytest.raises(ValueError, match=match):
        group_norm(x, groups, weight, bias, 1e-5, activation=activation, pre_add=pre_add, schedule=schedule)
