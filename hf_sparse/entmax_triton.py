"""Exact α-entmax attention in fused Triton kernels: FlashAttention's memory and tile skipping, entmax's result.

``entmax_attention(q, k, v)`` returns ``entmax(q kᵀ · scale, masked) v`` for ``(B, H, L, D)`` inputs, equal to
:mod:`hf_sparse.entmax_topk` (and the ``entmax`` package) on the dense masked scores, without ever building the
``Lq x Lk`` score matrix. Every query row ``i`` has a threshold ``τ_i``; its probabilities are
``p_ij = [(α-1)(s_ij - m_i) - τ_i]₊^{1/(α-1)}`` (``m_i`` the row's largest score), so once ``τ`` is known the
output is one flash-style pass, and a tile whose largest score is below every row's threshold is skipped.

1. **Threshold pass**, a lower bound of each row's τ or τ itself, in one of three forms (``threshold_pass``; all
   exact, only the speed differs):

   - ``"bound"`` (the default, ``bound_kernel``): one sweep, one per-row reduction per tile. Each row keeps its two
     largest scores in each key column of the tiles (keys ``c, c + BN, c + 2·BN, ...``), two elementwise maxima
     per score; those ``2·BN`` scores are some of the row's, and the τ of any subset of a row's scores is at most
     the row's, so their τ (one sort per query block, then the closed forms; bisection for general α) is a lower
     bound of it. Each row also keeps the largest score it let go of (a column's third): where that lies below
     their τ, no other score enters the support and their τ is the row's, exactly (the certificate); the other
     rows go to the fallback, which starts from that bound. On an H200 at L = 8192 (bf16), before the
     certificate, this sweep took 1.06 ms and the fallback, solving every row, 2.16, against the ``topk`` pass's
     4.50 + 1.86 (``benchmarks/gpu.md``); the certificate passes 58 % of the rows on those inputs
     (``scripts/simulate_threshold_passes.py``).
   - ``"topk"`` (``threshold_kernel``): one sweep keeps each row's ``KC`` largest scores and the largest score it
     left out, ``rest``. A tile whose scores above the current ``KC``-th are few inserts them one round each; one
     with many (the first tiles) is merged by sorting (the elementwise max of a descending and an ascending sorted
     run is the top half of their union). On the candidates: 1.5-entmax and sparsemax by the closed forms of
     ``entmax.entmax15`` / ``entmax.sparsemax`` (cumulative sums by rank, no sort), general α by
     ``entmax_bisect``'s bisection. The certificate of :mod:`hf_sparse.entmax_topk` applies unchanged: if
     ``(α-1)(rest - m) <= τ`` no other key enters the support, so the candidates' τ is the row's τ, exactly; the
     rows that fail it go to the fallback.
   - ``"stream"`` (``stream_kernel``): one sweep without sorting. Each row appends every score above a lower bound
     of its τ, and its key's index, to ``4·KC`` slots in global memory (ranks by a cumulative sum); when a tile
     would overflow some row's slots, the block raises each row's bound to the τ of what it holds (a τ of some of
     the row's scores: never above the row's) and keeps only the scores above it. At the end the slots hold the
     support, whose τ follows exactly (Newton with the closed forms' check, as in the fallback); no certificate,
     and rows whose support outgrows the slots go to the fallback from their bound. Such a row's output then
     comes from step 3; every other row's from its held support directly (``gather_kernel``: ``Σ p v`` over the
     held keys' values, no score recomputed), so the forward sweeps the keys once. Memory: ``B·H·Lq·4·KC``
     scores and key indices (128 MiB at L = 8192, 16 heads), freed after the call.

   Every form also records each tile's largest score (what the later passes' tile lists come from).
2. **Fallback** (``fallback_kernel``): the rows marked for it, gathered 64 to a program from whichever query
   blocks hold them (a block with one marked row no longer sweeps all its keys for it while its other rows wait;
   programs past the last marked row return at once); for the closed forms in two launches, one Newton step for
   every marked row and then the rest for the rows it left unsolved, gathered again. Newton's method
   on ``Σ_j p̃_ij(τ) = 1`` over all the row's keys, a sweep over the key tiles per step, started from the
   threshold pass's lower bound (more scores only raise τ; ``f`` is convex for α <= 2, so the steps approach the
   root from the left; bisection for α > 2). The closed forms stop as soon as the closed form on ``S = {x > τ}``
   (its size, ``Σ (x - τ)`` and ``Σ (x - τ)²``: the Newton step's own sums) keeps all of ``S`` in its support:
   then it is the row's τ, exactly, whatever the support's size.
3. **Output pass** (``forward_kernel``; with ``stream``, only for the rows the fallback solved): ``O = Σ p v``
   over the tiles that can hold a nonzero ``p`` (allowed by causality, padding and the block mask, and with a
   tile maximum above the threshold of some row).
4. **Backward** (``backward_dq_kernel``, ``backward_dkdv_kernel``): scores recomputed tile by tile as in
   FlashAttention; entmax's Jacobian over the support, ``dS = g ⊙ (dP - c)`` with ``g = p^{2-α}`` and
   ``c_i = Σ_j g_ij dP_ij / Σ_j g_ij = dO_i · (Σ_j g_ij v_j) / Σ_j g_ij``, where ``Σ g v`` and ``Σ g`` were
   accumulated by the output pass (O(L·D) memory, no extra sweep).

Tile lists: the fallback, the output pass and the backward do not test each tile inside their loops. Each of these
kernels first writes, for its query block, the key tiles it must read (``_write_tile_list``, from the threshold
pass's tile maxima and the rows' thresholds), and then loops over that list after a barrier, as FlexAttention's
block-sparse kernels loop over their ``kv_indices``; the dQ kernel also writes the dense map from which
``tile_columns_kernel`` makes the dK/dV side's lists. A branch inside a loop keeps Triton from software-pipelining
it (loading the next tile's keys and values while this one is computed): compiled for sm_90, these kernels issue
asynchronous copies only in this form. The threshold pass likewise loops over the allowed tiles' list under a block
mask (written first, ``_write_allowed_list``), and inserts a tile's few newcomers in unrolled rounds rather than a
``while`` loop. Writing the lists inside the sweeps rather than in kernels of their own saves three launches per
forward + backward, which matter where a call is short (decoding one token, short sequences). The lists take
``4·B·H·(Lq/64)·(Lk/64)`` bytes (16 MiB at L = 16384, 16 heads).

Whole tiles: in its list, a sweep reads first the tiles where every pair is allowed for every row of its block (no
padding key, none past a row's causal limit, no element mask: ``_unmasked_tiles``), in a loop without those tests,
then the others with them, as FlashAttention's kernels split off the diagonal blocks. A block's rows past ``Lq``
(the last block of a length that is not a multiple of 64, the one block of a decoding step) do not make it test
every tile: the output pass and the backward read their τ as +inf (zero weights), and the ``bound`` sweep reads them
as copies of the last row, so the tile maxima it writes stay those of real rows. The kernels hold scores as
unscaled products ``q · k`` and take every score's ``d = (α-1)(s - m) - τ`` from the same two explicit fused
multiply-adds (``_distance``): the passes, the tile lists' tests and the fallback's exactness check agree on the
support bit for bit, whichever loop read a tile (and the interpreter rounds them as a GPU does).
Compiled for sm_90 (bf16, 1.5-entmax), a whole key tile costs each thread 322 instructions in the ``bound`` sweep
(251 before its certificate), 476 in a Newton sweep and 354 in dQ, a masked one 394, 550 and 386
(``scripts/kernel_resources.py``; 361, 581 and 431 when every tile was tested and the scores scaled first). The
training forward keeps one loop, 398 (470), without attention dropout: two took 183 registers per thread against
164, one program fewer per SM. With dropout, whose draws take it past 168 registers (two programs per SM) either
way, it splits too: 792 a whole tile against 829, 760 against 955 under a padding mask. dK/dV, whose program holds
a key tile and loops over query tiles, reads first the query tiles some row of which may not see every key (causal:
the diagonal's; with a pair test: all) with the tests, then the others without (``_masked_query_tiles``): rows past
``Lq`` weigh nothing there (τ = +inf), and padding keys' gradients are zeroed after the loop; 518 instructions a
tile (554 with the tests), causal 490 off the diagonal (620). Not yet timed on a GPU.

Masks: ``causal`` (queries are the last ``Lq`` of ``Lk`` positions, as in a decoder with a cache),
``key_lengths`` (padding), ``block_mask`` (allowed tiles: patterns, frozen DAM block masks, Sparsefinder's
predicted blocks; disallowed tiles are never read) and ``keep``: an element mask read only inside allowed tiles,
for patterns whose tiles are partly allowed, or per-token codes (:class:`hf_sparse.pair_codes.PairCodes`:
Sparsefinder's clusters, buckets, distances and window), from which the kernels test each pair of a tile they
read (``_coded_pairs``) and which give the tiles to read themselves, with no ``Lq x Lk`` tensor. A row with no
allowed key is zero, with zero gradients. The models hand padding (and a decoder's causality) over as an element
mask: the keys it keeps for every query, from the first on (a right-padded sequence's real keys), are read as with
``key_lengths``, their whole tiles without a test or a load of the mask, and no tile past the last key it keeps is
read (``_element_mask_keys``, on the device, no sync); only the tiles between read it (and the training forward
without dropout, which keeps one loop, in every tile it reads).

Attention dropout (training) is drawn inside the output pass and redrawn, identically, by the backward: a 16-bit
Philox number per (batch·head, query, key) from a seed taken from torch's generator, as FlashAttention does (it
draws 8 bits), so no mask is stored and the support and thresholds are those of the undropped probabilities. One
Philox draw gives 8 pairs' numbers, laid out the way the tensor cores lay out a tile's scores, so that each thread
draws the numbers of its own scores (``_kept`` in the kernels): with a draw per pair a tile with dropout took 5-7
times the instructions of one without, and 8 adjacent keys per draw needed the numbers moved between threads.

Scores, thresholds and accumulators are float32 (float64 for float64 inputs); bfloat16/float16 inputs go through
the tensor cores as FlashAttention does (``p`` rounded to the input dtype for ``p v``); float32 inputs use full
float32 products unless ``torch.set_float32_matmul_precision("high")`` allows TF32, as for torch's matmuls. On
CUDA the kernels are compiled; on CPU they run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before
the first call), which is how the tests run them. Remote code: torch and the standard library at import; triton
on first use only.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import types

import torch

from .entmax_topk import ALPHA_MAX
from .pair_codes import PairCodes  # `from .x import` form: remote code copies x

__all__ = ["entmax_attention", "unavailable_reasons"]

MASK_BLOCK = 128  # default tile of block_mask: the tile of hf_sparse.block_maps and FlexAttention
# Kernel tiles (rows x keys) and candidates per row. Interpreter: small tiles, so that tests at small L cross tiles.
GPU_BLOCKS = (64, 64, 32)  # tensor-core products: bfloat16, float16, float32 as TF32
# Full-precision float32 (torch's default) and float64 products run on the FMA units, whose lowering of a 64 x 64 x 64
# tl.dot kept operands in local memory: 32 registers and 11-28 KB of stack per thread in the fallback, output and dq
# kernels; at 32 x 32 none, and at most 0.6 KB spilled (sm_90, scripts/kernel_resources.py).
GPU_BLOCKS_FULL_PRECISION = (32, 32, 32)
# Full float32 products run on the CUDA cores, not the tensor cores. Software-pipelined (Triton's default, 3 stages)
# the sm_90 compile of their backward_dkdv_kernel spills 2.8 KB per thread at 64 registers; with one stage (no
# prefetch) it takes 128 registers and no spill. (The other kernels are better pipelined: the fallback and dQ take
# 96 and 92 registers, against 255 with 616 and 372 bytes of spills with one stage: benchmarks/kernel_resources.md)
FULL_PRECISION_DKDV_STAGES = 1
INTERPRETER_BLOCKS = (16, 16, 16)
# Rows that fail the certificate: at most this many passes over their keys (Newton for α <= 2, where a few do;
# bisection for α > 2, halving a bracket narrower than 1 below the accumulator's resolution), and Newton stops at
# steps below this tolerance, relative to |τ|.
SORT_ABOVE = 4  # a key tile bringing more new candidates than this to some row is merged by sorting
INTERPRETER_SORT_ABOVE = 16  # the interpreter sorts slowly (0.2 s a call): there only when a test asks for it
FALLBACK_ITERATIONS = {False: {torch.float32: 30, torch.float64: 50}, True: {torch.float32: 32, torch.float64: 60}}
FALLBACK_TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-14}
# The streaming threshold pass keeps the scores above its lower bound of τ less this much (relative to |τ|, at
# least 1): the bound, a τ computed on a subset of the same scores, may round a few ulps above the row's τ.
BOUND_SLACK = {torch.float32: 1e-5, torch.float64: 1e-12}
STREAM_SLOTS = 4  # the streaming pass holds up to this many times ``candidates`` scores per row
STREAM_STEPS = 8  # Newton steps (bisection: halvings) when it raises its bounds (fewer: looser bounds)
# warps of the streaming kernel: at 4 (Triton's default) it takes 255 registers per thread, two programs per SM; at 16,
# 128 registers (sm_90 compile report, scripts/kernel_resources.py). Which is faster is a GPU's to say
# (scripts/benchmark_stream_slots.py varies it).
STREAM_WARPS = 4
# Warps of code_tiles_kernel (distance codes' exact tiles): a 64 x 64 tile of float64 sums took 255 registers per
# thread and spilled 168 bytes at 4 warps, 128 and none at 8 (sm_90, scripts/kernel_resources.py)
CODE_TILES_WARPS = 8
# An element mask's key bounds (_element_mask_keys: the keys it keeps for every query, and the last it keeps) take
# six to nine small torch launches, tens of microseconds of host time; they are taken from this many (batch, head,
# query, key) pairs on, where the kernels' work is worth them (a padded BERT batch: 32 x 12 x 512 x 512 = 10**8),
# and not for calls whose time is their launches (a Marian decoding step: 16 x 8 x 1 x 64). Not tuned on a GPU. Nor
# for masks that differ by head (Sparsefinder's predicted pairs, DAM masks): padding never does, and reading such a
# mask twice more (0.8 GB at L = 8192, 12 heads) would buy nothing.
ELEMENT_MASK_KEYS_FROM_PAIRS = 1 << 22
# Attention dropout drops a pair when its 16-bit number falls below the probability times this, rounded: the kernels
# split each Philox draw into 16-bit halves, eight pairs a draw (not a setting: _kept in the kernels). FlashAttention's
# CUDA kernels compare 8-bit numbers: a probability in steps of 1/255.
DROP_LEVELS = 1 << 16
# Launch options on top of Triton's defaults (4 warps; registers as ptxas allocates them), by kernel name, e.g.
# {"fallback_kernel": {"maxnreg": 128}}. Registers per thread set how many 4-warp programs an SM holds on sm_90: 4 up
# to 128, 3 up to 168, 2 beyond (scripts/kernel_resources.py reports each kernel's). None is set: which choice is
# faster is a GPU's to say (scripts/benchmark_kernel_versions.py --launch times them against the defaults).
LAUNCH_OPTIONS: dict[str, dict[str, int]] = {}
# Compile options of every launch, whatever Triton's default: fused multiply-adds, which Triton chose by default up to
# 3.9 and with which the kernels were timed and checked on GPUs. Triton 3.10 turns the default off (3.9 warns that it
# will): compiled for sm_90 that lengthens the fallback's loop by 4 % (477 -> 496 instructions a tile), dQ's and
# dK/dV's with dropout likewise (706 -> 738, 905 -> 937), and rounds the kernels' sums differently. The supports do
# not depend on it: every score's distance to τ is two explicit fused multiply-adds (``_distance`` in the kernels).
COMPILE_OPTIONS = {"enable_fp_fusion": True}
TUNABLE_KERNELS = (  # the sweeps benchmark_kernel_versions.py --launch tunes (every kernel takes its LAUNCH_OPTIONS)
    "threshold_kernel", "bound_kernel", "fallback_kernel", "forward_kernel", "backward_dq_kernel",
    "backward_dkdv_kernel",
)
THRESHOLD_PASSES = ("topk", "stream", "bound")
# all three are exact; on an H200 "bound" took 0.50-0.62 of "topk"'s forward time from L = 4096 and 0.65-0.73 of
# its forward + backward ("stream": about 0.9-1.0), and ran level with it when decoding (benchmarks/gpu.md)
DEFAULT_THRESHOLD_PASS = "bound"

_kernels = None


@functools.cache
def _triton_installed() -> bool:
    """Checked once: the attention dispatch asks every forward."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def unavailable_reasons(device: torch.device | str) -> list[str]:
    """Why the fused kernel cannot run on ``device`` here (empty list: it can)."""
    device = torch.device(device)
    reasons = [] if _triton_installed() else ["triton is not installed (pip install triton)"]
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
            reasons.append("on CPU the fused kernel runs only under Triton's interpreter (TRITON_INTERPRET=1, slow)")
        elif _kernels is not None and not _kernels[1]:
            reasons.append("the kernels were loaded for the GPU before TRITON_INTERPRET=1 was set")
    elif device.type != "cuda":
        reasons.append(f"device {device.type!r} is neither CUDA nor the CPU interpreter")
    return reasons


