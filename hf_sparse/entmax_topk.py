"""Exact α-entmax along one dim at a fraction of the ``entmax`` package's cost: solve each slice on its top-k.

1.5-entmax attention keeps few keys per query (random normal logits, ``L = 2048``: median support 21 at std 1,
3 at std 4), yet ``entmax.entmax15`` sorts every whole row and ``entmax.entmax_bisect`` bisects over it. Here a
row of length ``L`` is solved on its ``k + 1`` largest scores only:

1. **Top-(k+1) through group maxima** (:func:`_topk`). The row is cut into groups of ``c = 4`` adjacent scores;
   one vectorised ``max_pool1d`` pass gives the group maxima, the ``k + 1`` groups with the largest maxima are
   found the same way (recursively, while the row is long), and ``torch.topk`` runs on their ``4(k + 1)``
   scores only (one 16-byte gather per group). The ``k + 1`` largest scores lie in those groups, so this is the
   row's exact top-(k+1); per-row ``torch.topk`` work drops from ``L`` to a few times ``k`` scores.
2. **Threshold on the k largest.** 1.5-entmax: the sort-based closed form of ``entmax.entmax15``, on the ``k``
   sorted values (``z = (x - max) / 2``; cumulative mean and mean of squares; ``δ = (1 - ss) / ρ``;
   ``τ_ρ = mean_ρ - sqrt(max(δ_ρ, 0))``; support ``s = #{ρ : τ_ρ ≤ z_ρ}``; ``τ = τ_s``), the same operations
   in the same order (the tests find float32 and float64 outputs equal to the package's). Sparsemax (α = 2):
   ``entmax.sparsemax``'s closed form likewise (``τ = (Σ_{ρ≤s} z_ρ - 1) / s``). α-entmax:
   ``entmax_bisect``'s bisection on the ``k`` values (with the bracket of a ``k``-element problem).
3. **Certificate.** The top-k solution is the solution of the whole row iff no other score would enter the
   support: ``z_{k+1} ≤ τ`` (bisection: ``(α - 1)·x_{k+1} - τ_lo ≤ 0``, ``τ_lo`` the bisection's lower end).
   Then every KKT condition of the full problem holds, so the result is exact, not an approximation.
4. **Retry.** Rows failing the certificate (collected over the whole tensor after the first pass, with one read
   of the device) are solved again with a larger ``k``. The top-k threshold is a lower bound of the row's
   (adding scores only raises it), so ``n = #{x > τ_k}`` bounds the support and ``k' = max(2k, n)`` (rounded up
   to a power of two; rows bucketed by ``k'``, or all at the largest on an accelerator) passes; ``k' ≥ L``
   sorts the whole row, which needs no certificate. The loop always ends; ``k`` only changes the speed.

**Choice of k** (:func:`estimate_k`): unless given, the exact support sizes of up to 32 evenly spaced rows
(full sort of those rows only) are measured and ``k`` is their 90 % quantile (twice that on an accelerator)
rounded up to a multiple of 8 (at least 8): rows with larger supports take the retry path.

**Backends.** On CUDA with triton installed the public functions run, by default, the one-launch Triton row kernel
of :mod:`hf_sparse.entmax_rows_triton` instead (the same closed forms and certificate, no host read); ``backend=
"topk"`` keeps this module's path there, and a tensor α always takes it. What follows is this module's path.

**Devices** (:func:`_device_policy`). On the CPU, rows are processed in chunks of about :data:`CHUNK_ELEMENTS`
scores, so every intermediate stays small (no page faults on fresh large buffers, which cost more than the
arithmetic here), and reading the device to pick the faster solver per chunk is free. On an accelerator every
op is a kernel launch and every read of device data drains its queue: there all rows go in one chunk (unless
its copies would pass 1/16 of the memory), the masked solver runs always, and a call with ``k`` given reads the
device once (did any row fail?), twice with ``k=None``; the launches do not depend on the number of rows.

The output is scattered into zeros (exact zeros off the support). The backward pass reads only the stored
``k`` slots per row: 1.5-entmax ``dX = dY·s - (Σ dY·s / Σ s)·s`` with ``s = sqrt(p)``; sparsemax with ``s`` the
support indicator; α-entmax the same with ``s = p^(2-α)``, and ``entmax_bisect``'s gradient for a tensor ``alpha``.

Masks: ``keep`` (bool, broadcastable to the scores, False = masked) sets masked scores to ``-inf`` (per chunk)
before the top-k; ``-inf`` never enters a support and a slice with no finite score gives zeros (no NaN, also in the
backward). float16/bfloat16 scores are selected in their own dtype (same order), every computation on the
candidates runs in float32 and the result is cast back.

Remote code (copied next to checkpoints): torch and the standard library only. Data-dependent control flow:
``torch.compile`` graph-breaks around these functions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["entmax15", "entmax_alpha", "estimate_k", "sparsemax"]

GROUP = 4  # scores per group in _topk
GROUP_MIN_RATIO = 8  # group only rows at least this many times longer than the number of values wanted
SAMPLE_ROWS = 32  # rows whose exact support sizes choose k
SAMPLE_QUANTILE = 0.9
K_MULTIPLE = 8  # k is rounded up to a multiple of this (and is at least this)
CHUNK_ELEMENTS = 2**23  # rows are processed in chunks of about this many scores (half that with a mask)
MAX_CHUNKS = 8  # ... but in at most this many chunks (each costs a few dozen small ops)


class _Policy(NamedTuple):
    """How the work is cut on one kind of device (see :func:`_device_policy`)."""

    chunk_elements: int  # rows are processed in chunks of about this many scores (half that with a mask)
    max_chunks: int  # ... but in at most this many chunks (0: no limit)
    branch_free: bool  # solvers always take the masked path instead of reading the device to choose one
    group_levels: int  # grouping levels of _topk at most
    one_retry_bucket: bool  # retried rows in one pass at the largest k they need, not bucketed by k
    k_margin: float  # k=None: the sampled support quantile times this


_CPU_POLICY = _Policy(CHUNK_ELEMENTS, MAX_CHUNKS, False, group_levels=64, one_retry_bucket=False, k_margin=1.0)
ACCELERATOR_MEMORY_DEFAULT = 2**34  # bytes assumed on an accelerator that does not report its memory


def _accelerator_policy(memory_bytes: int) -> _Policy:
    """A GPU runs the small ops in microseconds but each costs a launch, and a host read of device data (a sync)
    drains its queue: so one chunk of rows unless a chunk's copies (a masked copy of the scores, the group
    maxima) would pass about 1/16 of the memory, the masked solvers always (no read to choose one), one
    grouping level, retried rows in one pass, and a sampled k twice as large: a retry (two host reads and a
    hundred launches) costs more than twice the candidates (a few more scores per row in the top-k)."""
    return _Policy(max(1, memory_bytes // 64), 0, True, group_levels=1, one_retry_bucket=True, k_margin=2.0)


def _device_policy(device: torch.device) -> _Policy:
    """The CPU keeps its chunking (bounded page faults, cheap host reads); any other device is an accelerator.
    The one place that tells them apart (tests force the accelerator policy on CPU tensors through it)."""
    if device.type == "cpu":
        return _CPU_POLICY
    if device.type == "cuda":
        return _accelerator_policy(torch.cuda.get_device_properties(device).total_memory)
    return _accelerator_policy(ACCELERATOR_MEMORY_DEFAULT)


# --------------------------------------------------------------------------------------------------------------
# Exact top-m of each row through group maxima
# --------------------------------------------------------------------------------------------------------------


_UNIT_DTYPES = {4: torch.complex128, 2: torch.int64}  # element size -> a dtype holding GROUP elements (16 / 8 B)


def _as_groups(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` (R, L) viewed as (R, L / GROUP) units of GROUP adjacent elements (one gather moves a whole group)."""
    unit = _UNIT_DTYPES.get(x.element_size())
    if unit is None or x.shape[1] % GROUP or x.stride(1) != 1 or x.stride(0) % GROUP or x.storage_offset() % GROUP:
        return None
    return x.view(unit)


