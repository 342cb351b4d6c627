"""flash_attention against fp32 torch attention: SD shapes on CUDA, small masked shapes on the CPU interpreter."""

import pytest
import torch

triton = pytest.importorskip("triton")

from sd_kernels.flash_attention import (  # noqa: E402
    _attn_fwd_kernel,
    _head_dim_blocks,
    _prune_configs,
    flash_attention,
    flash_attention_reference,
)
from tests.kernels.utils import ATTN_DTYPES, DEVICE, ON_CUDA, assert_close  # noqa: E402

# (atol, rtol) against the fp32 reference; fp16/bf16 error is dominated by rounding p to
# the input dtype before p @ v and by rounding the output
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

if ON_CUDA:
    # SD 1.x: heads 8, head_dim 40/80/160/160 at seq 4096/1024/256/64; SD 2.x: head_dim 64
    SELF_SHAPES = [(40, 4096), (80, 1024), (160, 256), (160, 64), (64, 4096), (64, 1024), (64, 256), (64, 64)]
    # (batch, heads, head_dim, q_len, kv_len): self-attention, then the 77-token cross-attention
    SHAPES = [(2, 8, d, n, n) for d, n in SELF_SHAPES] + [(2, 8, d, n, 77) for d, n in SELF_SHAPES]
    ODD_SHAPES = [
        (1, 3, 40, 1000, 1000),
        (2, 5, 80, 333, 77),
        (1, 2, 160, 129, 65),
        (1, 1, 8, 17, 1),
        (2, 3, 20, 100, 50),  # head_dim 20: unaligned rows
    ]
else:
    SHAPES = [
        (1, 2, d, q, kv)
        for d in (40, 64, 80)
        for q, kv in ((64, 64), (37, 77), (64, 77), (37, 37))
    ]
    ODD_SHAPES = [(1, 1, 160, 20, 45), (2, 1, 8, 17, 1), (1, 1, 16, 3, 100), (2, 2, 20, 9, 13)]