def _load_kernels():
    """The kernel module, imported on first use (``@triton.jit`` reads TRITON_INTERPRET when it is applied)."""
    global _kernels
    if _kernels is None:
        # `from .x import` form: Transformers copies x next to a checkpoint's remote code
        from .entmax_triton_kernels import (
            backward_dkdv_kernel,
            backward_dq_kernel,
            bound_kernel,
            code_tiles_kernel,
            fallback_kernel,
            forward_kernel,
            gather_kernel,
            rows_backward_kernel,
            rows_forward_kernel,
            stream_kernel,
            threshold_kernel,
            tile_columns_kernel,
        )

        kernels = types.SimpleNamespace(
            threshold_kernel=threshold_kernel,
            bound_kernel=bound_kernel,
            stream_kernel=stream_kernel,
            gather_kernel=gather_kernel,
            fallback_kernel=fallback_kernel,
            forward_kernel=forward_kernel,
            backward_dq_kernel=backward_dq_kernel,
            backward_dkdv_kernel=backward_dkdv_kernel,
            tile_columns_kernel=tile_columns_kernel,
            code_tiles_kernel=code_tiles_kernel,  # the exact tiles of distance codes
            rows_forward_kernel=rows_forward_kernel,  # row-wise entmax (hf_sparse.entmax_rows_triton)
            rows_backward_kernel=rows_backward_kernel,
        )
        _kernels = (kernels, os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True"))
    return _kernels[0]


def _kind(alpha) -> int:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a number in (1, {ALPHA_MAX:g}], got {alpha!r}")
    if not 1 < alpha <= ALPHA_MAX:
        raise ValueError(
            f"alpha must be > 1 and <= {ALPHA_MAX:g}, got {alpha} (1 is softmax: use scaled_dot_product_attention)"
        )
    return 0 if alpha == 1.5 else 1 if alpha == 2 else 2


def _broadcast_strides(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride()))


