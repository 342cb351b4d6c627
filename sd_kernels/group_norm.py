"""Group normalization with an optional fused SiLU, for the SD UNet and VAE ResNet blocks.

x is viewed as (N, C, S) with S = H * W (or L); the C channels split into G groups of
C / G. For sample n and group g, over its (C / G) * S elements:

    mean = sum(x) / count
    var  = sum((x - mean)^2) / count           (two passes, fp32; never E[x^2] - E[x]^2)
    y    = (x - mean) / sqrt(var + eps) * weight[c] + bias[c]
    y    = y * sigmoid(y)                      (activation="silu")

An optional pre_add (N, C) is added to x per (sample, channel) as it is loaded, before the
statistics: the op is then group_norm(x + pre_add[:, :, None, None]). A ResNet block passes
conv1's bias plus its time embedding there, so neither needs its own pass over x.

Small groups (a (C/G, S) tile of at most 8192 elements) take one program each and one
launch. Large groups (SD's 320 x 64 x 64 has 40960 elements a group but only N * 32
groups) are split into chunks of S so that the GPU fills: a stats kernel writes each
chunk's mean and sum of squared deviations M2_i, and the normalize kernel merges them
with Chan's parallel formula, M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2), which is as
stable as two passes.

schedule="looped" runs the split path's arithmetic in one launch of one program per group:
it computes its chunks' statistics, merges them, then normalizes its chunks, so its second
read of the group is of data it read microseconds before (from L2, where the split path's
normalize kernel reads x from memory again). Same operations in the same order on the same
tiles: the same output to the bit as the split path. It suits a batch with many groups
(N * G at least a few programs per multiprocessor, e.g. SD's CFG batch 16: 512); "auto"
takes it there and the split path below.

Strides are passed through, so contiguous NCHW and channels_last (and the transposed
(N, C, L) view of diffusers' VAE attention) are read in place; the output has x's layout.
"""

import torch
import triton
import triton.language as tl

from ._checks import check_channel_vector, check_device, check_tensor, contiguous_or_none

_ACTIVATIONS = (None, "silu")
_MAX_SINGLE_TILE = 8192  # elements of a (C/G, S) tile that one program normalizes alone
_CHUNK_TILE = 4096  # elements of a (C/G, chunk of S) tile in the split path
_MAX_GROUP_CHANNELS = 4096
_MAX_PARTIALS_BLOCK = 1024
_SCHEDULES = ("split", "looped", "auto")
_LOOPED_PROGRAMS_PER_SM = 2  # "auto": groups (N * G) per multiprocessor from which the looped program pays


@triton.jit
def _load_group_tile(
    X,  # input base pointer
    P,  # pre_add (N, C), or a dummy when HAS_PRE_ADD is False
    stride_xn, stride_xc, stride_xs,  # input strides over (N, C, S), in elements
    stride_pn, stride_pc,  # pre_add strides, in elements
    n, g, chunk,  # sample, group and chunk of S of this tile
    S,
    GROUP_C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, HAS_PRE_ADD: tl.constexpr,
):
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = chunk * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (offs_c < GROUP_C)[:, None] & (offs_s < S)[None, :]
    # int64 sample offset; offsets inside one sample fit int32 (checked by the launcher)
    base = X + n.to(tl.int64) * stride_xn + (g * GROUP_C).to(tl.int64) * stride_xc
    x = tl.load(base + offs_c[:, None] * stride_xc + offs_s[None, :] * stride_xs, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_PRE_ADD:
        p_base = P + n.to(tl.int64) * stride_pn + (g * GROUP_C).to(tl.int64) * stride_pc
        p = tl.load(p_base + offs_c * stride_pc, mask=offs_c < GROUP_C, other=0.0).to(tl.float32)
        # masked elements stay 0: the statistics sum the whole tile
        x = tl.where(mask, x + p[:, None], 0.0)
    return x, offs_c, offs_s, mask


@triton.jit
def _chunk_stats(x, mask, S, chunk, GROUP_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(mean, M2) of one (C/G, chunk of S) tile: its own mean, then its squared deviations."""
    count = (GROUP_C * tl.minimum(S - chunk * BLOCK_S, BLOCK_S)).to(tl.float32)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    d = tl.where(mask, x - mean, 0.0)
    return mean, tl.sum(tl.sum(d * d, axis=1), axis=0)


@triton.jit
def _merge_chunks(MEAN, M2, row, S, num_chunks, inv_count, GROUP_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
    """(mean, var) of a group from its chunks' (mean, M2) at MEAN/M2[row:row + num_chunks] (Chan et al.)."""
    offs_p0 = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, num_chunks, BLOCK_P):
        offs_p = p0 + offs_p0
        mask_p = offs_p < num_chunks
        cnt = tl.where(mask_p, GROUP_C * tl.minimum(S - offs_p * BLOCK_S, BLOCK_S), 0).to(tl.float32)
        acc += cnt * tl.load(MEAN + row + offs_p, mask=mask_p, other=0.0)
    mean = tl.sum(acc, axis=0) * inv_count
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, num_chunks, BLOCK_P):
        offs_p = p0 + offs_p0
        mask_p = offs_p < num_chunks
        cnt = tl.where(mask_p, GROUP_C * tl.minimum(S - offs_p * BLOCK_S, BLOCK_S), 0).to(tl.float32)
        mu = tl.load(MEAN + row + offs_p, mask=mask_p, other=0.0)
        acc += tl.load(M2 + row + offs_p, mask=mask_p, other=0.0) + cnt * (mu - mean) * (mu - mean)
    return mean, tl.sum(acc, axis=0) * inv_count


