"""Row-wise exact α-entmax of materialised scores in one Triton launch: :mod:`hf_sparse.entmax_topk`'s result
without its host reads.

On a GPU, :mod:`hf_sparse.entmax_topk`'s torch path is launch-bound: one ``entmax15`` call issues about 85
kernel launches and reads the device twice (its sampled ``k``, and whether any row failed the certificate), so at
``L = 1024`` it ran level with the ``entmax`` package (1.67 against 1.63 ms, 16 x 1024 rows, H200) where softmax
takes 0.08 ms. Here one program takes ``ROWS`` rows (:func:`_layout`) and one launch does the whole call:

- **Rows up to** :data:`WHOLE_ROW` **scores** are loaded once and held in registers. Each row's τ is found
  there: Newton on ``Σ p̃(τ) = 1`` from τ = -1 (on the ``x = (α-1)(s - max)`` scale, the τ of the largest score
  alone, which the row's is at least), checking at each step whether the closed form of ``entmax.entmax15`` /
  ``entmax.sparsemax`` on ``S = {x > τ}`` keeps all of ``S``: then it is the row's τ, exactly (the attention
  kernel's fallback step, ``_newton_step``; on random normal rows of 128 to 8192 scores, 4-6 steps on average
  and at most 8, counted by replaying the steps in numpy). General α:
  ``entmax_bisect``'s bisection with its bracket, ``n_iter`` halvings. Then ``p`` is written: the scores are
  read once and ``p`` written once.
- **Longer rows** are swept in chunks of :data:`LONG_ROW_CHUNK`: a first sweep keeps each row's two largest scores
  per column of the chunks and the largest score it let go of (the attention kernel's ``bound`` pass, on
  materialised scores); the τ of those candidates, found in registers, is a lower bound of the row's, and the
  row's own when the score let go of lies below it (:mod:`hf_sparse.entmax_topk`'s certificate). Rows failing it
  sweep their scores again, one Newton step (bisection halving) per sweep. A last sweep writes ``p``.

The backward is one launch too: ``dX = g ⊙ dY - (Σ g dY / Σ g) g`` with ``g = p^{2-α}`` from the saved output
(which ``p @ V`` holds anyway: no memory of its own). Exactness is :mod:`hf_sparse.entmax_topk`'s: the same
closed forms on the same support (summed in another order, so values agree to rounding, ~1e-7 in float32).
float16/bfloat16 scores are computed in float32 and written in their dtype, float64 in float64.

Not timed on a GPU yet (``scripts/benchmark_gpu.py`` runs it beside the top-k path and the package). Remote
code: torch and the standard library at import; triton on first use, through :mod:`hf_sparse.entmax_triton`.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .entmax_triton import (  # `from .x import` form: remote code copies x
    FALLBACK_ITERATIONS,
    FALLBACK_TOLERANCE,
    _launch_options,
    _load_kernels,
    _on,
    _tl_dtype,
    triton_next_power_of_2,
    unavailable_reasons,
)

__all__ = ["KINDS", "entmax_rows", "unavailable_reasons"]

KINDS = {"entmax15": 0, "sparsemax": 1, "entmax_alpha": 2}
# Rows of at most this many scores are held whole in registers (16 per thread at 16 warps); longer ones are swept in
# chunks of LONG_ROW_CHUNK, keeping two candidates per column of a chunk (a certificate for nearly every random
# row: their τ is that of the row's 2·LONG_ROW_CHUNK scores best spread over its columns).
WHOLE_ROW = 8192
LONG_ROW_CHUNK = 2048
MIN_CHUNK = 16  # the narrowest row a program holds (Triton's smallest comfortable tile width)
PROGRAM_SCORES = 2048  # short rows: several to a program, about this many scores in all
# warps = scores held / (32 · this), from 1 to 16. Compiled for sm_90 (rows whose length is not a multiple of 16,
# as attention's are), 16 took 229-252 registers per thread for rows of 64-128 scores and 192 for rows of 16 or
# fewer (two programs per SM); 8 takes 40-128 at every length, with no spill but 4 bytes at 8191 (16 warps).
SCORES_PER_THREAD = 8


def _layout(length: int, chunk: int | None) -> tuple[int, int, bool, int]:
    """``(rows per program, chunk, whole, warps)`` for rows of ``length`` scores; ``chunk`` (a power of two)
    forces the chunk (tests reach the long-row path at small sizes with it)."""
    if chunk is None:
        chunk = max(MIN_CHUNK, triton_next_power_of_2(length)) if length <= WHOLE_ROW else LONG_ROW_CHUNK
    whole = length <= chunk
    rows = max(1, PROGRAM_SCORES // chunk) if whole else 1
    held = rows * chunk * (1 if whole else 2)
    warps = min(16, max(1, held // (32 * SCORES_PER_THREAD)))
    return rows, chunk, whole, 1 << (warps.bit_length() - 1)


class _EntmaxRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, kind, alpha, n_iter, ensure_sum_one, chunk):
        r, length = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        rows, chunk, whole, warps = _layout(length, chunk)
        am1 = alpha - 1
        candidates = length if whole else min(2 * chunk, length)
        keep_u8 = keep.view(torch.uint8) if keep is not None else x
        out = torch.empty_like(x)
        with _on(x.device):
            _load_kernels().rows_forward_kernel[(_cdiv(r, rows),)](
                x, keep_u8, out, r, length, x.stride(0),
                keep_u8.stride(0) if keep is not None else 0, keep_u8.stride(1) if keep is not None else 0,
                am1, 1 / am1, (1 / candidates) ** am1, (1 / length) ** am1, FALLBACK_TOLERANCE[acc], n_iter,
                ACC=_tl_dtype(acc), KIND=kind, HAS_KEEP=keep is not None, ENSURE_SUM_ONE=ensure_sum_one,
                ROWS=rows, CHUNK=chunk, WHOLE=whole, STEPS=FALLBACK_ITERATIONS[False][acc], num_warps=warps,
                **_launch_options("rows_forward_kernel"),
            )
        ctx.save_for_backward(out)
        ctx.setup = (kind, alpha, acc, rows, chunk, whole, warps)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (p,) = ctx.saved_tensors
        kind, alpha, acc, rows, chunk, whole, warps = ctx.setup
        dy = dy.contiguous()
        dx = torch.empty_like(p)
        r, length = p.shape
        with _on(p.device):
            _load_kernels().rows_backward_kernel[(_cdiv(r, rows),)](
                p, dy, dx, r, length, p.stride(0), dy.stride(0), dx.stride(0), 2 - alpha,
                ACC=_tl_dtype(acc), KIND=kind, ROWS=rows, CHUNK=chunk, WHOLE=whole, num_warps=warps,
                **_launch_options("rows_backward_kernel"),
            )
        return dx, None, None, None, None, None, None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def entmax_rows(
    x: torch.Tensor,
    keep: torch.Tensor | None,
    kind: str,
    alpha: float = 1.5,
    n_iter: int = 50,
    ensure_sum_one: bool = True,
    chunk: int | None = None,
) -> torch.Tensor:
    """α-entmax of each row of the contiguous ``(R, L)`` scores ``x`` (``keep``: an ``(R, L)`` bool mask or None),
    as :mod:`hf_sparse.entmax_topk`'s functions, which check the arguments and call this on CUDA. ``kind``: a key of
    :data:`KINDS` (``alpha`` and ``n_iter``/``ensure_sum_one`` matter for ``"entmax_alpha"`` only); ``chunk``: see
    :func:`_layout`. Differentiable with respect to ``x``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if x.dim() != 2 or (keep is not None and keep.shape != x.shape):
        got = tuple(x.shape), None if keep is None else tuple(keep.shape)
        raise ValueError(f"entmax_rows takes (R, L) scores and an (R, L) keep mask or None, got {got}")
    x = x.contiguous()
    reasons = unavailable_reasons(x.device)
    if reasons:
        raise ValueError("the Triton row kernel cannot run here: " + "; ".join(reasons))
    if chunk is not None and (chunk < 1 or chunk & (chunk - 1)):
        raise ValueError(f"chunk must be a power of two, got {chunk}")
    alpha = {"entmax15": 1.5, "sparsemax": 2.0}.get(kind, float(alpha))
    return _EntmaxRows.apply(x, keep, KINDS[kind], alpha, int(n_iter), bool(ensure_sum_one), chunk)