def _check_inputs(q, k, v, key_lengths, block_mask, keep, mask_block):
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a (batch, heads, length, dim) tensor, got {shape}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype or not q.device == k.device == v.device:
        raise ValueError(
            f"query, key, value must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
            f"{q.device}/{k.device}/{v.device}"
        )
    b, h, lq, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h) or k.shape[3] != d or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"shapes do not fit: query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)} (need "
            "query (B, H, Lq, D), key (B, H, Lk, D), value (B, H, Lk, Dv))"
        )
    lk = k.shape[2]
    if key_lengths is not None:
        if not isinstance(key_lengths, torch.Tensor) or key_lengths.shape != (b,) or key_lengths.is_floating_point():
            got = tuple(key_lengths.shape) if isinstance(key_lengths, torch.Tensor) else type(key_lengths).__name__
            raise ValueError(f"key_lengths must be an integer tensor of shape ({b},) (keys per sequence), got {got}")
    if isinstance(mask_block, bool) or not isinstance(mask_block, int) or mask_block < 16 or mask_block % 16:
        raise ValueError(f"mask_block must be a multiple of 16 (the block mask's tile), got {mask_block!r}")
    if block_mask is not None:
        want = (math.ceil(lq / mask_block), math.ceil(lk / mask_block))
        if (
            not isinstance(block_mask, torch.Tensor)
            or block_mask.dtype != torch.bool
            or block_mask.dim() != 4
            or block_mask.shape[0] not in (1, b)
            or block_mask.shape[1] not in (1, h)
            or tuple(block_mask.shape[2:]) != want
        ):
            got = (block_mask.dtype, tuple(block_mask.shape)) if isinstance(block_mask, torch.Tensor) else block_mask
            raise ValueError(
                f"block_mask must be a bool tensor of shape ({b} or 1, {h} or 1, {want[0]}, {want[1]}) (tiles of "
                f"{mask_block}x{mask_block}, True = allowed), got {got}"
            )
    if isinstance(keep, PairCodes):
        keep.check(b, h, lq, lk)
    elif keep is not None:
        if (
            not isinstance(keep, torch.Tensor)
            or keep.dtype != torch.bool
            or keep.dim() != 4
            or keep.shape[0] not in (1, b)
            or keep.shape[1] not in (1, h)
            or tuple(keep.shape[2:]) != (lq, lk)
        ):
            got = (keep.dtype, tuple(keep.shape)) if isinstance(keep, torch.Tensor) else keep
            raise ValueError(
                f"keep must be a bool tensor of shape ({b} or 1, {h} or 1, {lq}, {lk}) (True = allowed) or "
                f"PairCodes, got {got}"
            )


