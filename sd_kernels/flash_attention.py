"""Flash attention, forward only, non-causal, for the SD UNet self- and cross-attention.

For one (batch, head) and a block of query rows, with s = scale * q k^T:

    out = softmax(s) v

computed one block of keys at a time with the online softmax (Dao et al. 2022), in base 2
so that exp2 maps to one instruction (log2(e) is folded into the scale):

    m_new = max(m, rowmax(s * log2e))
    p     = exp2(s * log2e - m_new)
    l     = l * exp2(m - m_new) + rowsum(p)
    acc   = acc * exp2(m - m_new) + p v
    out   = acc / l

m, l and acc are fp32. tl.arange needs power-of-two lengths and tl.dot a K of at least 16.
A head_dim that is the sum of two such powers of two is covered by two column blocks,
D_A the larger and D_B the rest (80 -> 64 + 16, 160 -> 128 + 32, 96 -> 64 + 32), and both
matmuls are split along head_dim, with q, k, v and acc in two column tiles each
(q_a = q[:, :D_A], q_b = q[:, D_A:D_A + D_B]):

    s     = q_a k_a^T + q_b k_b^T
    acc_a = acc_a * exp2(m - m_new) + p v_a
    acc_b = acc_b * exp2(m - m_new) + p v_b

Every other head_dim is one block of the next power of two, its columns past head_dim loaded
as zeros under a mask (40 -> 64, 8 -> 16). The
kernel masks the second block's columns too, so it is correct for any (D_A, D_B), though
_head_dim_blocks only ever picks exact splits. split_head_dim=False pads every head_dim to
one block of the next power of two instead (80 -> 128, 160 -> 256), so that a benchmark can
time both in one process.

The key tail (kv_len 77 for the CLIP context) is masked to -inf before the row max.
Shapes: q (batch, heads, q_len, head_dim), k and v (batch, heads, kv_len, head_dim), any
strides (diffusers hands over transposed views).
"""

import math

import torch
import triton
import triton.language as tl

from ._autotune import ParallelCompile
from ._checks import INTERPRET, check_tensor

_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634


def _head_dim_blocks(head_dim, split=True):
    """(D_A, D_B): the power-of-two column blocks the kernel covers head_dim with; D_B 0 for one block.

    Two blocks only where they cover head_dim exactly, D_A the largest power of two below it
    and D_B the rest, both at least 16 (tl.dot's smallest K): 80 -> (64, 16), 160 -> (128, 32),
    96 -> (64, 32). Everywhere else, or with split False, one block of next_power_of_2(head_dim):
    64 -> (64, 0), 8 -> (16, 0), 40 -> (64, 0): 40 as 32 + 16 measured no faster, its
    self-attention being softmax-bound (benchmarks/NOTES.md).
    """
    single = max(16, triton.next_power_of_2(head_dim))
    d_a = max(16, 1 << (head_dim.bit_length() - 1))
    d_b = head_dim - d_a
    if not split or d_b < 16 or d_b & (d_b - 1):
        return single, 0
    return d_a, d_b


def _configs():
    if INTERPRET:
        # Small blocks so that CPU tests cover several query blocks and the key tail.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": BM, "BLOCK_N": BN}, num_warps=w, num_stages=s)
        for BM, BN, w, s in [
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (128, 32, 8, 2),
            (64, 64, 4, 3),
            (64, 128, 4, 2),
            (64, 32, 4, 2),
            # for head_dim 160 (160 columns split, 256 padded), whose accumulator needs 8 warps at BLOCK_M 64
            (64, 64, 8, 2),
            (64, 32, 8, 2),
        ]
    ]


def _prune_configs(configs, named_args, **kwargs):
    """Drop blocks larger than the sequence, tiles that overflow shared memory or spill registers."""
    args = {**named_args, **kwargs}
    q_len, kv_len = args["q_len"], args["kv_len"]
    width = args["D_A"] + args["D_B"]  # head_dim columns the tiles hold, padding included
    elem_bytes = args["Q"].element_size()
    kept = []
    for cfg in configs:
        bm, bn, warps = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps
        if bm > max(64, triton.next_power_of_2(q_len)) or bn > max(32, triton.next_power_of_2(kv_len)):
            continue
        if bm == 64 and warps == 8 and width <= 128:
            continue
        # q tile + K and V tiles per pipeline stage; H100 has 227 KiB a block
        if elem_bytes * width * (bm + 2 * bn * cfg.num_stages) > 200 * 1024:
            continue
        # fp32 registers a thread holds for acc and the score tile; past ~96 ptxas spills (checked for sm_90)
        if (bm * width + bm * bn) / (32 * warps) > 96:
            continue
        kept.append(cfg)
    # the smallest tile always fits
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] / c.num_warps)]