def _topk(x: torch.Tensor, m: int, sorted: bool = True, levels: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``m`` largest values of each row of a 2-D ``x`` (the values of ``torch.topk``) and their columns.

    At most ``levels`` grouping levels (0: ``torch.topk`` on the whole rows).

    If ``L`` is not a multiple of :data:`GROUP` the last group is short: its missing slots read ``-inf`` with a
    repeated column index, so they are returned only when a row has fewer than ``m`` values above ``-inf``.
    Results are therefore written with ``scatter_add`` (such slots always carry 0).
    """
    rows, length = x.shape
    if levels < 1 or length < GROUP_MIN_RATIO * m:
        return torch.topk(x, m, dim=-1, sorted=sorted)
    group_max = F.max_pool1d(x.unsqueeze(1), GROUP, GROUP, ceil_mode=True).squeeze(1)
    _, top_groups = _topk(group_max, m, sorted=False, levels=levels - 1)
    units = _as_groups(x)
    if units is not None:  # gather whole groups: m 16-byte (or 8-byte) units per row
        candidates = units.gather(1, top_groups).view(x.dtype)
        values, j = torch.topk(candidates, m, dim=-1, sorted=sorted)
        return values, top_groups.gather(1, j // GROUP) * GROUP + j % GROUP
    pos = (top_groups.unsqueeze(-1) * GROUP + torch.arange(GROUP, device=x.device)).view(rows, m * GROUP)
    if length % GROUP:
        outside = pos >= length
        pos = pos.clamp(max=length - 1)
        candidates = x.gather(1, pos).masked_fill(outside, float("-inf"))
    else:
        candidates = x.gather(1, pos)
    values, j = torch.topk(candidates, m, dim=-1, sorted=sorted)
    return values, pos.gather(1, j)


# --------------------------------------------------------------------------------------------------------------
# Solvers on sorted candidates. v: (r, k) sorted descending, compute dtype, -inf = masked. rest: (r,) the
# (k+1)-th largest score, or None when v is the whole row; special: whether to take the masked path (see
# _special). Return p (r, k) on the candidates, ok (r,) the certificate, cut (r,) in score units: scores <= cut
# are certainly outside the row's support (sizes retries).
# --------------------------------------------------------------------------------------------------------------


def _special(v, policy: _Policy) -> bool:
    """Whether sorted candidates need the masked path: they may hold -inf (masked) or NaN scores. The masked
    path is exact on every row; the plain one is faster but the choice reads the device, so only the CPU makes
    it."""
    return policy.branch_free or not bool(torch.isfinite(v[:, [0, -1]]).all())


def _solve15(v, rest, alpha, special):
    if special:
        return _solve15_masked(v, rest)
    vmax = v[:, :1]
    z = (v - vmax) / 2
    tau_star = _tau15(z)
    p = torch.clamp(z - tau_star, min=0) ** 2
    ok = None if rest is None else ((rest.unsqueeze(-1) - vmax) / 2 <= tau_star).squeeze(-1)
    return p, ok, (vmax + 2 * tau_star).squeeze(-1)


def _tau15(z, valid=None):
    """The closed form of entmax.entmax15 (same operations, same order) on sorted ``z``; (r, 1) thresholds."""
    rho = torch.arange(1, z.shape[1] + 1, device=z.device, dtype=z.dtype)
    mean = z.cumsum(-1) / rho
    mean_sq = (z**2).cumsum(-1) / rho
    ss = rho * (mean_sq - mean**2)
    delta = (1 - ss) / rho
    tau = mean - torch.sqrt(torch.clamp(delta, 0))
    support = tau <= z
    support = (support if valid is None else support & valid).sum(-1, keepdim=True)
    return tau.gather(-1, (support - 1).clamp(min=0))


def _solve_sparsemax(v, rest, alpha, special):
    """The closed form of entmax.sparsemax (same operations, same order) on sorted candidates."""
    valid = v > float("-inf") if special else None
    vmax = v[:, :1].masked_fill(~valid[:, :1], 0.0) if special else v[:, :1]
    z = torch.where(valid, v - vmax, 0.0) if special else v - vmax
    cumsum = z.cumsum(-1) - 1
    rho = torch.arange(1, z.shape[1] + 1, device=z.device, dtype=z.dtype)
    support = rho * z > cumsum
    size = (support if valid is None else support & valid).sum(-1, keepdim=True)
    tau = cumsum.gather(-1, (size - 1).clamp(min=0)) / size.clamp(min=1).to(z.dtype)
    p = torch.clamp(z - tau, min=0)
    ok = None if rest is None else (rest.unsqueeze(-1) - vmax <= tau)
    if special:
        return _finish(v, torch.where(valid, p, 0.0), ok, vmax + tau)
    return p, None if ok is None else ok.squeeze(-1), (vmax + tau).squeeze(-1)


def _solve15_masked(v, rest):
    valid = v > float("-inf")
    vmax = v[:, :1].masked_fill(~valid[:, :1], 0.0)  # a fully masked row: any finite value, its p is 0
    z = torch.where(valid, (v - vmax) / 2, 0.0)
    tau_star = _tau15(z, valid)
    p = torch.where(valid, torch.clamp(z - tau_star, min=0) ** 2, 0.0)
    return _finish(v, p, None if rest is None else (rest.unsqueeze(-1) - vmax) / 2 <= tau_star, vmax + 2 * tau_star)


def _finish(v, p, ok, cut):
    """NaN scores (sorted first by topk) make their row NaN on its slots and need no retry."""
    nan_row = torch.isnan(v[:, :1])
    p = p.masked_fill(nan_row, float("nan"))
    ok = None if ok is None else (ok | nan_row).squeeze(-1)
    return p, ok, cut.squeeze(-1)


def _bisect_solver(n_iter: int, ensure_sum_one: bool, length: int):
    def solve(v, rest, alpha, special):
        am1 = alpha - 1  # float, or (r, 1)
        if special:
            valid = v > float("-inf")
            x = torch.where(valid, v * am1, float("-inf"))
            max_val = torch.where(valid[:, :1], v[:, :1] * am1, 0.0)
        else:
            x = v * am1
            max_val = x[:, :1]
        d = length if rest is None else v.shape[1]  # at most d positive entries: τ <= max - (1/d)^(α-1)
        tau_lo = max_val - 1
        dm = (max_val - (1 / d) ** am1) - tau_lo
        exponent = 1 / am1  # once, not per step (a launch per step for a tensor α); n_iter >= 1 sets p
        for _ in range(n_iter):
            dm = dm / 2
            tau_m = tau_lo + dm
            p = torch.clamp(x - tau_m, min=0) ** exponent
            tau_lo = torch.where(p.sum(-1, keepdim=True) >= 1, tau_m, tau_lo)
        if ensure_sum_one:
            p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
        ok = None if rest is None else rest.unsqueeze(-1) * am1 - tau_lo <= 0
        if special:
            return _finish(v, p, ok, tau_lo / am1)
        return p, None if ok is None else ok.squeeze(-1), (tau_lo / am1).squeeze(-1)

    return solve


# --------------------------------------------------------------------------------------------------------------
# Driver: first pass, certificate, retries. A segment (rows, idx, p): rows (r,) indices into the (R, L) matrix
# (None = all rows of a chunk), idx (r, k) columns, p (r, k). Later segments are added on top of earlier ones
# (which carry zeros for the rows they hand on).
# --------------------------------------------------------------------------------------------------------------


def _subset(aux, index):
    return aux[index] if isinstance(aux, torch.Tensor) else aux


def _pass(xs, k, solve, aux, compute_dtype, policy):
    """One pass over the rows ``xs`` (r, L) with k candidates, without reading the device: columns (r, k),
    probabilities (r, k), the certificate ``ok`` (r,) and ``cut`` (r,) (both None when k >= L: whole rows are
    sorted, which needs no certificate)."""
    if k >= xs.shape[1]:
        values, idx = torch.sort(xs, dim=-1, descending=True)
        values = values.to(compute_dtype)
        p, _, _ = solve(values, None, aux, _special(values, policy))
        return idx, p, None, None
    values, idx = _topk(xs, k + 1, levels=policy.group_levels)
    values = values.to(compute_dtype)
    p, ok, cut = solve(values[:, :k], values[:, k], aux, _special(values[:, :k], policy))
    return idx[:, :k], p, ok, cut


def _support_bound(xs, cut, compute_dtype):
    """``#{x > cut}`` per row: at least the row's support size, as ``cut`` is at most its threshold."""
    return (xs.to(compute_dtype) > cut.unsqueeze(-1)).sum(-1)


def _retry(xs, rows, bound, k, solve, aux, compute_dtype, policy, segments):
    """Solve again the rows ``rows`` (indices into the whole matrix; ``xs`` their masked scores) that failed the
    certificate with ``k`` candidates, with ``k' = max(2k, bound)`` rounded up to a power of two (at most L),
    bucketed by ``k'`` or, on an accelerator, all at the largest ``k'`` (fewer launches and host reads). Appends
    (rows, idx, p) segments. The uncommon path: it reads the device (sizes, certificates)."""
    k_next = 2 ** torch.ceil(torch.log2(torch.clamp(bound, min=2 * k).double())).long()
    k_next = torch.clamp(k_next, max=xs.shape[1])
    if policy.one_retry_bucket:
        buckets = [(None, int(k_next.max()))]
    else:
        buckets = [((k_next == kb).nonzero().squeeze(1), kb) for kb in torch.unique(k_next).tolist()]
    for local, kb in buckets:
        xb, sel = (xs, rows) if local is None else (xs[local], rows[local])
        idx, p, ok, cut = _pass(xb, int(kb), solve, _subset(aux, sel), compute_dtype, policy)
        segments.append((sel, idx, p))
        if ok is None:
            continue
        failed = (~ok).nonzero().squeeze(1)
        if failed.numel():
            p[failed] = 0  # these rows are written by the next retry
            xf = xb[failed]
            bound = _support_bound(xf, cut[failed], compute_dtype)
            _retry(xf, sel[failed], bound, int(kb), solve, aux, compute_dtype, policy, segments)


def _write(out, segments):
    """Add the segments' values into ``out`` (a chunk of rows, already zeroed)."""
    for rows, idx, val in segments:
        if rows is None:
            out.scatter_add_(1, idx, val.to(out.dtype))
        else:
            out.index_put_((rows.unsqueeze(1), idx), val.to(out.dtype), accumulate=True)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise TypeError(f"entmax needs floating point scores, got {dtype}")
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _masked(x, keep, rows):
    """Rows ``rows`` (a slice or an index tensor) of ``x`` with the masked entries set to -inf."""
    return x[rows] if keep is None else torch.where(keep[rows], x[rows], float("-inf"))


def _quantile(values: list[int], q: float) -> float:
    """``torch.quantile``'s linear interpolation, on the host (the sizes are read once; no more launches).

    Rounded to 6 decimals: with whole values and ``q`` in tenths the exact result is in tenths, so float error
    (e.g. 32.000000000000014) cannot carry it past a multiple of :data:`K_MULTIPLE`."""
    values = sorted(values)
    position = q * (len(values) - 1)
    below = math.floor(position)
    above = min(below + 1, len(values) - 1)
    return round(values[below] + (values[above] - values[below]) * (position - below), 6)


def _sample_k(x, keep, solve, aux, compute_dtype, policy) -> int:
    """k from the exact support sizes of evenly spaced rows of ``x`` (R, L): see :func:`estimate_k`. One host
    read (the sizes). The rounded indices are distinct (spacing >= 1 from 32 rows on, 0..R-1 below).

    The plain solver serves every row here: only the support sizes are used, and -inf scores (sorted last) only
    turn the thresholds after the finite ones into NaN, which count as outside; a fully masked or NaN row gets
    NaN, which counts as an empty support, as on the masked path."""
    rows, length = x.shape
    index = torch.linspace(0, rows - 1, min(rows, SAMPLE_ROWS), device=x.device).round().long()
    values, _ = torch.sort(_masked(x, keep, index), dim=-1, descending=True)
    p, _, _ = solve(values.to(compute_dtype), None, _subset(aux, index), False)
    guess = policy.k_margin * _quantile((p > 0).sum(-1).tolist(), SAMPLE_QUANTILE)
    return min(length, max(K_MULTIPLE, K_MULTIPLE * math.ceil(guess / K_MULTIPLE)))


def _chunks(x: torch.Tensor, keep: torch.Tensor | None, policy: _Policy):
    """Row ranges of about ``policy.chunk_elements`` scores (half that with a mask), at most
    ``policy.max_chunks`` of them (0: no limit)."""
    rows, length = x.shape
    step = max(1, policy.chunk_elements // (length * (2 if keep is not None else 1)))
    if policy.max_chunks:
        step = max(step, -(-rows // policy.max_chunks))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _true_rows(flags: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` True entries of ``flags`` (ascending), without a second host read where the
    device has ``nonzero_static`` (CPU, CUDA)."""
    if flags.device.type in ("cpu", "cuda"):
        return torch.nonzero_static(flags, size=count).squeeze(1)
    return flags.nonzero().squeeze(1)


def _forward(x, keep, k, solve, aux, policy, invalid=None):
    """Solve every row of ``x`` (R, L): a first pass chunk by chunk, one host read (did any row fail the
    certificate?), then one retry over the failed rows of all chunks. Returns the output and the blocks
    ``(r0, r1, segments)`` for the backward pass; the last block, for the retried rows, has ``r0 = None`` and
    row indices into the whole matrix. ``invalid``: a bool tensor (a tensor α's check, see
    :func:`_invalid_alpha`) read in the same host read; True raises."""
    compute_dtype = _compute_dtype(x.dtype)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    blocks, oks, cuts = [], [], []
    for r0, r1 in _chunks(x, keep, policy):
        rows = slice(r0, r1)
        idx, p, ok, cut = _pass(_masked(x, keep, rows), k, solve, _subset(aux, rows), compute_dtype, policy)
        out_chunk = out[r0:r1]
        out_chunk.zero_()
        _write(out_chunk, [(None, idx, p)])
        blocks.append((r0, r1, [(None, idx, p)]))
        oks.append(ok)
        cuts.append(cut)
    if oks[0] is None:  # k >= L: whole rows sorted, no certificate to read
        if invalid is not None and bool(invalid):
            raise ValueError(_ALPHA_ERROR)
        return out, blocks
    failed = ~oks[0] if len(oks) == 1 else ~torch.cat(oks)
    if invalid is None:
        n_failed = int(failed.sum())  # the host read of the common path
    else:
        n_failed, n_invalid = torch.stack([failed.sum(), invalid.long()]).tolist()
        if n_invalid:
            raise ValueError(_ALPHA_ERROR)
    if n_failed:
        rows = _true_rows(failed, n_failed)  # ascending
        for r0, r1, [(_, idx, p)] in blocks:  # zero the failed rows' first-pass slots: the retry writes them
            local = rows - r0 if len(blocks) == 1 else rows[(rows >= r0) & (rows < r1)] - r0
            out[r0:r1][local.unsqueeze(1), idx[local]] = 0
            p[local] = 0
        cut = cuts[0] if len(cuts) == 1 else torch.cat(cuts)
        xs = _masked(x, keep, rows)
        segments = []
        bound = _support_bound(xs, cut[rows], compute_dtype)
        _retry(xs, rows, bound, k, solve, aux, compute_dtype, policy, segments)
        _write(out, segments)
        blocks.append((None, None, segments))
    return out, blocks


def _backward_blocks(dy, blocks, grad_slots):
    """dX from the stored slots: ``grad_slots(dy_slots, value_slots, rows_or_slice) -> dx_slots`` per segment."""
    grad = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
    for r0, r1, segments in blocks:
        if r0 is None:  # retried rows: global indices, added on top (their first-pass slots carry zeros)
            for rows, idx, val in segments:
                dx = grad_slots(dy[rows.unsqueeze(1), idx].to(val.dtype), val, rows)
                grad.index_put_((rows.unsqueeze(1), idx), dx.to(grad.dtype), accumulate=True)
            continue
        grad_chunk = grad[r0:r1]
        grad_chunk.zero_()
        for _, idx, val in segments:
            dx = grad_slots(dy[r0:r1].gather(1, idx).to(val.dtype), val, slice(r0, r1))
            grad_chunk.scatter_add_(1, idx, dx.to(grad.dtype))
    return grad


def _grad_closed_form(dy, s, rows):
    """Closed-form backward on the slots: dX = dY·s - (Σ dY·s / Σ s)·s, with s = 1/g''(p) = sqrt(p) for 1.5-entmax
    and the support indicator for sparsemax (0 off the support)."""
    g = dy * s
    return g - g.sum(-1, keepdim=True) / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny) * s


# closed-form normalisers: solver on sorted candidates, and s = 1/g''(p) for the backward
_CLOSED_FORMS = {
    "entmax15": (_solve15, torch.sqrt),
    "sparsemax": (_solve_sparsemax, lambda p: (p > 0).to(p.dtype)),
}


class _ClosedFormTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, k, kind):
        solve, _ = _CLOSED_FORMS[kind]
        policy = _device_policy(x.device)
        if k is None:
            k = _sample_k(x, keep, solve, None, _compute_dtype(x.dtype), policy)
        # backward needs p on the stored slots only (intermediates: kept on ctx, not save_for_backward); s = 1/g''(p)
        # is computed there, so a forward without grad launches nothing for it
        out, ctx.blocks = _forward(x, keep, min(k, x.shape[1]), solve, None, policy)
        ctx.kind = kind
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        gppr = _CLOSED_FORMS[ctx.kind][1]
        grad = _backward_blocks(dy, ctx.blocks, lambda dyk, p, rows: _grad_closed_form(dyk, gppr(p), rows))
        return grad, None, None, None


class _EntmaxAlphaTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, alpha_rows, alpha_float, k, n_iter, ensure_sum_one):
        compute_dtype = _compute_dtype(x.dtype)
        alpha = alpha_float if alpha_rows is None else alpha_rows.to(compute_dtype)
        policy = _device_policy(x.device)
        if k is None:
            sample_solve = _bisect_solver(min(n_iter, 30), False, x.shape[1])
            k = _sample_k(x, keep, sample_solve, alpha, compute_dtype, policy)
        solve = _bisect_solver(n_iter, ensure_sum_one, x.shape[1])
        invalid = None if alpha_rows is None else _invalid_alpha(alpha_rows)
        out, ctx.blocks = _forward(x, keep, min(k, x.shape[1]), solve, alpha, policy, invalid)
        ctx.alpha_float = alpha_float
        ctx.save_for_backward(alpha_rows)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (alpha_rows,) = ctx.saved_tensors
        need_alpha = alpha_rows is not None and ctx.needs_input_grad[2]
        d_alpha = torch.zeros(dy.shape[0], 1, dtype=torch.float64, device=dy.device) if need_alpha else None

        def grad_slots(dyk, p, rows):
            """entmax_bisect's backward on the slots (gppr = p^(2-α)), and its d/dα (zero off the support)."""
            tiny = torch.finfo(p.dtype).tiny
            alpha = ctx.alpha_float if alpha_rows is None else alpha_rows[rows].to(p.dtype)
            positive = p > 0
            gppr = torch.where(positive, p.clamp_min(tiny) ** (2 - alpha), 0.0)
            g = dyk * gppr
            gppr_sum = gppr.sum(-1, keepdim=True).clamp_min(tiny)
            if need_alpha:
                plogp = torch.where(positive, p * torch.log(p.clamp_min(tiny)), 0.0)
                skewed = gppr / gppr_sum
                da = dyk * (p - skewed) / (alpha - 1) ** 2
                da = da - dyk * (plogp - skewed * plogp.sum(-1, keepdim=True)) / (alpha - 1)
                d_alpha[rows] += da.sum(-1, keepdim=True).double()  # retried rows: first pass added zeros
            return g - g.sum(-1, keepdim=True) / gppr_sum * gppr

        grad = _backward_blocks(dy, ctx.blocks, grad_slots)
        d_alpha = d_alpha.to(alpha_rows.dtype) if need_alpha else None
        return grad, None, d_alpha, None, None, None, None


# --------------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------------


def _to_rows(scores: torch.Tensor, dim: int, keep: torch.Tensor | None):
    """``scores`` with ``dim`` last as a contiguous (rows, L) matrix, ``keep`` likewise (or None), the moved
    shape and the dim. The mask is applied later, chunk by chunk (no masked copy of the whole tensor)."""
    if scores.dim() == 0:
        raise ValueError("entmax needs a tensor with at least one dimension")
    if not -scores.dim() <= dim < scores.dim():
        raise ValueError(f"dim={dim} is out of range for scores with {scores.dim()} dimensions")
    dim = dim % scores.dim()
    last = dim == scores.dim() - 1
    x = scores if last else scores.movedim(dim, -1)
    moved = x.shape
    rows = math.prod(moved[:-1])
    if keep is not None:
        keep = torch.as_tensor(keep, device=scores.device)
        if keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor (True = kept), got {keep.dtype}")
        try:
            fits = torch.broadcast_shapes(keep.shape, scores.shape) == scores.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"keep of shape {tuple(keep.shape)} does not broadcast to scores {tuple(scores.shape)}")
        keep = keep.expand(scores.shape)
        keep = (keep if last else keep.movedim(dim, -1)).reshape(rows, moved[-1])
    return x.reshape(rows, moved[-1]).contiguous(), keep, moved, dim


def _from_rows(p: torch.Tensor, moved: torch.Size, dim: int) -> torch.Tensor:
    p = p.view(moved)
    return p if dim == p.dim() - 1 else p.movedim(-1, dim)


def _check_k(k: int | None) -> int | None:
    if k is not None and int(k) < 1:
        raise ValueError(f"k must be a positive int or None, got {k}")
    return None if k is None else int(k)


_ALPHA_ERROR = "alpha must be finite and > 1 (alpha = 1 is softmax: use torch.softmax)"


def _invalid_alpha(alpha_rows: torch.Tensor) -> torch.Tensor:
    """Whether any α is <= 1 or not finite, as a device tensor: it is read with the certificate (no read of its
    own on a GPU), and the call raises then (the work done with a bad α is thrown away)."""
    return ((alpha_rows <= 1) | ~torch.isfinite(alpha_rows)).any()


def _alpha_rows(alpha: torch.Tensor, scores: torch.Tensor, dim: int) -> torch.Tensor:
    """One α per slice: ``alpha`` broadcast to ``scores.shape`` with size 1 along ``dim``, as a (rows, 1) column
    (not checked: see :func:`_invalid_alpha`)."""
    alpha = alpha.to(device=scores.device)
    ndim, dim = scores.dim(), dim % scores.dim()
    row_shape = list(scores.shape)
    row_shape[dim] = 1
    alpha = alpha.reshape((1,) * (ndim - alpha.dim()) + tuple(alpha.shape)).expand(row_shape)
    return (alpha if dim == ndim - 1 else alpha.movedim(dim, -1)).reshape(-1, 1)


BACKENDS = ("auto", "topk", "triton")


def _use_triton(x: torch.Tensor, backend: str, tensor_alpha: bool = False) -> bool:
    """Whether a call runs the Triton row kernel (:mod:`hf_sparse.entmax_rows_triton`): ``"triton"`` asks for it
    (and says why it cannot run, if it cannot), ``"topk"`` for the torch path of this module, ``"auto"`` takes the
    kernel on CUDA where triton is installed (one launch and no host read, where this module's path issues about
    85 launches and one or two reads) and this module's path elsewhere. A tensor α (one per slice, with its
    gradient) runs here only."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "topk" or (backend == "auto" and (x.device.type != "cuda" or tensor_alpha)):
        return False
    if tensor_alpha:
        raise ValueError("backend='triton' takes a float alpha; a tensor alpha (one per slice) runs on backend='topk'")
    from .entmax_rows_triton import unavailable_reasons  # `from .x import` form: remote code copies x

    reasons = unavailable_reasons(x.device)
    if reasons and backend == "triton":
        raise ValueError("backend='triton' is not possible here: " + "; ".join(reasons))
    return not reasons


def _triton_rows(x, keep, kind, **kwargs):
    from .entmax_rows_triton import entmax_rows  # `from .x import` form: remote code copies x

    return entmax_rows(x, keep, kind, **kwargs)


def entmax15(
    scores: torch.Tensor,
    dim: int = -1,
    keep: torch.Tensor | None = None,
    k: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact 1.5-entmax of ``scores`` along ``dim``: the result of ``entmax.entmax15``, from each slice's top-k.

    Args:
        scores: floating tensor; float16/bfloat16 are computed in float32 and returned in their dtype.
        dim: the dimension normalised over.
        keep: optional bool tensor broadcastable to ``scores``; False entries get probability 0 and zero gradient
            (padding, causal or sparse patterns). A slice with nothing kept is all zeros. ``-inf`` scores count as
            masked too.
        k: first guess of the support size per slice; ``None`` measures it on a sample of slices
            (:func:`estimate_k`). Only the speed depends on it: slices with a larger support are redone. The
            top-k path's only (the Triton kernel needs no guess).
        backend: ``"auto"`` (the Triton row kernel of :mod:`hf_sparse.entmax_rows_triton` on CUDA where triton is
            installed, the top-k path of this module elsewhere), ``"topk"`` or ``"triton"`` (an error says why
            where it cannot run). Both are exact.

    Differentiable with respect to ``scores``; the top-k path's backward touches only the ``k`` stored slots per
    slice, the kernel's reads the output.
    """
    x, keep, moved, dim = _to_rows(scores, dim, keep)
    k, triton_rows = _check_k(k), _use_triton(x, backend)
    if x.numel() == 0:
        return _from_rows(x.new_zeros(x.shape), moved, dim)
    if triton_rows:
        return _from_rows(_triton_rows(x, keep, "entmax15"), moved, dim)
    return _from_rows(_ClosedFormTopK.apply(x, keep, k, "entmax15"), moved, dim)


def sparsemax(
    scores: torch.Tensor,
    dim: int = -1,
    keep: torch.Tensor | None = None,
    k: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact sparsemax (2-entmax) of ``scores`` along ``dim``: ``entmax.sparsemax``'s result, from the top-k.

    Same arguments and guarantees as :func:`entmax15`; the certificate is ``x_{k+1} - max ≤ τ``.
    """
    x, keep, moved, dim = _to_rows(scores, dim, keep)
    k, triton_rows = _check_k(k), _use_triton(x, backend)
    if x.numel() == 0:
        return _from_rows(x.new_zeros(x.shape), moved, dim)
    if triton_rows:
        return _from_rows(_triton_rows(x, keep, "sparsemax"), moved, dim)
    return _from_rows(_ClosedFormTopK.apply(x, keep, k, "sparsemax"), moved, dim)


ALPHA_MAX = 1e6  # measured: float32 bisection returns all zeros from α = 1e7 (float64 still exact)


def entmax_alpha(
    scores: torch.Tensor,
    alpha: float | torch.Tensor = 1.5,
    dim: int = -1,
    keep: torch.Tensor | None = None,
    k: int | None = None,
    n_iter: int = 50,
    ensure_sum_one: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """α-entmax of ``scores`` along ``dim`` by bisection on each slice's top-k: ``entmax.entmax_bisect``'s result.

    Args:
        scores, dim, keep, k: as in :func:`entmax15`.
        alpha: α > 1; a float, or a tensor broadcastable to ``scores`` with size 1 along ``dim`` (one α per slice,
            as in ``entmax_bisect``). A tensor that requires grad gets ``entmax_bisect``'s gradient.
        n_iter, ensure_sum_one: as in ``entmax_bisect``. The bisection runs on the candidates, with the bracket of
            the k-element problem, so in float32 the result agrees with ``entmax_bisect`` to rounding (~1e-7).
        backend: as in :func:`entmax15`; a tensor ``alpha`` runs on ``"topk"`` only.

    The support is certified as in :func:`entmax15`: ``(α - 1)·x_{k+1} ≤ τ_lo``, with ``τ_lo`` the bisection's
    lower end (a lower bound of the top-k threshold). For α = 1.5, :func:`entmax15` is exact and faster.
    """
    if isinstance(alpha, torch.Tensor):
        alpha_rows, alpha_float = _alpha_rows(alpha, scores, dim), None
    else:
        alpha_rows, alpha_float = None, float(alpha)
        if not 1 < alpha_float <= ALPHA_MAX:
            raise ValueError(
                f"alpha must be > 1 and <= {ALPHA_MAX:g}, got {alpha} (1 is softmax: use torch.softmax; beyond "
                f"{ALPHA_MAX:g} float32 bisection collapses, and the result is argmax to float precision anyway)"
            )
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a whole number >= 1 (bisection steps), got {n_iter!r}")
    x, keep, moved, dim = _to_rows(scores, dim, keep)
    k, triton_rows = _check_k(k), _use_triton(x, backend, tensor_alpha=alpha_rows is not None)
    if x.numel() == 0:
        if alpha_rows is not None and bool(_invalid_alpha(alpha_rows)):
            raise ValueError(_ALPHA_ERROR)
        return _from_rows(x.new_zeros(x.shape), moved, dim)
    if triton_rows:
        p = _triton_rows(x, keep, "entmax_alpha", alpha=alpha_float, n_iter=n_iter, ensure_sum_one=ensure_sum_one)
        return _from_rows(p, moved, dim)
    p = _EntmaxAlphaTopK.apply(x, keep, alpha_rows, alpha_float, k, n_iter, ensure_sum_one)
    return _from_rows(p, moved, dim)


@torch.no_grad()
def estimate_k(
    scores: torch.Tensor, alpha: float | torch.Tensor = 1.5, dim: int = -1, keep: torch.Tensor | None = None
) -> int:
    """The ``k`` that :func:`entmax15` / :func:`entmax_alpha` choose when ``k=None``.

    Exact support sizes of up to :data:`SAMPLE_ROWS` evenly spaced slices (each fully sorted), their
    :data:`SAMPLE_QUANTILE` quantile (twice that for tensors on an accelerator, where retrying a slice costs
    more than a larger k) rounded up to a multiple of :data:`K_MULTIPLE` (at least that, at most the slice
    length). Compute it once (e.g. per layer on a typical batch) and pass ``k=`` to skip the sampling: one read
    of the device per call fewer on a GPU.
    """
    x, keep, _, _ = _to_rows(scores.detach(), dim, keep)
    if x.numel() == 0:
        return 1
    compute_dtype = _compute_dtype(x.dtype)
    if isinstance(alpha, torch.Tensor):
        solve, aux = _bisect_solver(30, False, x.shape[1]), _alpha_rows(alpha, scores, dim)
        if bool(_invalid_alpha(aux)):
            raise ValueError(_ALPHA_ERROR)
    elif float(alpha) == 1.5:
        solve, aux = _solve15, None
    else:
        solve, aux = _bisect_solver(30, False, x.shape[1]), float(alpha)
    return _sample_k(x, keep, solve, aux, compute_dtype, _device_policy(x.device))
