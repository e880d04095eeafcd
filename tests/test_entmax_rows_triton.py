"""The Triton row kernel (hf_sparse.entmax_rows_triton) against entmax_topk's torch path (pinned to the entmax
package by tests/test_entmax_topk.py).

Without CUDA the kernel runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is first used),
which is slow: a few dozen rows of 70 scores. Rows held whole and the long-row path (forced with a chunk of 16, so
that 70 scores take five chunks) are both checked; rows of small spread have supports of most of the row, more than
the long-row path's candidates (two per column of a chunk) can hold, so its certificate fails there and those rows
are solved by sweeping their scores again.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="the row kernel needs triton (a dev dependency)")

from hf_sparse import entmax_topk  # noqa: E402
from hf_sparse.entmax_rows_triton import LONG_ROW_CHUNK, WHOLE_ROW, _layout, entmax_rows  # noqa: E402
from hf_sparse.entmax_topk import entmax15, entmax_alpha, sparsemax  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KINDS = [("entmax15", 1.5), ("sparsemax", 2.0), ("entmax_alpha", 1.3), ("entmax_alpha", 2.5)]
SPREADS = (0.002, 0.05, 1.0, 4.0)  # small: supports of most of the row (any α); 4: a few scores


def rows_input(n_rows, length, dtype=torch.float64, seed=0):
    """Scores at several spreads, with a mask: row 1 fully masked, row 2 padded from the middle, a quarter of the
    other pairs masked."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.tensor(SPREADS, dtype=torch.float64).repeat(n_rows)[:n_rows, None]
    x = torch.randn(n_rows, length, generator=g, dtype=torch.float64) * spread
    keep = torch.rand(n_rows, length, generator=g) > 0.25
    keep[1] = False
    keep[2, length // 2 :] = False
    return x.to(dtype).to(DEVICE), keep.to(DEVICE)


def topk_path(kind, alpha, x, keep, **kwargs):
    if kind == "entmax15":
        return entmax15(x, keep=keep, backend="topk")
    if kind == "sparsemax":
        return sparsemax(x, keep=keep, backend="topk")
    return entmax_alpha(x, alpha, keep=keep, backend="topk", **kwargs)


def forward_backward(fn, x, dy):
    x = x.detach().clone().requires_grad_()
    p = fn(x)
    (grad,) = torch.autograd.grad(p, x, dy)
    return p.detach(), grad


@pytest.mark.parametrize("chunk", [None, 16], ids=["whole-rows", "long-row-path"])
@pytest.mark.parametrize("kind,alpha", KINDS, ids=[f"{k}-{a}" for k, a in KINDS])
def test_the_row_kernel_gives_the_topk_paths_probabilities_and_gradients_in_float64(kind, alpha, chunk):
    x, keep = rows_input(12, 70)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype).to(DEVICE)
    got, got_grad = forward_backward(lambda t: entmax_rows(t, keep, kind, alpha=alpha, chunk=chunk), x, dy)
    want, want_grad = forward_backward(lambda t: topk_path(kind, alpha, t, keep), x, dy)
    assert torch.equal(got > 0, want > 0), "the supports differ"
    assert (got - want).abs().max() < 1e-12
    # α > 2: g = p^(2-α) grows without bound as p -> 0, so the last-bit differences of a small p (the two paths
    # bisect with different brackets) reach ~1e-11 in the gradient
    assert (got_grad - want_grad).abs().max() < (1e-12 if alpha <= 2 else 1e-9)
    assert torch.all(got[~keep] == 0) and torch.all(got_grad[~keep] == 0)
    assert torch.all(got[1] == 0) and torch.all(got_grad[1] == 0)  # no allowed score: zeros, not NaN
    if chunk is not None:  # some rows fail the long-row path's certificate, some pass it
        fails = certificate_fails(x, keep, want, chunk)
        assert fails.any() and not fails.all(), fails


GRADCHECK_CASES = [(*kind, chunk) for kind in KINDS[:3] for chunk in (None, 4)][:-1]  # α's long rows: too slow


