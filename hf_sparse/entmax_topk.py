"""Exact α-entmax over one dim at near-softmax cost: solve on each row's top-k scores, then prove it was enough.

Attention rows under 1.5-entmax keep a few dozen of their ``L`` keys at most (on random normal logits with
``L = 2048``: median support 3-21, maximum ≤ 55). The ``entmax`` package sorts or bisects the whole row anyway.
Here each row works on its ``k + 1`` largest scores only:

1. **Top-(k+1), exactly, without a full-row ``topk``.** The row is cut into ``G = L / c`` strided groups
   ``{g, g + G, g + 2G, …}``; one vectorised pass takes every group's maximum, the ``k + 1`` groups with the
   largest maxima are chosen (recursively, the same way) and a plain ``torch.topk`` runs on their ``(k + 1)·c``
   elements only. The ``k + 1`` largest elements of a row lie in at most ``k + 1`` groups, namely the groups
   with the ``k + 1`` largest maxima, so the result *is* the row's top-(k+1) (:func:`exact_topk`).
2. **Threshold on the candidates.** 1.5-entmax: the sort-based closed form of ``entmax.entmax15`` on the ``k``
   sorted values (``z = (x - max) / 2``, cumulative mean and mean of squares, ``δ = (1 - ss) / ρ``,
   ``τ_ρ = mean_ρ - sqrt(max(δ_ρ, 0))``, support ``= #{ρ : τ_ρ ≤ z_ρ}``). Any α > 1 (:func:`entmax_alpha`):
   the bisection of ``entmax.entmax_bisect`` on the ``k`` candidates.
3. **Certificate.** The threshold ``τ_k`` of the top-k problem is the exact threshold of the full row iff no
   other element would enter the support, i.e. iff the (k+1)-th largest score is at or below it
   (``z_{k+1} ≤ τ_k``; bisection form ``(α - 1)·x_{k+1} - τ ≤ 0``). Then every KKT condition of the full
   problem holds and the output equals the full solution (exact in exact arithmetic; in floating point it is
   the same sequence of operations as the package's sort, see ``tests/test_entmax_topk.py``).
4. **Fallback.** Rows failing the certificate are solved again with a larger ``k``: ``τ_k`` is a lower bound
   of the true threshold (adding elements only raises it), so ``n = #{x > τ_k}`` bounds the support and
   ``k' = max(2k, n)`` (rounded up to a power of two, rows bucketed by ``k'``) passes; at ``k' ≥ L`` the row is
   fully sorted and needs no certificate. The loop always ends.

Outputs are scattered back into zeros (exact zeros off the support). The backward pass uses only the stored
``k`` slots per row: 1.5-entmax ``dX = dY·s - (Σ dY·s / Σ s)·s`` with ``s = sqrt(p)``, α-entmax the same with
``s = p^(2-α)``, plus ``entmax_bisect``'s gradient with respect to a tensor ``alpha``.

Masks: ``keep`` (bool, broadcastable to the scores, False = masked out) sets masked scores to ``-inf`` before the
top-k; ``-inf`` scores are never in the support and a row with no finite score gives zeros (no NaN, also in the
backward). float16/bfloat16 scores are selected in their own dtype (the order is the same) and every
computation on the candidates runs in float32; the result is cast back.

This module is imported by remote code next to checkpoints: torch and the standard library only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["DEFAULT_K", "entmax15", "entmax_alpha", "initial_k"]

DEFAULT_K = 32
"""First guess of the support size (candidates per row, before the (k+1)-th used by the certificate).

