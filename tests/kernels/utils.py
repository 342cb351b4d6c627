"""Shared pieces of the kernel tests: where they run, and a compare helper that says what went wrong."""

import torch

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"

# dtypes the kernels are tested in: Triton's CPU interpreter multiplies bfloat16 tiles as
# integers in tl.dot, so bf16 attention is tested on CUDA only
FLOAT_DTYPES = [torch.float16, torch.bfloat16] if ON_CUDA else [torch.float32, torch.float16, torch.bfloat16]
ATTN_DTYPES = [torch.float16, torch.bfloat16] if ON_CUDA else [torch.float32, torch.float16]


def assert_close(actual, expected, atol, rtol, name=""):
    """Assert |actual - expected| <= atol + rtol * |expected| everywhere (NaN only where expected has NaN).

    On failure, report the shapes, how many elements fail, the worst one (by how far past
    its tolerance), where it is, both values there, the largest absolute and relative
    errors, and any NaN or inf in actual.
    """
    label = f"{name}: " if name else ""
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{label}shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return

    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    both_nan = nan_a & nan_e
    same_inf = torch.isinf(a) & torch.isinf(e) & (a == e)
    diff = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = ~(both_nan | same_inf) & ~(diff <= tol)  # ~(<=) also catches NaN in either
    if not bad.any():
        return

    excess = torch.where(bad, (diff - tol).nan_to_num(nan=float("inf")), torch.full_like(diff, -1.0))
    flat = int(torch.argmax(excess))
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
    finite = ~(nan_a | nan_e) & ~(torch.isinf(a) | torch.isinf(e))
    max_abs = diff[finite].max().item() if finite.any() else float("nan")
    rel = diff / e.abs().clamp_min(1e-12)
    max_rel = rel[finite].max().item() if finite.any() else float("nan")
    lines = [
        f"{label}{int(bad.sum())} of {a.numel()} elements outside atol={atol:g}, rtol={rtol:g}",
        f"  worst at index {where}: actual {a.flatten()[flat].item():.6g}, expected {e.flatten()[flat].item():.6g}",
        f"  max abs error {max_abs:.6g}, max rel error {max_rel:.6g} (finite elements)",
    ]
    if nan_a.any():
        first = tuple(int(i) for i in torch.unravel_index(torch.nonzero(nan_a.flatten())[0, 0], a.shape))
        lines.append(f"  actual has {int(nan_a.sum())} NaN (expected has {int(nan_e.sum())}), first at {first}")
    n_inf = int((torch.isinf(a) & ~torch.isinf(e)).sum())
    if n_inf:
        lines.append(f"  actual has {n_inf} inf where expected is finite")
    raise AssertionError("\n".join(lines))


def rounding_bound(dtype, terms):
    """gamma_n = n u / (1 - n u), u the unit roundoff of dtype: the worst-case relative error
    of a sum of n products in that precision (Higham, Accuracy and Stability, section 3.1),
    whatever order the summation takes. Two correct evaluations in different orders (another
    GEMM shape, another BLAS kernel) differ by at most twice that."""
    u = torch.finfo(dtype).eps / 2
    return terms * u / (1 - terms * u)


def rel_l2(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - e).norm() / e.norm())