@triton.jit
def _normalize_store(
    x, offs_c, offs_s, mask, mean, rstd, W, B, Y, stride_yn, stride_yc, stride_ys, n, g,
    GROUP_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
):
    y = (x - mean) * rstd
    mask_c = offs_c < GROUP_C
    if HAS_WEIGHT:
        w = tl.load(W + g * GROUP_C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        y = y * w[:, None]
    if HAS_BIAS:
        b = tl.load(B + g * GROUP_C + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        y = y + b[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    base = Y + n.to(tl.int64) * stride_yn + (g * GROUP_C).to(tl.int64) * stride_yc
    tl.store(base + offs_c[:, None] * stride_yc + offs_s[None, :] * stride_ys, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_norm_stats_kernel(
    X,  # input (N, C, S), any strides
    P,  # pre_add (N, C), or a dummy when HAS_PRE_ADD is False
    MEAN,  # out: fp32 (N * G, num_chunks), mean of each chunk
    M2,  # out: fp32 (N * G, num_chunks), sum of squared deviations from the chunk mean
    stride_xn, stride_xc, stride_xs,  # input strides, in elements
    stride_pn, stride_pc,  # pre_add strides, in elements
    num_groups, S, num_chunks,
    GROUP_C: tl.constexpr,  # channels per group, C / G (constexpr: lets channels_last loads vectorize)
    BLOCK_C: tl.constexpr,  # next power of two >= C / G
    BLOCK_S: tl.constexpr,  # chunk length along S
    HAS_PRE_ADD: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n = pid_ng // num_groups
    g = pid_ng % num_groups
    x, offs_c, offs_s, mask = _load_group_tile(
        X, P, stride_xn, stride_xc, stride_xs, stride_pn, stride_pc, n, g, chunk, S,
        GROUP_C, BLOCK_C, BLOCK_S, HAS_PRE_ADD,
    )
    mean, m2 = _chunk_stats(x, mask, S, chunk, GROUP_C, BLOCK_S)
    tl.store(MEAN + pid_ng * num_chunks + chunk, mean)
    tl.store(M2 + pid_ng * num_chunks + chunk, m2)


@triton.jit
def _group_norm_fwd_kernel(
    X,  # input (N, C, S), any strides
    Y,  # output (N, C, S), any strides
    W,  # weight (C,), or a dummy when HAS_WEIGHT is False
    B,  # bias (C,), or a dummy when HAS_BIAS is False
    P,  # pre_add (N, C), any strides, or a dummy when HAS_PRE_ADD is False
    MEAN, M2,  # per-chunk statistics from the stats kernel; unused when SINGLE_CHUNK
    stride_xn, stride_xc, stride_xs,  # input strides, in elements
    stride_yn, stride_yc, stride_ys,  # output strides, in elements
    stride_pn, stride_pc,  # pre_add strides, in elements
    num_groups, S, num_chunks,
    inv_count,  # 1 / ((C / G) * S)
    eps,
    GROUP_C: tl.constexpr,  # channels per group, C / G
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,  # partials merged per step
    SINGLE_CHUNK: tl.constexpr,  # the whole group is this program's tile
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_PRE_ADD: tl.constexpr,
    SILU: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    chunk = tl.program_id(1)
    n = pid_ng // num_groups
    g = pid_ng % num_groups
    x, offs_c, offs_s, mask = _load_group_tile(
        X, P, stride_xn, stride_xc, stride_xs, stride_pn, stride_pc, n, g, chunk, S,
        GROUP_C, BLOCK_C, BLOCK_S, HAS_PRE_ADD,
    )
    if SINGLE_CHUNK:
        mean = tl.sum(tl.sum(x, axis=1), axis=0) * inv_count
        d = tl.where(mask, x - mean, 0.0)
        var = tl.sum(tl.sum(d * d, axis=1), axis=0) * inv_count
    else:  # the stats kernel's chunks merged into the group's
        mean, var = _merge_chunks(MEAN, M2, pid_ng * num_chunks, S, num_chunks, inv_count, GROUP_C, BLOCK_S, BLOCK_P)
    rstd = 1.0 / tl.sqrt(var + eps)
    _normalize_store(x, offs_c, offs_s, mask, mean, rstd, W, B, Y, stride_yn, stride_yc, stride_ys, n, g, GROUP_C, HAS_WEIGHT, HAS_BIAS, SILU)


@triton.jit
def _group_norm_looped_kernel(
    X, Y, W, B, P,  # as _group_norm_fwd_kernel's
    MEAN, M2,  # scratch: fp32 (N * G, num_chunks), this program's row its chunks' statistics
    stride_xn, stride_xc, stride_xs,
    stride_yn, stride_yc, stride_ys,
    stride_pn, stride_pc,
    num_groups, S, num_chunks,
    inv_count,
    eps,
    GROUP_C: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_P: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_PRE_ADD: tl.constexpr,
    SILU: tl.constexpr,
):
    """The split path's two kernels as one program per group: each chunk's statistics (as the
    stats kernel), their merge and each chunk normalized (as the fwd kernel)."""
    pid_ng = tl.program_id(0)
    n = pid_ng // num_groups
    g = pid_ng % num_groups
    row = pid_ng * num_chunks
    for chunk in range(0, num_chunks):
        x, offs_c, offs_s, mask = _load_group_tile(
            X, P, stride_xn, stride_xc, stride_xs, stride_pn, stride_pc, n, g, chunk, S,
            GROUP_C, BLOCK_C, BLOCK_S, HAS_PRE_ADD,
        )
        mean, m2 = _chunk_stats(x, mask, S, chunk, GROUP_C, BLOCK_S)
        tl.store(MEAN + row + chunk, mean)
        tl.store(M2 + row + chunk, m2)
    tl.debug_barrier()  # the program's stores above, visible to all its threads
    mean, var = _merge_chunks(MEAN, M2, row, S, num_chunks, inv_count, GROUP_C, BLOCK_S, BLOCK_P)
    rstd = 1.0 / tl.sqrt(var + eps)
    for chunk in range(0, num_chunks):
        x, offs_c, offs_s, mask = _load_group_tile(
            X, P, stride_xn, stride_xc, stride_xs, stride_pn, stride_pc, n, g, chunk, S,
            GROUP_C, BLOCK_C, BLOCK_S, HAS_PRE_ADD,
        )
        _normalize_store(x, offs_c, offs_s, mask, mean, rstd, W, B, Y, stride_yn, stride_yc, stride_ys, n, g, GROUP_C, HAS_WEIGHT, HAS_BIAS, SILU)


def _as_ncs(x):
    """(N, C, *spatial) -> an (N, C, S) view when the spatial dims merge (NCHW, channels_last), else a copy."""
    n, c = x.shape[:2]
    try:
        return x.view(n, c, -1)
    except RuntimeError:
        return x.contiguous().view(n, c, -1)


def group_norm(x, num_groups, weight, bias, eps=1e-5, activation=None, pre_add=None, schedule="split"):
    """F.group_norm(x + pre_add[:, :, None, None], num_groups, weight, bias, eps), then SiLU when activation == "silu".

    x: (N, C, *spatial), e.g. (N, C, H, W) contiguous or channels_last, or (N, C, L);
    float16, bfloat16 or float32. weight, bias: (C,) or None. pre_add: (N, C) of any
    floating dtype and strides (read as fp32), or None. Statistics in fp32.
    schedule: how a group too large for one tile runs: "split" (a stats kernel, then a
    normalize kernel, chunks spread over the GPU), "looped" (one program per group does
    both; the same output to the bit) or "auto" (looped where N * G fills the GPU's
    multiprocessors at least twice over). Small groups run as one tile whatever it says.
    Returns a tensor of x's shape, dtype and memory format.
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"group_norm: schedule is {schedule!r}; allowed: {', '.join(map(repr, _SCHEDULES))}")
    check_tensor("group_norm", "x", x)
    if x.dim() < 2:
        raise ValueError(f"group_norm: x.shape is {tuple(x.shape)}; allowed: (N, C, *spatial) with at least 2 dims")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"group_norm: activation is {activation!r}; allowed: None or 'silu'")
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or C % num_groups != 0:
        raise ValueError(
            f"group_norm: num_groups is {num_groups!r}; allowed: a positive int dividing the {C} channels of x"
        )
    group_channels = C // num_groups
    if group_channels > _MAX_GROUP_CHANNELS:
        raise ValueError(
            f"group_norm: channels per group C / num_groups is {group_channels}; allowed: at most {_MAX_GROUP_CHANNELS}"
        )
    check_channel_vector("group_norm", "weight", weight, C, x.device)
    check_channel_vector("group_norm", "bias", bias, C, x.device)
    N = x.shape[0]
    if pre_add is not None:
        if not isinstance(pre_add, torch.Tensor) or pre_add.shape != (N, C):
            shape = tuple(pre_add.shape) if isinstance(pre_add, torch.Tensor) else type(pre_add).__name__
            raise ValueError(f"group_norm: pre_add is {shape}; allowed: None or a tensor of shape ({N}, {C})")
        if not pre_add.dtype.is_floating_point:
            raise ValueError(f"group_norm: pre_add.dtype is {pre_add.dtype}; allowed: a floating dtype")
        check_device("group_norm", "pre_add", pre_add, x.device)

    x3 = _as_ncs(x)  # (N, C, S)
    N, _, S = x3.shape
    if C * S >= 2**31:
        raise ValueError(f"group_norm: C * spatial size is {C * S}; allowed: below 2**31 elements per sample")
    y3 = torch.empty_like(x3)  # keeps x3's strides, so channels_last stays channels_last
    if y3.numel() == 0:
        return y3.view(x.shape)
    weight, bias = contiguous_or_none(weight), contiguous_or_none(bias)
    p = pre_add if pre_add is not None else x3  # a dummy when absent
    stride_p = pre_add.stride() if pre_add is not None else (0, 0)

    block_c = triton.next_power_of_2(group_channels)
    single = block_c * triton.next_power_of_2(S) <= _MAX_SINGLE_TILE
    block_s = triton.next_power_of_2(S) if single else max(1, _CHUNK_TILE // block_c)
    num_chunks = triton.cdiv(S, block_s)
    num_warps = 4 if block_c * block_s <= 2048 else 8
    grid = (N * num_groups, num_chunks)
    common = dict(GROUP_C=group_channels, BLOCK_C=block_c, BLOCK_S=block_s, HAS_PRE_ADD=pre_add is not None)
    affine = (weight if weight is not None else x3, bias if bias is not None else x3, p)
    flags = dict(BLOCK_P=min(triton.next_power_of_2(num_chunks), _MAX_PARTIALS_BLOCK), HAS_WEIGHT=weight is not None,
                 HAS_BIAS=bias is not None, SILU=activation == "silu", num_warps=num_warps)
    if single:
        mean = m2 = x3  # unused
    else:
        mean = torch.empty((N * num_groups, num_chunks), dtype=torch.float32, device=x.device)
        m2 = torch.empty_like(mean)
        if schedule == "auto":
            programs = _LOOPED_PROGRAMS_PER_SM * (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1)
            schedule = "looped" if N * num_groups >= programs else "split"
        if schedule == "looped":
            _group_norm_looped_kernel[(N * num_groups,)](
                x3, y3, *affine, mean, m2,
                *x3.stride(), *y3.stride(), *stride_p,
                num_groups, S, num_chunks,
                1.0 / (group_channels * S), float(eps),
                **common, **flags,
            )
            return y3.view(x.shape)
        _group_norm_stats_kernel[grid](
            x3, p, mean, m2,
            *x3.stride(), *stride_p,
            num_groups, S, num_chunks,
            **common, num_warps=num_warps,
        )
    _group_norm_fwd_kernel[grid](
        x3, y3, *affine,
        mean, m2,
        *x3.stride(), *y3.stride(), *stride_p,
        num_groups, S, num_chunks,
        1.0 / (group_channels * S), float(eps),
        SINGLE_CHUNK=single, **common, **flags,
    )
    return y3.view(x.shape)


def group_norm_reference(x, num_groups, weight, bias, eps=1e-5, activation=None, pre_add=None):
    """x + pre_add, then F.group_norm (+ F.silu), in fp32; returns fp32."""
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    x = x.float()
    if pre_add is not None:
        x = x + pre_add.float().reshape(*pre_add.shape, *([1] * (x.dim() - 2)))
    y = torch.nn.functional.group_norm(x, num_groups, w, b, eps)
    return torch.nn.functional.silu(y) if activation == "silu" else y