Chosen from measured supports: random normal logits, ``L = 2048``, std 1: median 21, 99 % ≤ 38, max 55;
std 4: max 15; scores captured from a trained entmax BERT: see ``benchmarks/entmax_cpu.md``. A wrong guess
costs time, never exactness: rows with a larger support are redone (see the module docstring)."""

MIN_GROUP = 4  # smallest group size c; rows shorter than 2·MIN_GROUP·m use plain torch.topk
MAX_GROUP = 16


def initial_k(length: int, k: int | None = None) -> int:
    """Candidates per row for the first pass: ``k`` (default :data:`DEFAULT_K`) capped at the row length."""
    k = DEFAULT_K if k is None else int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return min(k, length)


def _group_size(length: int, m: int) -> int:
    """Group size c (a power of two, 1 = no grouping): L / c group maxima, then m·c candidates."""
    if length < 2 * MIN_GROUP * m:
        return 1
    c = 2 ** round(math.log2(math.sqrt(length / m)))
    return max(MIN_GROUP, min(c, MAX_GROUP))


def _topk(x: torch.Tensor, m: int, sorted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` largest values of each row of a 2-D ``x`` and their column indices (``torch.topk`` values).

    Long rows go through contiguous groups of ``c``: their maxima come from one vectorised ``max_pool1d`` pass,
    the ``m`` groups with the largest maxima are found the same way (recursively), and ``torch.topk`` runs on
    their ``m·c`` elements only; the ``m`` largest elements of a row lie in those ``m`` groups. If ``L`` is not a
    multiple of ``c`` the last group is short: its missing slots read as ``-inf`` with a repeated column index, so
    they can only be returned when the row has fewer than ``m`` values above ``-inf``. Callers write results
    with ``scatter_add`` (those slots always carry 0).
    """
    rows, length = x.shape
    c = _group_size(length, m)
    if c == 1:
        return torch.topk(x, m, dim=-1, sorted=sorted)
    group_max = F.max_pool1d(x.unsqueeze(1), c, c, ceil_mode=True).squeeze(1)
    _, top_groups = _topk(group_max, m, sorted=False)
    pos = (top_groups.unsqueeze(-1) * c + torch.arange(c, device=x.device)).view(rows, m * c)
    if length % c:
        outside = pos >= length
        pos = pos.clamp(max=length - 1)
        candidates = x.gather(1, pos).masked_fill(outside, float("-inf"))
    else:
        candidates = x.gather(1, pos)
    values, j = torch.topk(candidates, m, dim=-1, sorted=sorted)
    return values, pos.gather(1, j)


# ---------------------------------------------------------------------------------------------------------------
# Per-candidate solvers. Input: v (r, k) sorted descending (compute dtype, -inf = masked), rest (r,) an upper
# bound of every other element of the row (None when v is the whole row), aux (alpha rows or None).
# Output: p (r, k) probabilities on the candidates, ok (r,) certificate, cut (r,) in score units: every element
# with x <= cut is certainly outside the support of the full row (used to size the retry).
# ---------------------------------------------------------------------------------------------------------------


def _solve15(v, rest, aux):
    valid = v > float("-inf")
    vmax = v[:, :1].masked_fill(~valid[:, :1], 0.0)  # fully masked row: any finite value, p is 0 anyway
    z = torch.where(valid, (v - vmax) / 2, 0.0)
    k = v.shape[1]
    rho = torch.arange(1, k + 1, device=v.device, dtype=v.dtype)
    mean = z.cumsum(-1) / rho
    mean_sq = (z**2).cumsum(-1) / rho
    ss = rho * (mean_sq - mean**2)
    delta = (1 - ss) / rho
    tau = mean - torch.sqrt(torch.clamp(delta, 0))
    support = ((tau <= z) & valid).sum(-1, keepdim=True)
    tau_star = tau.gather(-1, (support - 1).clamp(min=0))
    p = torch.where(valid, torch.clamp(z - tau_star, min=0) ** 2, 0.0)
    if rest is None:
        ok = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
    else:
        ok = ((rest.unsqueeze(-1) - vmax) / 2 <= tau_star).squeeze(-1)
    return p, ok, (vmax + 2 * tau_star).squeeze(-1)