@pytest.mark.parametrize("kind,alpha,chunk", GRADCHECK_CASES, ids=[f"{k}-{a}-{c}" for k, a, c in GRADCHECK_CASES])
def test_the_row_kernels_backward_passes_gradcheck(kind, alpha, chunk):
    """Finite differences, not the top-k path: the backward's Jacobian is the forward's derivative. Scores spaced
    apart, so that no step of 1e-6 carries one across its row's threshold. (General α on the long-row path bisects
    50 times per sweep: a minute and a half under the interpreter; its gradient is compared with the top-k path's
    above.)"""
    g = torch.Generator().manual_seed(5)
    x = (torch.randperm(3 * 10, generator=g).double().view(3, 10) * 0.15).to(DEVICE).requires_grad_()
    keep = torch.ones(3, 10, dtype=torch.bool, device=DEVICE)
    keep[1, 7:] = False
    fn = lambda t: entmax_rows(t, keep, kind, alpha=alpha, chunk=chunk)  # noqa: E731
    assert (fn(x.detach()) > 0).sum(-1).min() > 1  # nontrivial supports
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


def certificate_fails(x, keep, p, chunk):
    """Rows where a column of the chunks (scores ``c, c + chunk, ...``) has three allowed scores in the support: its
    two candidates cannot hold the support, so the long-row path must sweep the row again."""
    length = x.shape[1]
    pad = -length % chunk
    in_support = torch.nn.functional.pad((p > 0) & keep, (0, pad)).view(x.shape[0], -1, chunk)
    return (in_support.sum(1) >= 3).any(-1)


@pytest.mark.parametrize("ensure_sum_one", [True, False])
def test_general_alpha_follows_entmax_bisects_iterations_and_normalisation(ensure_sum_one):
    """A few halvings leave τ short of the row's: the result then depends on n_iter and the bracket, as
    entmax_bisect's does (rows held whole use its bracket, that of the whole row)."""
    entmax_pkg = pytest.importorskip("entmax")
    x, _ = rows_input(8, 40)
    got = entmax_rows(x, None, "entmax_alpha", alpha=1.7, n_iter=6, ensure_sum_one=ensure_sum_one)
    want = entmax_pkg.entmax_bisect(x.cpu(), alpha=1.7, n_iter=6, ensure_sum_one=ensure_sum_one)
    assert (got.cpu() - want).abs().max() < 1e-12
    sums = got.sum(-1)
    assert torch.allclose(sums, torch.ones_like(sums)) == ensure_sum_one


@pytest.mark.parametrize("chunk", [None, 16], ids=["whole-rows", "long-row-path"])
def test_a_nan_score_makes_its_row_nan_and_leaves_the_others(chunk):
    """As the top-k path: a NaN is not silently dropped (a GPU's max and min pass over NaN, so the kernel checks)."""
    x, keep = rows_input(6, 70, torch.float32)
    x[4, 33] = float("nan")
    keep[4, 33] = True  # a masked NaN is masked (-inf), here as on the top-k path
    for kind, alpha in KINDS:
        got = entmax_rows(x, keep, kind, alpha=alpha, chunk=chunk)
        assert torch.isnan(got[4]).all(), kind
        others = [0, 1, 2, 3, 5]
        assert (got[others] - topk_path(kind, alpha, x[others], keep[others])).abs().max() < 1e-6, kind


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_and_single_precision_scores_keep_their_dtype_and_the_topk_paths_result(dtype):
    x, keep = rows_input(16, 70, dtype)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    got, got_grad = forward_backward(lambda t: entmax_rows(t, keep, "entmax15"), x, dy)
    want, want_grad = forward_backward(lambda t: topk_path("entmax15", 1.5, t, keep), x, dy)
    assert got.dtype == dtype and got_grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bfloat16: probabilities rounded to 8 bits
    assert (got.float() - want.float()).abs().max() < tol
    assert (got_grad.float() - want_grad.float()).abs().max() < 10 * tol
    if dtype == torch.float32:
        assert torch.equal(got > 0, want > 0)