def _inputs(batch, heads, head_dim, q_len, kv_len, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=g, device=DEVICE).to(dtype)
    k = torch.randn(batch, heads, kv_len, head_dim, generator=g, device=DEVICE).to(dtype)
    v = torch.randn(batch, heads, kv_len, head_dim, generator=g, device=DEVICE).to(dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,head_dim,q_len,kv_len", SHAPES + ODD_SHAPES)
def test_flash_attention_matches_reference(batch, heads, head_dim, q_len, kv_len, dtype):
    q, k, v = _inputs(batch, heads, head_dim, q_len, kv_len, dtype)
    out = flash_attention(q, k, v)
    assert out.dtype == dtype and out.is_contiguous()
    atol, rtol = TOLERANCES[dtype]
    assert_close(out, flash_attention_reference(q, k, v), atol, rtol, f"flash_attention {tuple(q.shape)} kv {kv_len}")


@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
def test_flash_attention_diffusers_views(dtype):
    """q/k/v as diffusers makes them: (batch, seq, heads * head_dim) viewed to (batch, heads, seq, head_dim)."""
    batch, heads, head_dim, q_len, kv_len = (2, 8, 40, 1024, 77) if ON_CUDA else (1, 2, 40, 37, 77)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    hidden = torch.randn(batch, q_len, 3 * heads * head_dim, generator=g, device=DEVICE).to(dtype)
    context = torch.randn(batch, kv_len, 2 * heads * head_dim, generator=g, device=DEVICE).to(dtype)
    q = hidden[..., : heads * head_dim].view(batch, q_len, heads, head_dim).transpose(1, 2)
    k, v = (t.reshape(batch, kv_len, heads, head_dim).transpose(1, 2) for t in context.chunk(2, dim=-1))
    assert not q.is_contiguous() and not k.is_contiguous()
    out = flash_attention(q, k, v)
    atol, rtol = TOLERANCES[dtype]
    assert_close(out, flash_attention_reference(q, k, v), atol, rtol, "flash_attention views")
    # written into the (batch, q_len, heads, head_dim) layout the output projection reads
    rows = torch.full((batch, q_len, heads, head_dim), float("nan"), device=DEVICE, dtype=dtype)
    returned = flash_attention(q, k, v, out=rows.transpose(1, 2))
    assert returned.data_ptr() == rows.data_ptr()
    assert torch.equal(rows.transpose(1, 2), out)


@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
def test_flash_attention_unaligned(dtype):
    """Tensors that start off a 16-byte boundary take the kernel's unaligned path (ALIGN=1)."""
    batch, heads, head_dim, q_len, kv_len = (2, 8, 40, 256, 77) if ON_CUDA else (1, 2, 40, 20, 77)
    g = torch.Generator(device=DEVICE).manual_seed(4)
    nq, nkv = batch * heads * q_len * head_dim, batch * heads * kv_len * head_dim
    flat = torch.randn(nq + 2 * nkv + 1, generator=g, device=DEVICE).to(dtype)[1:]  # 1 element off alignment
    q = flat[:nq].view(batch, heads, q_len, head_dim)
    k = flat[nq : nq + nkv].view(batch, heads, kv_len, head_dim)
    v = flat[nq + nkv :].view(batch, heads, kv_len, head_dim)
    assert q.data_ptr() % 16 != 0
    atol, rtol = TOLERANCES[dtype]
    assert_close(flash_attention(q, k, v), flash_attention_reference(q, k, v), atol, rtol, "flash_attention unaligned")


def test_flash_attention_scale():
    dtype = ATTN_DTYPES[0]
    q, k, v = _inputs(1, 2, 64, 37, 77, dtype, seed=2)
    atol, rtol = TOLERANCES[dtype]
    expected = flash_attention_reference(q, k, v, scale=0.3)
    assert_close(flash_attention(q, k, v, scale=0.3), expected, atol, rtol, "scale")


def test_flash_attention_fp32():
    """fp32 works everywhere (exact "ieee" products, so it matches torch's fp32 math), slowly on the GPU."""
    q, k, v = _inputs(1, 2, 40, 100 if ON_CUDA else 37, 77, torch.float32, seed=5)
    atol, rtol = TOLERANCES[torch.float32]
    assert_close(flash_attention(q, k, v), flash_attention_reference(q, k, v), atol, rtol, "flash_attention fp32")


def test_flash_attention_matches_sdpa():
    """Same answer as the op it replaces, in the same dtype."""
    dtype = ATTN_DTYPES[0]
    q, k, v = _inputs(2, 2, 80, 64, 77, dtype, seed=3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    atol, rtol = TOLERANCES[dtype]
    assert_close(flash_attention(q, k, v), expected, 2 * atol, 2 * rtol, "vs sdpa")


@pytest.mark.parametrize(
    "head_dim,blocks",
    [
        (80, (64, 16)),  # SD 1.x: 80 columns instead of 128
        (160, (128, 32)),  # and 160 instead of 256
        (96, (64, 32)),
        (48, (32, 16)),
        (136, (256, 0)),  # 128 + 8: no exact split
        (40, (64, 0)),  # 32 + 8: padded in one block (measured faster than 32 + 16)
        (64, (64, 0)),
        (72, (128, 0)),
        (8, (16, 0)),  # below tl.dot's K of 16: one masked block
        (1, (16, 0)),
        (16, (16, 0)),
        (256, (256, 0)),
        (24, (32, 0)),  # 16 + 8
        (200, (256, 0)),
    ],
)
def test_head_dim_blocks(head_dim, blocks):
    assert _head_dim_blocks(head_dim) == blocks
    assert _head_dim_blocks(head_dim, split=False) == (max(16, 1 << (head_dim - 1).bit_length()), 0)


def test_head_dim_blocks_cover_every_head_dim():
    for head_dim in range(1, 257):
        padded = max(16, 1 << (head_dim - 1).bit_length())
        d_a, d_b = _head_dim_blocks(head_dim)
        assert d_a >= 16 and d_a & (d_a - 1) == 0, head_dim
        assert d_b == 0 or (d_b >= 16 and d_b & (d_b - 1) == 0), head_dim
        assert head_dim <= d_a + d_b <= padded, head_dim
        # the second block starts inside head_dim: it is never all padding
        assert d_b == 0 or d_a < head_dim, head_dim


def test_prune_configs_counts_the_split_width():
    """Shared memory and registers are estimated for D_A + D_B columns, not the padded power of two."""
    wide = triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2)
    small = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    args = {"Q": torch.empty(1, dtype=torch.float16), "q_len": 256, "kv_len": 256}
    # head_dim 160: 128 + 32 columns fit 8 warps at BLOCK_M 128; 256 padded ones would spill
    assert _prune_configs([wide, small], args, D_A=128, D_B=32) == [wide, small]
    assert _prune_configs([wide, small], args, D_A=256, D_B=0) == [small]


@pytest.fixture
def launched(monkeypatch):
    """The (D_A, D_B) of each kernel launch, so that a test knows which layout ran."""
    blocks = []
    run = _attn_fwd_kernel.run

    def spy(*args, **kwargs):
        blocks.append((kwargs["D_A"], kwargs["D_B"]))
        return run(*args, **kwargs)

    monkeypatch.setattr(_attn_fwd_kernel, "run", spy)
    return blocks


# head_dims split in two blocks (80, 96, 160), padded in one block (8, 24, 40, 72) and one exact block (64)
SPLIT_HEAD_DIMS = [8, 24, 40, 64, 72, 80, 96, 160]


@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
@pytest.mark.parametrize("split", [True, False], ids=["split", "padded"])
@pytest.mark.parametrize("head_dim", SPLIT_HEAD_DIMS)
def test_flash_attention_split_head_dim(head_dim, split, dtype, launched):
    """Both head_dim layouts, over query blocks with a partial last one and a masked key tail."""
    q, k, v = _inputs(2, 2, head_dim, 40, 37, dtype, seed=6)
    out = flash_attention(q, k, v, split_head_dim=split)
    assert launched == [_head_dim_blocks(head_dim, split=split)]
    atol, rtol = TOLERANCES[dtype]
    assert_close(out, flash_attention_reference(q, k, v), atol, rtol, f"split {split} head_dim {head_dim}")


@pytest.mark.parametrize("split", [True, False], ids=["split", "padded"])
@pytest.mark.parametrize("head_dim", [80, 96])
def test_flash_attention_split_out_view(head_dim, split, launched):
    """out= a transposed view: every column of both blocks lands where the output projection reads it."""
    dtype = ATTN_DTYPES[0]
    batch, heads, q_len, kv_len = 2, 2, 40, 37
    q, k, v = _inputs(batch, heads, head_dim, q_len, kv_len, dtype, seed=7)
    # NaN wherever the kernel writes nothing
    rows = torch.full((batch, q_len, heads, head_dim), float("nan"), device=DEVICE, dtype=dtype)
    returned = flash_attention(q, k, v, out=rows.transpose(1, 2), split_head_dim=split)
    assert returned.data_ptr() == rows.data_ptr()
    assert launched == [_head_dim_blocks(head_dim, split=split)]
    atol, rtol = TOLERANCES[dtype]
    assert_close(rows.transpose(1, 2), flash_attention_reference(q, k, v), atol, rtol, f"out view split {split}")


@pytest.mark.parametrize("split", [True, False], ids=["split", "padded"])
@pytest.mark.parametrize("head_dim", [8, 40, 80])
def test_flash_attention_reads_no_column_past_head_dim(head_dim, split):
    """q, k, v as head_dim-wide slices of rows whose other columns hold NaN: every padding column is masked."""
    dtype = ATTN_DTYPES[0]
    q, k, v = _inputs(1, 2, head_dim, 40, 37, dtype, seed=8)
    wide = []
    for t in (q, k, v):
        # 16 NaN columns after each row, past even the last block's padding
        buf = torch.full((*t.shape[:3], head_dim + 16), float("nan"), device=DEVICE, dtype=dtype)
        buf[..., :head_dim] = t
        wide.append(buf[..., :head_dim])
    atol, rtol = TOLERANCES[dtype]
    got = flash_attention(*wide, split_head_dim=split)
    assert_close(got, flash_attention_reference(q, k, v), atol, rtol, "NaN past head_dim")


@pytest.mark.parametrize(
    "case,match",
    [
        ("float64", "q.dtype"),
        ("3d", "q.shape"),
        ("heads", "k.shape"),
        ("head_dim", "head_dim"),
        ("mixed_dtype", "dtypes differ"),
        ("empty_kv", "kv_len"),
        ("out_shape", "out is"),
        ("out_dtype", "out is"),
        ("out_strides", "out has strides"),
    ],
)
def test_flash_attention_rejects(case, match):
    q, k, v = _inputs(1, 2, 40, 8, 8, torch.float16)
    if case == "float64":
        q, k, v = q.double(), k.double(), v.double()
    elif case == "3d":
        q = q[0]
    elif case == "heads":
        k, v = k[:, :1], v[:, :1]
    elif case == "head_dim":
        q, k, v = (torch.zeros(1, 1, 4, 300, dtype=torch.float16, device=DEVICE) for _ in range(3))
    elif case == "mixed_dtype":
        k = k.float()
    elif case == "empty_kv":
        k, v = k[:, :, :0], v[:, :, :0]
    out = None
    if case == "out_shape":
        out = torch.empty(1, 2, 8, 32, dtype=q.dtype, device=DEVICE)
    elif case == "out_dtype":
        out = torch.empty_like(q, dtype=torch.float32)
    elif case == "out_strides":
        out = torch.empty(1, 2, 40, 8, dtype=q.dtype, device=DEVICE).transpose(2, 3)  # head_dim stride 8
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, out=out)