def _bisect_solver(n_iter: int, ensure_sum_one: bool, full_length: int):
    def solve(v, rest, alpha):
        am1 = alpha - 1  # float or (r, 1)
        valid = v > float("-inf")
        x = torch.where(valid, v * am1, float("-inf"))
        max_val = torch.where(valid[:, :1], v[:, :1] * am1, 0.0)
        # bracket of entmax_bisect for a problem of d elements: the top-k problem has d = k (the whole row: L)
        d = v.shape[1] if rest is not None else full_length
        tau_lo = max_val - 1
        tau_hi = max_val - (1 / d) ** am1
        dm = tau_hi - tau_lo
        p = torch.zeros_like(x)
        for _ in range(n_iter):
            dm = dm / 2
            tau_m = tau_lo + dm
            p = torch.clamp(x - tau_m, min=0) ** (1 / am1)
            f = p.sum(-1, keepdim=True) - 1
            tau_lo = torch.where(f >= 0, tau_m, tau_lo)
        if ensure_sum_one:
            p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
        if rest is None:
            ok = torch.ones(v.shape[0], dtype=torch.bool, device=v.device)
        else:
            ok = (rest.unsqueeze(-1) * am1 - tau_lo <= 0).squeeze(-1)
        return p, ok, (tau_lo / am1).squeeze(-1)

    return solve


def _solve_rows(xs, k, solve, aux, rows, segments, compute_dtype):
    """Solve the rows ``xs`` (r, L); append ``(rows, idx, p)`` segments, later segments override earlier ones."""
    length = xs.shape[1]
    if k >= length:
        values, idx = torch.sort(xs, dim=-1, descending=True)
        p, _, _ = solve(values.to(compute_dtype), None, aux)
        segments.append((rows, idx, p))
        return
    values, idx = _topk(xs, k + 1)
    values = values.to(compute_dtype)
    p, ok, cut = solve(values[:, :k], values[:, k], aux)
    idx = idx[:, :k]
    if bool(ok.all()):
        segments.append((rows, idx, p))
        return
    bad = (~ok).nonzero().squeeze(1)
    p[bad] = 0  # these rows are written (output and gradient) by the retry below
    segments.append((rows, idx, p))
    xb = xs[bad]
    bound = (xb.to(compute_dtype) > cut[bad].unsqueeze(-1)).sum(-1)  # >= support size (τ_k <= τ)
    want = torch.maximum(bound, torch.full_like(bound, 2 * k))
    bucket = torch.where(want >= length, length, 2 ** torch.ceil(torch.log2(want.double())).long())
    bucket = torch.where(bucket >= length, length, bucket)
    sub_rows = bad if rows is None else rows[bad]
    sub_aux = aux[bad] if isinstance(aux, torch.Tensor) else aux
    for b in torch.unique(bucket).tolist():
        sel = (bucket == b).nonzero().squeeze(1)
        _solve_rows(
            xb[sel],
            int(b),
            solve,
            sub_aux[sel] if isinstance(sub_aux, torch.Tensor) else sub_aux,
            sub_rows[sel],
            segments,
            compute_dtype,
        )


def _scatter(segments, shape, dtype, device):
    out = torch.zeros(shape, dtype=dtype, device=device)
    for rows, idx, val in segments:
        # add, not assign: padding slots repeat a column index with value 0, and rows redone by a later
        # segment carry zeros in the earlier ones
        if rows is None:
            out.scatter_add_(1, idx, val.to(dtype))
        else:
            out.index_put_((rows.unsqueeze(1), idx), val.to(dtype), accumulate=True)
    return out


def _gather(t, rows, idx):
    return t.gather(1, idx) if rows is None else t[rows.unsqueeze(1), idx]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise TypeError(f"entmax needs floating point scores, got {dtype}")
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _flatten_segments(segments):
    tensors, has_rows = [], []
    for rows, idx, val in segments:
        has_rows.append(rows is not None)
        tensors.extend([idx, val] if rows is None else [rows, idx, val])
    return tensors, has_rows


def _unflatten_segments(tensors, has_rows):
    segments, it = [], iter(tensors)
    for with_rows in has_rows:
        rows = next(it) if with_rows else None
        segments.append((rows, next(it), next(it)))
    return segments


