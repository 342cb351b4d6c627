"""bench_kernels.py's A/B runs of a kernel against the fast path's current way of doing the
same op (not against torch's op): the new schedule's time in triton_ms, the current one's in
torch_ms, and what that is in the row's "against". Each takes bench_kernels' row recorder
and the op family's tolerance as arguments."""

import torch
import torch.nn.functional as F

from sd_shapes import GEGLU, GROUP_NORM  # benchmarks/


def bench_group_norm_looped(dtype, gen, record, tol):
    """sd_kernels.group_norm's "looped" schedule (triton_ms) against its "split" one (in the
    torch_ms column: "against": "split") at the UNet's GroupNorms of batch 8 with guidance
    (batch 16), channels-last as the fast path runs them: fast_path.group_norm_looped's case."""
    from sd_kernels import group_norm, group_norm_reference

    rows = []
    for name, shape, groups, eps, silu in GROUP_NORM:
        if not name.startswith("unet"):
            continue
        shape = (16,) + shape[1:]
        c = shape[1]
        w = torch.randn(c, device="cuda", generator=gen).to(dtype)
        b = torch.randn(c, device="cuda", generator=gen).to(dtype)
        x = torch.randn(shape, device="cuda", generator=gen).to(dtype).to(memory_format=torch.channels_last)
        act = "silu" if silu else None
        rows.append(
            record(
                "group_norm_looped",
                name,
                f"{'x'.join(map(str, shape))} channels_last{' +silu' if silu else ''}",
                lambda x=x, w=w, b=b, g=groups, eps=eps, act=act: group_norm(x, g, w, b, eps, activation=act, schedule="looped"),
                lambda x=x, w=w, b=b, g=groups, eps=eps, act=act: group_norm(x, g, w, b, eps, activation=act, schedule="split"),
                lambda x=x, w=w, b=b, g=groups, eps=eps, act=act: group_norm_reference(x, g, w, b, eps, act),
                tol,
                {"layout": "channels_last", "silu": silu, "groups": groups, "against": "split"},
            )
        )
        del x
    return rows


def bench_geglu_linear(dtype, gen, record, tol):
    """sd_kernels.geglu_linear (the projection with the gate as its epilogue, triton_ms)
    against cuBLAS's projection then sd_kernels.geglu (torch_ms: "against": "linear+geglu"),
    the fast path's feed-forward today, at batch 2 and 16: fast_path.geglu_linear's case."""
    from sd_kernels import geglu, geglu_linear, geglu_linear_reference

    rows = []
    for name, (_, seq, two_f) in GEGLU:
        f = two_f // 2
        k = f // 4  # the feed-forward's inner size is 4 x channels
        w = (torch.randn(two_f, k, device="cuda", generator=gen) / k**0.5).to(dtype)  # activations of order 1
        b = torch.randn(two_f, device="cuda", generator=gen).to(dtype)
        for batch in (2, 16):
            x = torch.randn(batch, seq, k, device="cuda", generator=gen).to(dtype)
            rows.append(
                record(
                    "geglu_linear",
                    name,
                    f"{batch}x{seq}x{k} -> {f}",
                    lambda x=x, w=w, b=b: geglu_linear(x, w, b),
                    lambda x=x, w=w, b=b: geglu(F.linear(x, w, b)),
                    lambda x=x, w=w, b=b: geglu_linear_reference(x, w, b),
                    tol,
                    {"batch": batch, "against": "linear+geglu"},
                )
            )
            del x
    return rows
