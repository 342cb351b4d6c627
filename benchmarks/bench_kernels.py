"""Triton kernels against the torch ops they replace, at the SD 1.5 shapes, on one CUDA GPU.

    python benchmarks/bench_kernels.py [--dtype fp16|bf16] [--out PATH] [--min-speedup 1.0]
                                       [--dispatch-on eager|graph] [--no-graphs] [--ops a,b]

Shapes are those of a 512x512 image: the UNet runs at batch 2 (classifier-free guidance),
the VAE decoder at batch 1 (one image). For each op and shape: median time of the Triton
op and of the torch op (triton.testing.do_bench, L2 flushed between runs: eager launches,
so Python launch cost counts where a kernel is shorter than it), the same replayed from a
CUDA graph (triton.testing.do_bench_cudagraph: GPU time only, warm L2, what a captured
UNet step sees), the speedups, and the largest error of each op against the fp32
reference. Writes JSON to benchmarks/results/<gpu-name>-kernels-<date>.json, prints a
markdown table, and a dispatch table (Triton within tolerance and faster -> use it) for
deciding which kernels to enable. Autotuning and compilation happen before timing; expect
about two minutes on an H100.
"""

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sd_backend  # noqa: E402,F401  (maps sd_kernels to the checkout's kernels/ where it is not installed)

import kernel_schedules  # noqa: E402  (benchmarks/: the A/B runs of a kernel's schedules)
from sd_shapes import ATTENTION, BIAS_RESIDUAL, GEGLU, GROUP_NORM, LAYER_NORM  # noqa: E402  (benchmarks/)

# (atol, rtol) against the fp32 reference, as in tests/kernels
TOLERANCES = {
    "flash_attention": {torch.float16: (3e-3, 3e-3), torch.bfloat16: (2e-2, 2e-2)},
    "norm": {torch.float16: (1e-2, 1e-2), torch.bfloat16: (2e-2, 2e-2)},
}