@pytest.mark.skipif(not ON_CUDA, reason="the CPU interpreter accepts CPU tensors")
def test_flash_attention_rejects_cpu_tensors():
    q = torch.zeros(1, 1, 4, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="device"):
        flash_attention(q, q, q)


@pytest.mark.skipif(not ON_CUDA, reason="Triton autotunes (and compiles) only on CUDA")
def test_compile_workers_compile_a_new_shapes_configurations_ahead():
    """compile_workers: a shape never tuned before gets its candidate block sizes compiled
    ahead (sd_kernels._autotune) through Triton's own autotuner, and the result is unchanged."""
    import os
    import sys

    hook = sys.modules["sd_kernels.flash_attention"]._PARALLEL_COMPILE
    q_len = 1000 + os.getpid() % 997  # a tuning key no earlier process left in Triton's cache
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, q_len, 40, generator=g, device="cuda").half() for _ in range(3))
    before = hook.compiled
    out = flash_attention(q, k, v, compile_workers=4)
    assert hook.compiled - before >= 2, "no configurations were compiled ahead"
    atol, rtol = TOLERANCES[torch.float16]
    assert_close(out, flash_attention_reference(q, k, v), atol, rtol, "compiled ahead")
    assert torch.equal(out, flash_attention(q, k, v))  # the same tuned kernel afterwards