class _EntmaxAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_lengths, block_mask, keep, seed, cfg):
        kernels = _load_kernels()
        b, h, lq, d = q.shape
        lk, dv = k.shape[2], v.shape[3]
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        bm, bn, kc = cfg["blocks"]
        n_qb, n_kb = math.ceil(lq / bm), max(1, math.ceil(lk / bn))
        o = q.new_empty(b, h, lq, dv)
        stats = dict(dtype=acc, device=q.device)
        m = torch.empty(b * h, lq, **stats)
        tau = torch.empty(b * h, lq, **stats)
        lsum = torch.empty(b * h, lq, **stats)
        fail = torch.empty(b * h, lq, dtype=torch.int8, device=q.device)
        tilemax = torch.full((b * h, n_qb, n_kb), float("-inf"), **stats)
        need_g = cfg["need_g"]
        g = torch.empty(b * h, lq, dv, **stats) if need_g else lsum
        gsum = torch.empty(b * h, lq, **stats) if need_g else lsum
        ctx.common = common = _launch_arguments(q, k, v, key_lengths, block_mask, keep, cfg, acc, n_qb, n_kb)
        ctx.cfg = cfg
        seed = q if seed is None else seed  # a placeholder pointer without dropout
        if o.numel() == 0:
            ctx.save_for_backward(q, k, v, m, tau, lsum, g, gsum, tilemax, seed)
            return o
        grid = (n_qb, b * h)
        am1 = cfg["alpha"] - 1
        shared = (*common["qk_strides"], *common["mask_strides"], h, lq, lk, d, common["offset"], n_qb, n_kb,
                  cfg["scale"], am1, 1 / am1)
        with _on(q.device):
            # each query block's list of key tiles, which every sweep writes for itself before reading it
            tiles = torch.empty(b * h, n_qb, n_kb, dtype=torch.int32, device=q.device)
            if cfg["threshold_pass"] == "topk":
                kernels.threshold_kernel[grid](
                    q, k, *common["masks"], m, tau, fail, tilemax, tiles, *shared, (1 / kc) ** am1,
                    KC=kc, N_ITER=cfg["n_iter"], SORT_ABOVE=cfg["sort_above"], **common["meta"],
                    **_launch_options("threshold_kernel"),
                )
            elif cfg["threshold_pass"] == "bound":  # a lower bound of τ per row; the fallback solves every row
                kernels.bound_kernel[grid](  # (2·bn scores per row: its bisection's bracket)
                    q, k, *common["masks"], m, tau, fail, tilemax, tiles, *shared, (1 / (2 * bn)) ** am1,
                    BOUND_SLACK[acc], N_ITER=cfg["n_iter"], **common["meta"], **_launch_options("bound_kernel"),
                )
            else:  # "stream": every score above a rising lower bound of τ held (and its key), no sort
                cap = STREAM_SLOTS * kc
                held = torch.empty(b * h * lq * cap, **stats)
                keys = torch.empty(b * h * lq * cap, dtype=torch.int32, device=q.device)
                count = torch.empty(b * h, lq, dtype=torch.int32, device=q.device)
                kernels.stream_kernel[grid](
                    q, k, *common["masks"], m, tau, fail, tilemax, held, keys, count, *shared, (1 / cap) ** am1,
                    BOUND_SLACK[acc], FALLBACK_TOLERANCE[acc], STEPS=STREAM_STEPS,
                    SOLVE_STEPS=cfg["n_iter"] if cfg["kind"] == 2 else FALLBACK_ITERATIONS[False][acc], CAP=cap,
                    CHUNK=kc, num_warps=STREAM_WARPS, **common["meta"], **_launch_options("stream_kernel"),
                )
            bisect = cfg["alpha"] > 2
            # the fallback's tiles: those where a failed row has a score above its lower bound of τ (lowered by
            # BOUND_SLACK; every allowed one for the bisection, which starts below all of them)
            rows = torch.empty(b * h * n_qb * bm, dtype=torch.int32, device=q.device)  # each program's marked rows
            steps = FALLBACK_ITERATIONS[bisect][acc]
            # the closed forms in two launches where rows of several query blocks can be gathered: one Newton step
            # for every marked row, which solves most, then the rest for the few it left (marked 2). General α: every
            # row takes several steps (no closed form to stop at), and bisection the same number for every row
            two = n_qb > 1 and cfg["kind"] != 2
            stages = [(1, True, 1), (2, False, steps - 1)] if two else [(1, False, steps)]
            for level, mark, n_iter in stages:
                kernels.fallback_kernel[grid](
                    q, k, *common["masks"], m, tau, fail, tilemax, tiles, rows, *common["qk_strides"],
                    *common["mask_strides"],
                    h, lq, lk, d, common["offset"], n_qb, n_kb, cfg["scale"], am1, 1 / am1, (1 / max(lk, 1)) ** am1,
                    FALLBACK_TOLERANCE[acc], BOUND_SLACK[acc], N_ITER=n_iter, BISECT=bisect, LEVEL=level, MARK=mark,
                    **common["meta"], **_launch_options("fallback_kernel"),
                )
            stream = cfg["threshold_pass"] == "stream"
            value_args = (*v.stride(), *o.stride())
            kernels.forward_kernel[grid](  # with "stream": only the rows the fallback solved
                q, k, v, *common["masks"], m, tau, fail, tilemax, tiles, o, lsum, g, gsum, seed,
                *common["qk_strides"], *value_args, *common["mask_strides"],
                h, lq, lk, d, dv, common["offset"], n_qb, n_kb, cfg["scale"], am1, 1 / am1, 2 - cfg["alpha"],
                *common["dropout"], NEED_G=need_g, ONLY_FAILED=stream, **common["value_meta"],
                **_launch_options("forward_kernel"),
            )
            if stream:  # the other rows' output from their held support and its keys' values
                meta = common["value_meta"]
                kernels.gather_kernel[grid](
                    v, m, tau, fail, held, keys, count, o, lsum, g, gsum, seed, *value_args,
                    h, lq, lk, dv, cfg["scale"], am1, 1 / am1, 2 - cfg["alpha"], *common["dropout"],
                    ACC=meta["ACC"], KIND=meta["KIND"], NEED_G=need_g, DROPOUT=meta["DROPOUT"], BM=meta["BM"],
                    BDV=meta["BDV"], CAP=cap, **_launch_options("gather_kernel"),
                )
        ctx.save_for_backward(q, k, v, m, tau, lsum, g, gsum, tilemax, seed)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, m, tau, lsum, g, gsum, tilemax, seed = ctx.saved_tensors
        if q.numel() == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None, None, None
        kernels = _load_kernels()
        cfg, common = ctx.cfg, ctx.common
        b, h, lq, d = q.shape
        lk, dv = k.shape[2], v.shape[3]
        do = do.contiguous()
        # c_i = Σ_j g_ij dP_ij / Σ_j g_ij = dO_i · (Σ_j g_ij v_j) / Σ_j g_ij (0 for a row with no key)
        c = (do.reshape(b * h, lq, dv).to(g.dtype) * g).sum(-1) / torch.where(gsum > 0, gsum, 1)
        dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        am1 = cfg["alpha"] - 1
        n_qb, n_kb = common["n_qb"], common["n_kb"]
        args = (
            *common["qk_strides"], *v.stride(), *do.stride(), *common["mask_strides"],
            h, lq, lk, d, dv, common["offset"], n_qb, n_kb, cfg["scale"], am1, 1 / am1, 2 - cfg["alpha"],
            *common["dropout"],
        )
        with _on(q.device):
            need = torch.empty(b * h, n_qb, n_kb, dtype=torch.int8, device=q.device)
            tiles = torch.empty(b * h, n_qb, n_kb, dtype=torch.int32, device=q.device)
            kernels.backward_dq_kernel[(n_qb, b * h)](  # writes its tile lists and the map `need` first
                q, k, v, do, dq, *common["masks"], m, tau, lsum, c, tilemax, need, tiles, seed, *args,
                **common["value_meta"], **_launch_options("backward_dq_kernel"),
            )
            if lk:
                rows_of = torch.empty(b * h, n_kb, n_qb, dtype=torch.int32, device=q.device)
                n_rows = torch.empty(b * h, n_kb, dtype=torch.int32, device=q.device)
                kernels.tile_columns_kernel[(n_kb, b * h)](need, rows_of, n_rows, n_qb, n_kb,
                                                           **_launch_options("tile_columns_kernel"))
                stages = {"num_stages": FULL_PRECISION_DKDV_STAGES} if full_precision_products(q.dtype) else {}
                stages.update(_launch_options("backward_dkdv_kernel"))
                kernels.backward_dkdv_kernel[(n_kb, b * h)](
                    q, k, v, do, dk, dvv, *common["masks"], m, tau, lsum, c, rows_of, n_rows, seed, *args,
                    **common["value_meta"], **stages,
                )
        return dq, dk, dvv, None, None, None, None, None