@triton.jit
def _attn_fwd_inner(
    acc_a, acc_b,  # running output for columns [0, D_A) and [D_A, D_A + D_B), (BLOCK_M, D_A) and (BLOCK_M, D_B), fp32
    l_i, m_i,  # row sums and row maxima (BLOCK_M,), fp32
    q_a, q_b,  # query tiles (BLOCK_M, D_A) and (BLOCK_M, D_B)
    K, V,  # key and value base pointers for this (batch, head)
    stride_kn, stride_kd,  # key strides along kv_len and head_dim
    stride_vn, stride_vd,  # value strides along kv_len and head_dim
    start_n, end_n, kv_len,  # key range [start_n, end_n) walked in BLOCK_N steps
    qk_scale,  # softmax scale * log2(e)
    offs_da, mask_da,  # head_dim offsets [0, D_A) and their mask, (D_A,)
    offs_db, mask_db,  # head_dim offsets [D_A, D_A + D_B) and their mask, (D_B,)
    BLOCK_N: tl.constexpr,
    MASK_N: tl.constexpr,  # True only for the last, partial key block
    D_B: tl.constexpr,  # width of the second column block; 0: acc_b, q_b, offs_db and mask_db are unused
    DOT_PRECISION: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start in range(start_n, end_n, BLOCK_N):
        offs_n = start + offs_n0
        if MASK_N:
            kv_mask_a = (offs_n < kv_len)[:, None] & mask_da[None, :]
        else:
            kv_mask_a = mask_da[None, :]
        k_a = tl.load(K + offs_n[:, None] * stride_kn + offs_da[None, :] * stride_kd, mask=kv_mask_a, other=0.0)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if D_B > 0:
            if MASK_N:
                kv_mask_b = (offs_n < kv_len)[:, None] & mask_db[None, :]
            else:
                kv_mask_b = mask_db[None, :]
            k_b = tl.load(K + offs_n[:, None] * stride_kn + offs_db[None, :] * stride_kd, mask=kv_mask_b, other=0.0)
            s = tl.dot(q_b, tl.trans(k_b), s, input_precision=DOT_PRECISION)
        s = s * qk_scale
        if MASK_N:
            s = tl.where((offs_n < kv_len)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_a = tl.load(V + offs_n[:, None] * stride_vn + offs_da[None, :] * stride_vd, mask=kv_mask_a, other=0.0)
        acc_a = acc_a * alpha[:, None]
        acc_a = tl.dot(p.to(v_a.dtype), v_a, acc_a, input_precision=DOT_PRECISION)
        if D_B > 0:
            v_b = tl.load(V + offs_n[:, None] * stride_vn + offs_db[None, :] * stride_vd, mask=kv_mask_b, other=0.0)
            acc_b = acc_b * alpha[:, None]
            acc_b = tl.dot(p.to(v_b.dtype), v_b, acc_b, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc_a, acc_b, l_i, m_i


@triton.autotune(
    configs=_configs(),
    # D_A and D_B too: split_head_dim changes them for the same head_dim within one process
    key=["q_len", "kv_len", "HEAD_DIM", "D_A", "D_B", "ALIGN"],
    prune_configs_by={"early_config_prune": _prune_configs},
    # each key's timings into Triton's cache directory (the deployment's cache_dir/triton, keyed
    # by Triton's version, the GPU target and this kernel's source): a restart takes the same
    # block sizes without timing up to eight configurations per attention shape again
    cache_results=True,
)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out,  # q (batch, heads, q_len, head_dim); k, v (batch, heads, kv_len, head_dim); out like q
    # strides: batch, head and sequence ones in units of ALIGN elements, head_dim's in elements
    stride_qb, stride_qh, stride_qm, stride_qd,  # q
    stride_kb, stride_kh, stride_kn, stride_kd,  # k
    stride_vb, stride_vh, stride_vn, stride_vd,  # v
    stride_ob, stride_oh, stride_om, stride_od,  # out
    heads, q_len, kv_len,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    D_A: tl.constexpr,  # first column block, a power of two >= 16 (_head_dim_blocks)
    D_B: tl.constexpr,  # second column block from column D_A, a power of two >= 16, or 0 when D_A covers HEAD_DIM
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, so that they match torch; ignored for fp16/bf16
    ALIGN: tl.constexpr,  # 16 bytes in elements when every stride but head_dim's divides by it, else 1
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Triton infers alignment only from integer arguments divisible by 16; head_dim 40 makes
    # strides of 40 elements, and without this every K/V load is scalar and unpipelined.
    # Multiplying by the constexpr ALIGN tells the compiler that rows start 16-byte aligned.
    stride_qm, stride_kn = stride_qm * ALIGN, stride_kn * ALIGN
    stride_vn, stride_om = stride_vn * ALIGN, stride_om * ALIGN

    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 before any multiply: batch * heads * seq * head_dim passes 2**31 for large batches
    off_b = (pid_bh // heads).to(tl.int64)
    off_h = (pid_bh % heads).to(tl.int64)
    Q += (off_b * stride_qb + off_h * stride_qh) * ALIGN
    K += (off_b * stride_kb + off_h * stride_kh) * ALIGN
    V += (off_b * stride_vb + off_h * stride_vh) * ALIGN
    Out += (off_b * stride_ob + off_h * stride_oh) * ALIGN

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_da = tl.arange(0, D_A)
    mask_m = offs_m < q_len
    mask_da = offs_da < HEAD_DIM
    q_a = tl.load(
        Q + offs_m[:, None] * stride_qm + offs_da[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_da[None, :],
        other=0.0,
    )
    acc_a = tl.zeros([BLOCK_M, D_A], dtype=tl.float32)
    if D_B > 0:
        # D_A is a multiple of 16 elements, so the second block's rows start as aligned as the first's
        offs_db = D_A + tl.arange(0, D_B)
        mask_db = offs_db < HEAD_DIM
        q_b = tl.load(
            Q + offs_m[:, None] * stride_qm + offs_db[None, :] * stride_qd,
            mask=mask_m[:, None] & mask_db[None, :],
            other=0.0,
        )
        acc_b = tl.zeros([BLOCK_M, D_B], dtype=tl.float32)
    else:
        # placeholders that _attn_fwd_inner never reads when D_B is 0; they add no code
        offs_db, mask_db, q_b, acc_b = offs_da, mask_da, q_a, acc_a

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # full key blocks without the tail mask, then at most one masked block
    n_full = (kv_len // BLOCK_N) * BLOCK_N
    acc_a, acc_b, l_i, m_i = _attn_fwd_inner(
        acc_a, acc_b, l_i, m_i, q_a, q_b, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        0, n_full, kv_len, qk_scale, offs_da, mask_da, offs_db, mask_db,
        BLOCK_N, False, D_B, DOT_PRECISION,
    )
    acc_a, acc_b, l_i, m_i = _attn_fwd_inner(
        acc_a, acc_b, l_i, m_i, q_a, q_b, K, V, stride_kn, stride_kd, stride_vn, stride_vd,
        n_full, kv_len, kv_len, qk_scale, offs_da, mask_da, offs_db, mask_db,
        BLOCK_N, True, D_B, DOT_PRECISION,
    )

    out_a = acc_a / l_i[:, None]
    tl.store(
        Out + offs_m[:, None] * stride_om + offs_da[None, :] * stride_od,
        out_a.to(Out.dtype.element_ty),
        mask=mask_m[:, None] & mask_da[None, :],
    )
    if D_B > 0:
        out_b = acc_b / l_i[:, None]
        tl.store(
            Out + offs_m[:, None] * stride_om + offs_db[None, :] * stride_od,
            out_b.to(Out.dtype.element_ty),
            mask=mask_m[:, None] & mask_db[None, :],
        )


_PARALLEL_COMPILE = ParallelCompile(_attn_fwd_kernel)


def flash_attention(q, k, v, scale=None, out=None, split_head_dim=True, compile_workers=0):
    """softmax(scale * q k^T) v, non-causal, no mask.

    q: (batch, heads, q_len, head_dim); k, v: (batch, heads, kv_len, head_dim); any strides.
    dtype float16, bfloat16 or float32 (all three the same); head_dim 1..256.
    scale defaults to 1 / sqrt(head_dim), as in F.scaled_dot_product_attention.
    Returns a contiguous (batch, heads, q_len, head_dim) tensor of q's dtype, or writes
    into `out`, a tensor of that shape, dtype and device with any strides whose head_dim
    stride is 1, and returns it: e.g. the (batch, heads, q_len, head_dim) view of a
    (batch, q_len, heads, head_dim) buffer, which the output projection reads as
    (batch, q_len, heads * head_dim) without a transposing copy.
    split_head_dim False covers head_dim with one padded block even where two exact
    blocks would do (80 -> 128 instead of 64 + 16; see _head_dim_blocks).
    compile_workers > 1: a shape whose block sizes are not yet tuned (in this process or in
    Triton's cache directory) gets its candidate configurations compiled by that many
    threads before they are timed (sd_kernels._autotune), instead of one after another.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor("flash_attention", name, t)
        if t.dim() != 4:
            raise ValueError(
                f"flash_attention: {name}.shape is {tuple(t.shape)}; allowed: 4 dims (batch, heads, seq_len, head_dim)"
            )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"flash_attention: dtypes differ (q {q.dtype}, k {k.dtype}, v {v.dtype}); allowed: all the same"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"flash_attention: devices differ (q {q.device}, k {k.device}, v {v.device}); allowed: one device"
        )
    batch, heads, q_len, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != head_dim:
        raise ValueError(
            f"flash_attention: k.shape {tuple(k.shape)} and v.shape {tuple(v.shape)} must both be "
            f"(batch={batch}, heads={heads}, kv_len, head_dim={head_dim}) to match q.shape {tuple(q.shape)}"
        )
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"flash_attention: head_dim is {head_dim}; allowed: 1 to {_MAX_HEAD_DIM}")
    kv_len = k.shape[2]
    if kv_len == 0:
        raise ValueError("flash_attention: kv_len is 0; allowed: at least one key (softmax over nothing is undefined)")
    if batch * heads > 65535:
        raise ValueError(f"flash_attention: batch * heads is {batch * heads}; allowed: at most 65535 (grid limit)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        # offsets inside one (batch, head) slice are int32 in the kernel
        if (t.shape[2] - 1) * abs(t.stride(2)) + (head_dim - 1) * abs(t.stride(3)) >= 2**31:
            raise ValueError(
                f"flash_attention: {name} with shape {tuple(t.shape)} and strides {t.stride()} spans 2**31 "
                f"elements or more within one (batch, head); allowed: less"
            )
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    if out is None:
        out = torch.empty((batch, heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    elif not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        got = f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"flash_attention: out is {got}; allowed: {tuple(q.shape)} {q.dtype} on {q.device}")
    elif out.stride(3) != 1 or any(out.stride(i) == 0 and out.shape[i] > 1 for i in range(3)):
        raise ValueError(f"flash_attention: out has strides {out.stride()}; allowed: head_dim stride 1, no broadcast dims")
    if out.numel() == 0:
        return out
    d_a, d_b = _head_dim_blocks(head_dim, split=split_head_dim)

    # ALIGN: 16 bytes in elements, when every row and (batch, head) slice starts 16-byte aligned
    align = 16 // q.element_size()
    if not all(
        t.data_ptr() % 16 == 0
        and t.stride(3) == 1
        and all(st % align == 0 for st, size in zip(t.stride()[:3], t.shape[:3], strict=True) if size > 1)
        for t in (q, k, v, out)
    ):
        align = 1

    def strides(t):
        # size-1 dims may carry any stride; they are only ever multiplied by 0
        return [st // align if size > 1 else 0 for st, size in zip(t.stride()[:3], t.shape[:3], strict=True)] + [
            t.stride(3)
        ]

    def grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

    args = (
        q, k, v, out,
        *strides(q), *strides(k), *strides(v), *strides(out),
        heads, q_len, kv_len,
        float(scale) * _LOG2E,
    )
    meta = dict(
        HEAD_DIM=head_dim,
        D_A=d_a,
        D_B=d_b,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ALIGN=align,
    )
    with _PARALLEL_COMPILE.launching(args, meta, grid, compile_workers):
        _attn_fwd_kernel[grid](*args, **meta)
    return out


def flash_attention_reference(q, k, v, scale=None):
    """softmax(scale * q k^T) v in fp32 torch math; returns fp32."""
    q, k, v = q.float(), k.float(), v.float()
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (batch, heads, q_len, kv_len)
    return torch.matmul(torch.softmax(scores, dim=-1), v)
