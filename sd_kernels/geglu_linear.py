"""The SD transformer feed-forward's GEGLU with its projection: one GEMM with the gate as its epilogue.

diffusers' GEGLU is proj = nn.Linear(C, 2F), then proj(x).chunk(2, dim=-1) as value a and
gate g, then a * gelu(g). Here, with W = proj.weight (2F, C) and b = proj.bias (2F,):

    a = x @ W[:F].T + b[:F],   g = x @ W[F:].T + b[F:]        (fp32 accumulators)
    out = a * gelu(g),         gelu(g) = 0.5 g (1 + erf(g / sqrt(2)))   (exact erf form, fp32)

Each program computes one (BLOCK_M, BLOCK_N) tile of out with two accumulators, the value's
columns n and the gate's columns F + n, over the same tiles of x. The (M, 2F) projection is
never written: against cuBLAS's GEMM followed by sd_kernels.geglu, one write of (M, F)
instead of a write of (M, 2F), its read and a write of (M, F). a and g are not rounded to
x's dtype before the gate (the two-op path rounds both), so the result differs from that
path's by up to about one rounding of a and of g, and is closer to the fp32 reference.
"""

import torch
import triton
import triton.language as tl

from ._checks import INTERPRET, check_channel_vector, check_tensor


def _configs():
    if INTERPRET:
        # small tiles: the CPU tests cover several tiles in M and N, and a K tail
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            # two (BLOCK_M, BLOCK_N) fp32 accumulators: 128 x 128 needs 8 warps
            (128, 128, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (128, 128, 128, 8, 2),
            (128, 128, 32, 8, 4),
            (128, 64, 64, 4, 4),
            (128, 64, 64, 8, 3),
            (64, 128, 64, 4, 4),
            (256, 64, 64, 8, 3),
            (64, 64, 64, 4, 4),  # small M (a batch-1 UNet at 8 x 8)
        ]
    ]


@triton.autotune(
    configs=_configs(),
    # M_KEY (M rounded up to a power of two) instead of M: the batch buckets' many M values
    # share the timings of their power of two
    key=["M_KEY", "F", "K"],
    # each key's timings into Triton's cache directory (the deployment's cache_dir/triton):
    # a restart takes the same tiles without timing them again
    cache_results=True,
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _geglu_linear_kernel(
    X,  # input (M, K), K contiguous
    W,  # weight (2F, K), K contiguous: value rows, then gate rows
    B,  # bias (2F,) or a dummy when HAS_BIAS is False
    Out,  # output (M, F), contiguous
    M, F, K,
    M_KEY,  # the autotuning key only
    stride_xm,  # input row stride, in elements
    stride_wn,  # weight row stride, in elements
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 inputs (tl.dot's default there is TF32)
    EVEN_K: tl.constexpr,  # K a multiple of BLOCK_K: no mask on any load (a mask along K stops vector loads)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped order: GROUP_M row tiles walk the same weight columns while they are in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(F, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows past M and columns past F read row M-1 / column F-1 again (never stored): no mask
    # on the hot loads but K's tail
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    cols = tl.minimum(offs_n, F - 1).to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    wa_ptrs = W + cols[None, :] * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) of W[:F].T
    wg_ptrs = wa_ptrs + F * stride_wn  # the same of W[F:].T

    acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            wa = tl.load(wa_ptrs)
            wg = tl.load(wg_ptrs)
        else:
            k_left = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            wa = tl.load(wa_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            wg = tl.load(wg_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc_a = tl.dot(x, wa, acc_a, input_precision=PRECISION)
        acc_g = tl.dot(x, wg, acc_g, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        wa_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K

    if HAS_BIAS:
        acc_a += tl.load(B + cols).to(tl.float32)[None, :]
        acc_g += tl.load(B + F + cols).to(tl.float32)[None, :]
    out = acc_a * (0.5 * acc_g * (1.0 + tl.math.erf(acc_g * 0.7071067811865476)))
    mask = (offs_m < M)[:, None] & (offs_n < F)[None, :]
    out_ptrs = Out + offs_m.to(tl.int64)[:, None] * F + offs_n[None, :]
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=mask)


def geglu_linear(x, weight, bias=None):
    """value * gelu(gate) of x @ weight.T + bias, the value the first half of the 2F outputs.

    x (..., K); weight (2F, K), as nn.Linear(K, 2F) holds it; bias (2F,) or None. float16,
    bfloat16 or float32, all one dtype, on one device. Returns a contiguous (..., F) tensor
    of x's dtype: diffusers' GEGLU(x) for a GEGLU whose proj has that weight and bias.
    """
    check_tensor("geglu_linear", "x", x)
    check_tensor("geglu_linear", "weight", weight, dtypes=(x.dtype,), device=x.device)
    if x.dim() < 1:
        raise ValueError("geglu_linear: x is a 0-dim tensor; allowed: (..., K) with at least 1 dim")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K or weight.shape[0] % 2:
        raise ValueError(
            f"geglu_linear: weight is {tuple(weight.shape)}; allowed: (2F, {K}), value rows then gate rows"
        )
    F = weight.shape[0] // 2
    check_channel_vector("geglu_linear", "bias", bias, 2 * F, x.device)

    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    M = x2.shape[0]
    out = torch.empty((*x.shape[:-1], F), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if K == 0:  # an empty sum: a = b_a, g = b_g
        return geglu_linear_reference(x, weight, bias).to(x.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(F, meta["BLOCK_N"]),)

    _geglu_linear_kernel[grid](
        x2, weight, bias if bias is not None else weight, out,
        M, F, K, triton.next_power_of_2(M),
        x2.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # tf32: ignored for 16-bit inputs
    )
    return out


def geglu_linear_reference(x, weight, bias=None):
    """diffusers' GEGLU (nn.Linear, chunk, exact GELU, multiply) in fp32; returns fp32."""
    h = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    a, gate = h.chunk(2, dim=-1)
    return a * torch.nn.functional.gelu(gate)