class _Entmax15TopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        compute_dtype = _compute_dtype(x.dtype)
        segments = []
        _solve_rows(x, k, _solve15, None, None, segments, compute_dtype)
        # backward needs s = sqrt(p) on the candidate slots only
        saved = [(rows, idx, p.sqrt()) for rows, idx, p in segments]
        tensors, ctx.has_rows = _flatten_segments(saved)
        ctx.save_for_backward(*tensors)
        return _scatter(segments, x.shape, x.dtype, x.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        grads = []
        for rows, idx, s in _unflatten_segments(ctx.saved_tensors, ctx.has_rows):
            g = _gather(dy, rows, idx).to(s.dtype) * s
            q = g.sum(-1, keepdim=True) / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
            grads.append((rows, idx, g - q * s))
        return _scatter(grads, dy.shape, dy.dtype, dy.device), None


class _EntmaxAlphaTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha_rows, alpha_float, k, n_iter, ensure_sum_one):
        compute_dtype = _compute_dtype(x.dtype)
        alpha = alpha_float if alpha_rows is None else alpha_rows.to(compute_dtype)
        solve = _bisect_solver(n_iter, ensure_sum_one, x.shape[1])
        segments = []
        _solve_rows(x, k, solve, alpha, None, segments, compute_dtype)
        tensors, ctx.has_rows = _flatten_segments(segments)
        ctx.alpha_float = alpha_float
        ctx.save_for_backward(alpha_rows if alpha_rows is not None else None, *tensors)
        return _scatter(segments, x.shape, x.dtype, x.device)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        alpha_rows, *tensors = ctx.saved_tensors
        need_alpha = alpha_rows is not None and ctx.needs_input_grad[1]
        grads = []
        d_alpha = torch.zeros(dy.shape[0], 1, dtype=torch.float64, device=dy.device) if need_alpha else None
        for rows, idx, p in _unflatten_segments(tensors, ctx.has_rows):
            if alpha_rows is None:
                alpha = ctx.alpha_float
            else:
                alpha = alpha_rows.to(p.dtype) if rows is None else alpha_rows[rows].to(p.dtype)
            pos = p > 0
            gppr = torch.where(pos, p.clamp_min(torch.finfo(p.dtype).tiny) ** (2 - alpha), 0.0)
            dyk = _gather(dy, rows, idx).to(p.dtype)
            g = dyk * gppr
            gppr_sum = gppr.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
            q = g.sum(-1, keepdim=True) / gppr_sum
            grads.append((rows, idx, g - q * gppr))
            if need_alpha:
                s = torch.where(pos, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), 0.0)
                ent = s.sum(-1, keepdim=True)
                skewed = gppr / gppr_sum
                da = dyk * (p - skewed) / (alpha - 1) ** 2 - dyk * (s - skewed * ent) / (alpha - 1)
                da = da.sum(-1, keepdim=True).double()
                if rows is None:
                    d_alpha = da
                else:
                    d_alpha[rows] = da
        dx = _scatter(grads, dy.shape, dy.dtype, dy.device)
        return dx, (d_alpha.to(alpha_rows.dtype) if need_alpha else None), None, None, None, None


def _to_rows(scores: torch.Tensor, dim: int, keep: torch.Tensor | None):
    """Masked scores with ``dim`` moved last, as a contiguous (rows, L) matrix, and the moved shape."""
    dim = dim % scores.dim()
    x = scores
    if keep is not None:
        keep = torch.as_tensor(keep, device=scores.device)
        if keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor (True = may attend), got {keep.dtype}")
        if torch.broadcast_shapes(keep.shape, scores.shape) != scores.shape:
            raise ValueError(f"keep of shape {tuple(keep.shape)} does not broadcast to scores {tuple(scores.shape)}")
        x = torch.where(keep, x, float("-inf"))
    if dim != x.dim() - 1:
        x = x.movedim(dim, -1)
    moved = x.shape
    return x.reshape(-1, moved[-1]).contiguous(), moved, dim