def _launch_options(kernel: str) -> dict:
    """What every launch of ``kernel`` passes: :data:`COMPILE_OPTIONS` and its :data:`LAUNCH_OPTIONS` (Triton's
    interpreter takes them and ignores them)."""
    return {**COMPILE_OPTIONS, **LAUNCH_OPTIONS.get(kernel, {})}


def _on(device: torch.device):
    """Launch on the inputs' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _causal_tiles(num_queries: int, num_keys: int, mask_block: int, device: torch.device) -> torch.Tensor:
    """bool ``(ceil(Lq / mask_block), ceil(Lk / mask_block))``: the tiles holding a pair ``causal`` allows (the
    queries are the last of the keys)."""
    n_q, n_k = -(-num_queries // mask_block), -(-num_keys // mask_block)
    last_key = torch.arange(n_q, device=device) * mask_block + mask_block - 1 + num_keys - num_queries
    return torch.arange(n_k, device=device) * mask_block <= last_key[:, None]


def _code_tiles(
    keep: PairCodes, candidates: torch.Tensor, mask_block: int, causal: bool = False, packed: torch.Tensor | None = None
) -> torch.Tensor:
    """bool ``(B', H', n_q, n_k)``: which of the ``mask_block`` tiles ``candidates`` lets through (and, ``causal``,
    that hold a key a query may see) hold a pair the codes allow (:func:`hf_sparse.entmax_triton_kernels.
    code_tiles_kernel`: every pair of those tiles tested, on the device, no sync). For codes whose per-tile bound
    is loose: the threshold pass then reads only these. ``packed``: ``keep.packed()`` on the candidates' device,
    where the caller has it already."""
    device = candidates.device
    codes = keep.packed().to(device) if packed is None else packed
    lq, lk = keep.queries.shape[2], keep.keys.shape[2]
    n_q, n_k = candidates.shape[2:]
    if causal:  # the tiles above the diagonal are never read: not worth testing
        candidates = candidates & _causal_tiles(lq, lk, mask_block, device)
    allowed = candidates.view(torch.uint8)
    b, h = max(codes.shape[0], allowed.shape[0]), max(codes.shape[1], allowed.shape[1])
    out = torch.empty(b, h, n_q, n_k, dtype=torch.int8, device=device)
    _load_kernels().code_tiles_kernel[(n_q, b * h)](
        codes, allowed, out, *_broadcast_strides(codes)[:2], codes.stride(2), lq, *_broadcast_strides(allowed),
        h, lq, lk, n_q, n_k, PAIR_TEST=keep.pair_test(), TILE=mask_block, SUB=min(64, mask_block & -mask_block),
        num_warps=CODE_TILES_WARPS, **_launch_options("code_tiles_kernel"),
    )
    return out.view(torch.bool)


def _launch_arguments(q, k, v, key_lengths, block_mask, keep, cfg, acc, n_qb, n_kb) -> dict:
    """What every kernel launch shares: mask pointers (a placeholder when absent) with broadcast strides, q/k
    strides, the causal offset and the compile-time constants."""
    placeholder = q
    klen = key_lengths.to(device=q.device, dtype=torch.int32) if key_lengths is not None else placeholder
    bmask = block_mask.to(q.device).view(torch.uint8) if block_mask is not None else placeholder
    bms = _broadcast_strides(bmask) if block_mask is not None else (0, 0, 0, 0)
    pair_test = cfg["pair_test"]
    if pair_test >= 2:  # codes, packed (B', H', words + 1, T): words T apart, the keys Lq after the queries
        pair_data = keep
        kps = (*_broadcast_strides(pair_data)[:2], pair_data.stride(2), q.shape[2])
    else:
        pair_data = keep.to(q.device).view(torch.uint8) if keep is not None else placeholder
        kps = _broadcast_strides(pair_data) if keep is not None else (0, 0, 0, 0)
    whole = placeholder
    if pair_test == 1:
        per_head = keep.shape[1] > 1 and keep.stride(1) != 0
        if per_head or math.prod(q.shape[:3]) * k.shape[2] < ELEMENT_MASK_KEYS_FROM_PAIRS:
            # not worth their launches, or each head's own pairs (predicted, DAM), not padding: read in every tile
            whole = _no_keys(q.shape[0], q.device)
        else:  # the keys the element mask keeps for every query, and past which it keeps none
            whole, reach = _element_mask_keys(pair_data.view(torch.bool), cfg["causal"], q.shape[0])
            klen = reach if key_lengths is None else torch.minimum(klen, reach)
    bm, bn, _ = cfg["blocks"]
    p = cfg["dropout"]
    meta = dict(
        ACC=_tl_dtype(acc),
        PREC=_matmul_precision(q.dtype),
        KIND=cfg["kind"],
        BM=bm,
        BN=bn,
        BD=max(16, triton_next_power_of_2(q.shape[3])),
        TQ=cfg["mask_block"],
        TK=cfg["mask_block"],
        CAUSAL=cfg["causal"],
        HAS_KLEN=klen is not placeholder,
        HAS_BMASK=block_mask is not None,
        PAIR_TEST=pair_test,
    )
    return dict(
        masks=(klen, bmask, pair_data, whole),
        qk_strides=(*q.stride(), *k.stride()),
        mask_strides=(*bms, *kps),
        offset=k.shape[2] - q.shape[2],
        n_qb=n_qb,
        n_kb=n_kb,
        # the kernels' threshold on 16-bit draws (p rounded to a multiple of 2^-16) and the kept values' scale
        dropout=(round(p * DROP_LEVELS), 1 / (1 - p) if p < 1 else 0.0),
        meta=meta,
        # the kernels that read values (the output pass and both backward kernels): their tile width and dropout
        value_meta=dict(meta, BDV=max(16, triton_next_power_of_2(v.shape[3])), DROPOUT=p > 0),
    )


def _element_mask_keys(keep: torch.Tensor, causal: bool, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``(batch,)`` twice, per batch row of the element mask ``keep`` ``(B|1, H|1, Lq, Lk)``: how many keys
    from the first on it keeps for every query of every head (``causal``: every query that may see the key), and
    how many from the first on hold every key it keeps for some query. For a padding mask (the models' masks on the
    fused kernel, a decoder's causal one included) those are the real keys up to the first padded one, and up to
    the last real one. The kernels read the first keys' tiles as they read tiles with ``key_lengths``, without a
    test or a load of the mask (``_whole_keys``), take the second as the key lengths (no tile past them is read),
    and read the mask only in the tiles between. Computed on the device in six launches (nine causal), no sync.
    Dimensions ``keep`` broadcasts (stride 0, as ``expand`` makes them) are read once."""
    for dim in range(3):
        if keep.shape[dim] > 1 and keep.stride(dim) == 0:
            keep = keep.narrow(dim, 0, 1)
    lq, lk = keep.shape[2:]
    if lk == 0:
        return _no_keys(batch, keep.device), _no_keys(batch, keep.device)
    some = keep.any(dim=(1, 2))  # (B|1, Lk): keys some query keeps
    if causal and lq > 1:  # the pairs causality removes (key > query + Lk - Lq) need not be kept
        keep = keep | torch.ones(lq, lk, dtype=torch.bool, device=keep.device).triu(lk - lq + 1)
    every = keep.all(dim=(1, 2))  # (B|1, Lk): keys every query keeps
    index = _key_indices(lk + 1, keep.device)
    whole = torch.where(every, lk, index[:-1]).amin(-1)  # the first key not kept for every query
    reach = torch.where(some, index[1:], 0).amax(-1)  # past the last key kept for some query
    return whole.expand(batch).contiguous(), reach.expand(batch).contiguous()