def test_the_public_functions_run_the_kernel_on_any_dim_with_a_broadcast_mask():
    g = torch.Generator().manual_seed(3)
    scores = (torch.randn(2, 3, 20, 5, generator=g, dtype=torch.float64) * 2).to(DEVICE)
    keep = (torch.rand(2, 1, 20, 1, generator=g) > 0.3).to(DEVICE)  # broadcast: rows of the (rows, L) view repeat
    for fn, kwargs in ((entmax15, {}), (sparsemax, {}), (entmax_alpha, {"alpha": 1.4})):
        x = scores.clone().requires_grad_()
        got = fn(x, dim=2, keep=keep, backend="triton", **kwargs)
        (got_grad,) = torch.autograd.grad(got, x, torch.ones_like(got).cumsum(2))
        x = scores.clone().requires_grad_()
        want = fn(x, dim=2, keep=keep, backend="topk", **kwargs)
        (want_grad,) = torch.autograd.grad(want, x, torch.ones_like(want).cumsum(2))
        assert (got - want).abs().max() < 1e-12, fn.__name__
        assert (got_grad - want_grad).abs().max() < 1e-12, fn.__name__
        assert torch.all(got.masked_select(~keep.expand_as(got)) == 0)


def test_auto_keeps_the_topk_path_off_cuda_and_for_a_tensor_alpha(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the row kernel ran")

    monkeypatch.setattr(entmax_topk, "_triton_rows", refuse)
    x, keep = rows_input(4, 30, torch.float32)
    if DEVICE == "cpu":
        assert torch.isfinite(entmax15(x.cpu(), keep=keep.cpu())).all()
    alpha = torch.full((4, 1), 1.3, device=DEVICE)
    assert torch.isfinite(entmax_alpha(x, alpha, keep=keep)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto picks the row kernel on CUDA only")
def test_auto_runs_the_row_kernel_on_cuda_without_reading_the_device(monkeypatch):
    calls = []
    real = entmax_topk._triton_rows
    monkeypatch.setattr(entmax_topk, "_triton_rows", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    x, keep = rows_input(4, 30, torch.float32)
    x.requires_grad_()
    torch.cuda.set_sync_debug_mode("error")  # a read of the device raises: the "no host syncs"
    try:
        entmax15(x, keep=keep).sum().backward()
        sparsemax(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert calls == ["entmax15", "sparsemax"]


def test_bad_backend_requests_say_what_would_run(monkeypatch):
    x, _ = rows_input(4, 30, torch.float32)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'topk', 'triton'\), got 'fast'"):
        entmax15(x, backend="fast")
    with pytest.raises(ValueError, match="tensor alpha .* runs on backend='topk'"):
        entmax_alpha(x, torch.full((4, 1), 1.3, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="chunk must be a power of two, got 24"):
        entmax_rows(x, None, "entmax15", chunk=24)
    with pytest.raises(ValueError, match=r"kind must be one of .*got 'softmax'"):
        entmax_rows(x, None, "softmax")
    with pytest.raises(ValueError, match=r"\(R, L\) keep mask or None, got \(\(4, 30\), \(4, 29\)\)"):
        entmax_rows(x, torch.ones(4, 29, dtype=torch.bool, device=DEVICE), "entmax15")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="backend='triton' is not possible here: .*TRITON_INTERPRET"):
            sparsemax(x, backend="triton")


def test_rows_are_held_whole_up_to_the_limit_and_swept_in_chunks_beyond():
    for length in (70, 1024, WHOLE_ROW):
        rows, chunk, whole, warps = _layout(length, None)
        assert whole and chunk >= length and rows * chunk >= min(chunk, 2048) and warps in (1, 2, 4, 8, 16)
    rows, chunk, whole, warps = _layout(WHOLE_ROW + 1, None)
    assert (rows, chunk, whole) == (1, LONG_ROW_CHUNK, False) and warps in (1, 2, 4, 8, 16)
    assert _layout(70, 16)[:3] == (1, 16, False)
    assert _layout(1, None)[:3] == (128, 16, True)  # one score per row: a 16-wide tile, mostly masked


def test_rows_of_one_and_two_scores():
    x, keep = rows_input(6, 2)
    for length in (1, 2):
        for kind, alpha in KINDS:
            got = entmax_rows(x[:, :length].contiguous(), keep[:, :length].contiguous(), kind, alpha=alpha)
            want = topk_path(kind, alpha, x[:, :length], keep[:, :length])
            assert (got - want).abs().max() < 1e-12, (length, kind)