def _bench(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _bench_graph(fn):
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def _errors(out, torch_out, ref, atol, rtol):
    ref = ref.float()
    err = (out.float() - ref).abs()
    ok = bool(torch.isfinite(out).all()) and bool((err <= atol + rtol * ref.abs()).all())
    return err.max().item(), (torch_out.float() - ref).abs().max().item(), ok


GRAPHS = True


def _record(op, name, shape_key, triton_fn, torch_fn, reference_fn, tol, extra):
    out, torch_out = triton_fn(), torch_fn()  # also compiles and autotunes, before any timing or capture
    max_err, torch_err, ok = _errors(out, torch_out, reference_fn(), *tol)
    del out, torch_out
    t_triton, t_torch = _bench(triton_fn), _bench(torch_fn)
    row = {
        "op": op,
        "name": name,
        "shape": shape_key,
        **extra,
        "triton_ms": round(t_triton, 5),
        "torch_ms": round(t_torch, 5),
        "speedup": round(t_torch / t_triton, 3),
        "triton_graph_ms": None,
        "torch_graph_ms": None,
        "graph_speedup": None,
        "max_abs_err": max_err,
        "torch_max_abs_err": torch_err,
        "ok": ok,
    }
    if GRAPHS:
        try:
            g_triton, g_torch = _bench_graph(triton_fn), _bench_graph(torch_fn)
            row.update(
                triton_graph_ms=round(g_triton, 5),
                torch_graph_ms=round(g_torch, 5),
                graph_speedup=round(g_torch / g_triton, 3),
            )
        except Exception as e:  # a capture failure is a finding, not a reason to lose the run
            row["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    return row


def bench_attention(dtype, gen):
    from sd_kernels import flash_attention, flash_attention_reference

    # the module (sd_kernels.flash_attention the attribute is the function), for its autotuner's choice
    autotuner = sys.modules["sd_kernels.flash_attention"]._attn_fwd_kernel
    tol = TOLERANCES["flash_attention"][dtype]
    rows = []
    for name, batch, heads, q_len, kv_len, head_dim in ATTENTION:
        inner = heads * head_dim
        # as diffusers hands them over: (batch, seq, heads * head_dim) projections viewed per head
        hidden = torch.randn(batch, q_len, inner, device="cuda", generator=gen).to(dtype)
        context = torch.randn(batch, kv_len, 2 * inner, device="cuda", generator=gen).to(dtype)
        q = hidden.view(batch, q_len, heads, head_dim).transpose(1, 2)
        k, v = (t.view(batch, kv_len, heads, head_dim).transpose(1, 2) for t in context.chunk(2, dim=-1))
        row = _record(
            "flash_attention",
            name,
            f"b{batch} h{heads} q{q_len} kv{kv_len} d{head_dim}",
            lambda q=q, k=k, v=v: flash_attention(q, k, v),
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
            lambda q=q, k=k, v=v: flash_attention_reference(q, k, v),
            tol,
            {"batch": batch, "heads": heads, "q_len": q_len, "kv_len": kv_len, "head_dim": head_dim},
        )
        row["triton_config"] = str(autotuner.best_config)
        if GRAPHS:  # the alternatives a dispatch could pick, timed as the loop's graph runs them
            row["triton_one_block_graph_ms"] = _graph_ms_or_error(lambda q=q, k=k, v=v: _one_block(q, k, v))
            row["cudnn_graph_ms"] = _graph_ms_or_error(lambda q=q, k=k, v=v: _cudnn_sdpa(q, k, v))
        rows.append(row)
    return rows


def _one_block(q, k, v):
    """flash_attention with head_dim padded to one power of two, as before the split."""
    from sd_kernels import flash_attention

    return flash_attention(q, k, v, split_head_dim=False)


def _cudnn_sdpa(q, k, v):
    """torch's SDPA held to cuDNN's fused attention (on Hopper its warpgroup-MMA flash kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v)


def _graph_ms_or_error(fn):
    try:
        fn()  # compile, autotune, pick the algorithm: before the capture
        return round(_bench_graph(fn), 5)
    except Exception as e:  # a backend that refuses a shape is a finding, not a reason to lose the run
        return f"{type(e).__name__}: {e}"[:200]


def bench_group_norm(dtype, gen):
    from sd_kernels import group_norm, group_norm_reference

    tol = TOLERANCES["norm"][dtype]
    rows = []
    for name, shape, groups, eps, silu in GROUP_NORM:
        c = shape[1]
        w = torch.randn(c, device="cuda", generator=gen).to(dtype)
        b = torch.randn(c, device="cuda", generator=gen).to(dtype)
        act = "silu" if silu else None
        if len(shape) == 3:
            # diffusers' VAE attention normalizes a (batch, tokens, C) tensor through .transpose(1, 2)
            tokens = torch.randn(shape[0], shape[2], c, device="cuda", generator=gen).to(dtype)  # (batch, L, C)
            layouts = [("transposed", tokens.transpose(1, 2))]
        else:
            x = torch.randn(shape, device="cuda", generator=gen).to(dtype)
            layouts = [("nchw", x), ("channels_last", x.to(memory_format=torch.channels_last))]
            del x
        for layout, x in layouts:

            def torch_op(x=x, w=w, b=b, groups=groups, eps=eps, silu=silu):
                y = F.group_norm(x, groups, w, b, eps)
                return F.silu(y) if silu else y

            rows.append(
                _record(
                    "group_norm",
                    name,
                    f"{'x'.join(map(str, shape))} {layout}{' +silu' if silu else ''}",
                    lambda x=x, w=w, b=b, g=groups, eps=eps, act=act: group_norm(x, g, w, b, eps, activation=act),
                    torch_op,
                    lambda x=x, w=w, b=b, g=groups, eps=eps, act=act: group_norm_reference(x, g, w, b, eps, act),
                    tol,
                    {"layout": layout, "silu": silu, "groups": groups},
                )
            )
        del layouts
    return rows


def bench_layer_norm(dtype, gen):
    from sd_kernels import layer_norm, layer_norm_reference

    tol = TOLERANCES["norm"][dtype]
    rows = []
    for name, shape in LAYER_NORM:
        d = shape[-1]
        x = torch.randn(shape, device="cuda", generator=gen).to(dtype)
        w = torch.randn(d, device="cuda", generator=gen).to(dtype)
        b = torch.randn(d, device="cuda", generator=gen).to(dtype)
        rows.append(
            _record(
                "layer_norm",
                name,
                "x".join(map(str, shape)),
                lambda x=x, w=w, b=b: layer_norm(x, w, b, 1e-5),
                lambda x=x, w=w, b=b, d=d: F.layer_norm(x, (d,), w, b, 1e-5),
                lambda x=x, w=w, b=b: layer_norm_reference(x, w, b, 1e-5),
                tol,
                {},
            )
        )
    return rows


def bench_geglu(dtype, gen):
    from sd_kernels import geglu, geglu_reference

    tol = TOLERANCES["norm"][dtype]
    rows = []
    for name, shape in GEGLU:
        x = torch.randn(shape, device="cuda", generator=gen).to(dtype)

        def torch_op(x=x):
            a, gate = x.chunk(2, dim=-1)
            return a * F.gelu(gate)

        shape_key = "x".join(map(str, shape))
        rows.append(
            _record("geglu", name, shape_key, lambda x=x: geglu(x), torch_op, lambda x=x: geglu_reference(x), tol, {})
        )
    return rows


def bench_bias_residual(dtype, gen):
    from sd_kernels import bias_residual, bias_residual_reference

    tol = TOLERANCES["norm"][dtype]
    rows = []
    for name, shape, shortcut in BIAS_RESIDUAL:
        c = shape[1]
        x, residual = (
            torch.randn(shape, device="cuda", generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
            for _ in range(2)
        )
        b = torch.randn(c, device="cuda", generator=gen).to(dtype)
        rb = torch.randn(c, device="cuda", generator=gen).to(dtype) if shortcut else None

        def torch_op(x=x, residual=residual, b=b, rb=rb):
            # what the unfused block does after conv2: the convolutions' bias adds, the residual add, the divide
            h = x + b[:, None, None]
            r = residual + rb[:, None, None] if rb is not None else residual
            return (r + h) / 1.0

        rows.append(
            _record(
                "bias_residual",
                name,
                f"{'x'.join(map(str, shape))} channels_last{' +shortcut bias' if shortcut else ''}",
                lambda x=x, residual=residual, b=b, rb=rb: bias_residual(x, b, residual, rb, 1.0),
                torch_op,
                lambda x=x, residual=residual, b=b, rb=rb: bias_residual_reference(x, b, residual, rb, 1.0),
                tol,
                {"layout": "channels_last", "shortcut": shortcut},
            )
        )
        del x, residual
    return rows


def dispatch_table(rows, min_speedup, on="eager"):
    """{op: {"name shape": True when the Triton op is within tolerance and at least min_speedup x faster}}.

    on="graph" compares the CUDA-graph timings (falling back to eager where capture failed).
    """
    table = {}
    for r in rows:
        speedup = r["graph_speedup"] if on == "graph" and r["graph_speedup"] is not None else r["speedup"]
        table.setdefault(r["op"], {})[f"{r['name']} {r['shape']}"] = bool(r["ok"] and speedup >= min_speedup)
    return table


def markdown(rows):
    def ms(v):
        return "-" if v is None else f"{v:.4f}"

    def x(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [
        "| op | name | shape | triton ms | torch ms | speedup | graph: triton ms | torch ms | speedup "
        "| max abs err (triton / torch) | ok |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['name']} | {r['shape']} | {ms(r['triton_ms'])} | {ms(r['torch_ms'])} | "
            f"{x(r['speedup'])} | {ms(r['triton_graph_ms'])} | {ms(r['torch_graph_ms'])} | {x(r['graph_speedup'])} | "
            f"{r['max_abs_err']:.2e} / {r['torch_max_abs_err']:.2e} | {'yes' if r['ok'] else 'NO'} |"
        )
    attention = [r for r in rows if "cudnn_graph_ms" in r]
    if attention:
        lines += [
            "",
            "Attention, graph-replayed ms: this kernel (head_dim in two power-of-two blocks), the same padded "
            "to one block, torch's SDPA as it chooses, SDPA held to cuDNN",
            "",
            "| name | shape | triton | triton one block | torch SDPA | cuDNN |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in attention:
            cells = [r["triton_graph_ms"], r["triton_one_block_graph_ms"], r["torch_graph_ms"], r["cudnn_graph_ms"]]
            lines.append(
                f"| {r['name']} | {r['shape']} | " + " | ".join(ms(c) if not isinstance(c, str) else c[:40] for c in cells) + " |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<gpu>-kernels-<date>.json)")
    parser.add_argument(
        "--min-speedup", type=float, default=1.0, help="speedup needed to enable a kernel in the dispatch table"
    )
    parser.add_argument(
        "--dispatch-on", choices=("eager", "graph"), default="eager", help="which timings decide the dispatch table"
    )
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    parser.add_argument(
        "--ops", default="flash_attention,group_norm,layer_norm,geglu,bias_residual", help="comma-separated subset"
    )
    args = parser.parse_args(argv)
    global GRAPHS
    GRAPHS = not args.no_graphs
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device_name = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    default_name = f"{device_name.replace(' ', '-')}-kernels-{date}.json"
    out = args.out or os.path.join(ROOT, "benchmarks", "results", default_name)
    if os.path.isdir(out):  # a directory: the default file name inside it
        out = os.path.join(out, default_name)

    import triton

    benches = {
        "flash_attention": bench_attention,
        "group_norm": bench_group_norm,
        # A/B runs of a schedule against the fast path's current one (benchmarks/kernel_schedules.py)
        "group_norm_looped": lambda d, g: kernel_schedules.bench_group_norm_looped(d, g, _record, TOLERANCES["norm"][d]),
        "geglu_linear": lambda d, g: kernel_schedules.bench_geglu_linear(d, g, _record, TOLERANCES["norm"][d]),
        "layer_norm": bench_layer_norm,
        "geglu": bench_geglu,
        "bias_residual": bench_bias_residual,
    }
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    unknown = [op for op in ops if op not in benches]
    if unknown:
        raise SystemExit(f"--ops: unknown {unknown}; allowed: {', '.join(benches)}")

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, started = [], time.time()
    with torch.inference_mode():
        for op in ops:
            t0 = time.time()
            rows += benches[op](dtype, gen)
            print(f"# {op}: {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
            torch.cuda.empty_cache()

    dispatch = dispatch_table(rows, args.min_speedup, args.dispatch_on)
    result = {
        "device": device_name,
        "date": date,
        "dtype": str(dtype),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "min_speedup": args.min_speedup,
        "dispatch_on": args.dispatch_on,
        "wall_s": round(time.time() - started, 1),
        "results": rows,
        "dispatch": dispatch,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)

    print(f"## {device_name}, {dtype}, torch {torch.__version__}, triton {triton.__version__}\n")
    print(markdown(rows))
    print(f"\n## Dispatch (Triton within tolerance and >= {args.min_speedup}x torch, {args.dispatch_on} timings)\n")
    for op, shapes in dispatch.items():
        on = sum(shapes.values())
        print(f"- {op}: {on} of {len(shapes)} shapes")
        for key, use in shapes.items():
            print(f"  - {'triton' if use else 'torch '}  {key}")
    print(f"\nwrote {out}")
    if not all(r["ok"] for r in rows):
        print("some Triton results are outside tolerance: see 'ok' above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