@functools.lru_cache(maxsize=8)
def _key_indices(n: int, device: torch.device) -> torch.Tensor:
    """int32 ``0 .. n - 1``, made once per length."""
    return torch.arange(n, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=8)
def _no_keys(batch: int, device: torch.device) -> torch.Tensor:
    """int32 zeros ``(batch,)``, made once: no key is known to be kept for every query (``_whole_keys``)."""
    return torch.zeros(batch, dtype=torch.int32, device=device)


def full_precision_products(dtype: torch.dtype) -> bool:
    """Whether the kernels multiply ``dtype`` inputs in full precision, on the CUDA cores: float64 always, float32
    under ``torch.set_float32_matmul_precision("highest")`` (torch's default), as torch's own matmuls do; with
    ``"high"`` / ``"medium"`` float32 takes TF32 tensor cores, and half-precision inputs take them anyway."""
    return dtype == torch.float64 or (dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest")


def _matmul_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s precision (:func:`full_precision_products`)."""
    return "ieee" if full_precision_products(dtype) else "tf32"


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _tl_dtype(dtype: torch.dtype):
    # inside try: Transformers refuses remote code whose modules import a package that is not installed, even in a
    # function, but skips imports under try; without it no checkpoint loaded by repo id where triton is missing
    try:
        import triton.language as tl
    except ImportError:  # (unavailable_reasons says so before any kernel is launched)
        raise
    return tl.float64 if dtype == torch.float64 else tl.float32


def entmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    alpha: float = 1.5,
    scaling: float | None = None,
    causal: bool = False,
    key_lengths: torch.Tensor | None = None,
    block_mask: torch.Tensor | None = None,
    mask_block: int = MASK_BLOCK,
    keep: torch.Tensor | None = None,
    n_iter: int = 50,
    blocks: tuple[int, int, int] | None = None,
    dropout: float = 0.0,
    threshold_pass: str | None = None,
) -> torch.Tensor:
    """Exact α-entmax attention ``entmax(q kᵀ · scaling) v`` over ``(B, H, L, D)`` inputs → ``(B, H, Lq, Dv)``.

    Args:
        query, key, value: ``(B, H, Lq, D)``, ``(B, H, Lk, D)``, ``(B, H, Lk, Dv)``; float32, bfloat16, float16
            (float64 too, for tests); CUDA, or CPU under ``TRITON_INTERPRET=1``.
        alpha: 1.5 (closed form), 2 (sparsemax, closed form) or any α in (1, 1e6] (bisection, as
            ``entmax_bisect`` with ``n_iter`` steps and ``ensure_sum_one``).
        scaling: multiplies the scores; default ``D ** -0.5``.
        causal: query ``i`` attends to keys ``j <= i + Lk - Lq`` (the queries are the last ``Lq`` positions).
        key_lengths: ``(B,)`` integers: keys at or after ``key_lengths[b]`` are padding (values clamped to
            ``[0, Lk]``, no host sync).
        block_mask: ``(B|1, H|1, ceil(Lq/mask_block), ceil(Lk/mask_block))`` bool, True = the tile may attend;
            other tiles are never read.
        keep: ``(B|1, H|1, Lq, Lk)`` bool element mask, read only inside allowed tiles (partly allowed tiles of a
            pattern) and past the keys it keeps for every query (padding: a sequence's first padded key), never
            past the last key it keeps; or :class:`hf_sparse.pair_codes.PairCodes`, per-token codes the kernels
            test each pair of a tile with (Sparsefinder's clusters, buckets, distances and window: no ``Lq x Lk``
            tensor). Codes also give the tiles: those that can hold an allowed pair, in tiles of the kernel's own
            size when ``block_mask`` is not given (else in ``mask_block`` tiles, met with it); for distance codes,
            whose per-tile bound is loose, exactly the tiles holding one, found by a first kernel
            (:func:`_code_tiles`).
        blocks: ``(rows, keys, candidates)`` per kernel tile, powers of two, ``rows, keys >= 16``, ``candidates <=
            keys`` and tiles dividing ``mask_block``; only the speed depends on them. Default on the GPU
            :data:`GPU_BLOCKS`, or :data:`GPU_BLOCKS_FULL_PRECISION` for full-precision float32 and float64.
        dropout: attention dropout on the probabilities (as ``F.dropout(p) @ v``: a pair is dropped with this
            probability, rounded to a multiple of 2^-16, kept ones scaled by ``1 / (1 - dropout)``), drawn inside
            the kernels from a seed taken from torch's generator on the inputs' device (so ``torch.manual_seed``
            reproduces it, no host sync); the backward drops the same pairs. Pass the probability to apply now: 0
            in eval.
        threshold_pass: how each row's τ is found, with the same result (only the speed differs; default
            :data:`DEFAULT_THRESHOLD_PASS`): ``"topk"`` keeps each row's ``candidates`` largest scores in one sweep
            (merging tiles by sorting while many enter); ``"stream"`` holds every score above a rising lower bound
            of τ (up to four times ``candidates``), with no sort, and takes the output from the held support;
            ``"bound"`` keeps each row's two largest scores per key column, whose τ bounds the row's from below,
            and solves every row from there. Rows beyond the first two, and every row of the third, go to the
            exact fallback.

    Rows with no allowed key give zeros (and zero gradients). Differentiable in query, key and value.
    """
    _check_inputs(query, key, value, key_lengths, block_mask, keep, mask_block)
    kind = _kind(alpha)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"n_iter must be a whole number >= 1 (bisection steps), got {n_iter!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        raise ValueError(f"dropout must be a probability in [0, 1] (0 in eval), got {dropout!r}")
    threshold_pass = DEFAULT_THRESHOLD_PASS if threshold_pass is None else threshold_pass
    if threshold_pass not in THRESHOLD_PASSES:
        raise ValueError(f"threshold_pass must be one of {', '.join(THRESHOLD_PASSES)}, got {threshold_pass!r}")
    reasons = unavailable_reasons(query.device)
    if reasons:
        raise RuntimeError("the fused entmax attention kernel cannot run here: " + "; ".join(reasons))
    interpreted = _load_kernels() is not None and _kernels[1]
    if blocks is None:
        if interpreted:
            blocks = INTERPRETER_BLOCKS
        else:
            full = full_precision_products(query.dtype)
            blocks = GPU_BLOCKS_FULL_PRECISION if full else GPU_BLOCKS
        blocks = (min(blocks[0], mask_block), min(blocks[1], mask_block), min(blocks[2], blocks[1], mask_block))
    bm, bn, kc = blocks
    pow2 = all(x > 0 and x & (x - 1) == 0 for x in blocks)
    if not pow2 or bm < 16 or bn < 16 or kc > bn or mask_block % bm or mask_block % bn:
        raise ValueError(
            f"blocks={blocks!r}: need powers of two (rows, keys, candidates) with rows, keys >= 16, candidates <= "
            f"keys, and rows and keys dividing mask_block={mask_block}"
        )
    pair_test = int(keep is not None)  # (the kernels' PAIR_TEST: 0 none, 1 element mask, from 2 codes)
    if isinstance(keep, PairCodes):  # the tiles the codes can allow a pair in; the rest are never read
        if block_mask is None:
            mask_block = max(bm, bn)
            block_mask = keep.tiles(mask_block)
        else:
            block_mask = block_mask.to(query.device) & keep.tiles(mask_block)
        packed = keep.packed().to(query.device)  # once, for every launch
        if keep.match == "distance":  # their tiles are boxes, loose: the kernels' own pair test finds the exact ones
            block_mask = _code_tiles(keep, block_mask.to(query.device), mask_block, causal, packed)
        pair_test, keep = keep.pair_test(), packed
    need_g = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    cfg = dict(
        alpha=float(alpha),
        kind=kind,
        scale=float(query.shape[-1] ** -0.5 if scaling is None else scaling),
        causal=bool(causal),
        mask_block=mask_block,
        n_iter=n_iter,
        blocks=(bm, bn, kc),
        need_g=need_g,
        sort_above=INTERPRETER_SORT_ABOVE if interpreted else SORT_ABOVE,
        dropout=float(dropout),
        threshold_pass=threshold_pass,
        pair_test=pair_test,
    )
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    seed = torch.randint(2**62, (1,), device=q.device) if dropout > 0 else None
    if interpreted and q.dtype == torch.bfloat16:
        # Triton 3.9's interpreter multiplies bfloat16 operands of tl.dot as raw integers: compute in float32 there
        out = _EntmaxAttention.apply(q.float(), k.float(), v.float(), key_lengths, block_mask, keep, seed, cfg)
        return out.to(q.dtype)
    return _EntmaxAttention.apply(q, k, v, key_lengths, block_mask, keep, seed, cfg)