def _from_rows(p: torch.Tensor, moved: torch.Size, dim: int) -> torch.Tensor:
    p = p.view(moved)
    return p if dim == p.dim() - 1 else p.movedim(-1, dim)


def entmax15(
    scores: torch.Tensor, dim: int = -1, keep: torch.Tensor | None = None, k: int | None = None
) -> torch.Tensor:
    """Exact 1.5-entmax of ``scores`` along ``dim`` (same result as ``entmax.entmax15``), top-k based.

    Args:
        scores: float tensor (float16/bfloat16 computed in float32, returned in their dtype).
        dim: the dimension normalised over.
        keep: optional bool tensor broadcastable to ``scores``; False entries are masked out (probability 0, zero
            gradient). A slice with nothing kept gives zeros. ``-inf`` scores count as masked too.
        k: first guess of the support size per slice (default :data:`DEFAULT_K`); only speed depends on it.

    Differentiable with respect to ``scores`` (backward on the support only). Not ``torch.compile``-friendly
    (data-dependent retries): compiled graphs break around it.
    """
    if scores.dim() == 0:
        raise ValueError("entmax15 needs at least one dimension")
    x, moved, dim = _to_rows(scores, dim, keep)
    if x.numel() == 0:
        return _from_rows(x.new_zeros(x.shape), moved, dim)
    p = _Entmax15TopK.apply(x, initial_k(x.shape[1], k))
    return _from_rows(p, moved, dim)


def entmax_alpha(
    scores: torch.Tensor,
    alpha: float | torch.Tensor = 1.5,
    dim: int = -1,
    keep: torch.Tensor | None = None,
    k: int | None = None,
    n_iter: int = 50,
    ensure_sum_one: bool = True,
) -> torch.Tensor:
    """α-entmax of ``scores`` along ``dim`` by bisection on each slice's top-k: ``entmax.entmax_bisect`` results.

    Args:
        scores, dim, keep, k: as in :func:`entmax15`.
        alpha: α > 1, a float or a tensor broadcastable to ``scores`` with size 1 along ``dim`` (one α per slice,
            as ``entmax_bisect``); a tensor that requires grad gets ``entmax_bisect``'s gradient.
        n_iter, ensure_sum_one: as in ``entmax_bisect`` (the bisection runs on the candidates only, its bracket
            is that of the top-k problem, so in float32 results agree to rounding, ~1e-7).

    The support is certified exactly as in :func:`entmax15` (``(α - 1)·x_{k+1} ≤ τ_lo``, where ``τ_lo`` is the
    bisection's lower end, a lower bound of the top-k threshold). For α = 1.5 prefer :func:`entmax15` (closed form).
    """
    if scores.dim() == 0:
        raise ValueError("entmax_alpha needs at least one dimension")
    ndim = scores.dim()
    dim_pos = dim % ndim
    alpha_rows, alpha_float = None, None
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(device=scores.device)
        if bool((alpha <= 1).any()):
            raise ValueError("alpha must be > 1 (alpha = 1 is softmax: use torch.softmax)")
        row_shape = list(scores.shape)
        row_shape[dim_pos] = 1
        a = alpha.reshape((1,) * (ndim - alpha.dim()) + tuple(alpha.shape)) if alpha.dim() < ndim else alpha
        a = a.expand(row_shape)
        if dim_pos != ndim - 1:
            a = a.movedim(dim_pos, -1)
        alpha_rows = a.reshape(-1, 1)
    else:
        alpha_float = float(alpha)
        if not alpha_float > 1:
            raise ValueError(f"alpha must be > 1 (alpha = 1 is softmax: use torch.softmax), got {alpha}")
    x, moved, dim = _to_rows(scores, dim, keep)
    if x.numel() == 0:
        return _from_rows(x.new_zeros(x.shape), moved, dim)
    p = _EntmaxAlphaTopK.apply(x, alpha_rows, alpha_float, initial_k(x.shape[1], k), n_iter, ensure_sum_one)
    return _from_rows(p, moved, dim)
