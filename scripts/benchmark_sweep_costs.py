"""What one sweep over the keys costs, step by step, on a GPU: the floor under any exact threshold pass.

The fused kernel's forward at L = 8192 is 12x SDPA (benchmarks/gpu.md), and its threshold passes are most of it:
the `topk` pass 4.3 ms, the `stream` pass's single sweep 6.5 ms, against 1.3 ms for the output pass, which also
multiplies by V. Varying the stream pass's slots showed that raising its bounds is not the cost; what is left is
the per-tile work. This script times a stripped-down sweep (one Triton kernel, the fused kernel's tiles and
program grid) with each piece of that work added in turn, at 4 and 16 warps:

0. scores (``q kᵀ``) and each row's running maximum: the floor of any sweep;
1. + a threshold test per score and one block-wide reduction per tile (does any row take a score here?);
2. + the cumulative sum that ranks each row's taken scores (their slots);
3. + the appends: the taken scores and their key indices stored in each row's slots (the stream pass);
4. the same appends another way: each round stores every row's first taken score not yet stored (one value and
   one address per row), as many rounds as the row with the most takes in the tile needs. Compiled for sm_90, mode
   3 needs a 64-bit address per score of the tile, twice: 255 registers and 244 bytes spilled per thread at 4
   warps (the stream kernel's 255); mode 4 does not;
5. one sweep of Newton's method on ``Σ p(τ) = 1`` at a per-row τ, as the fallback does it (``_add_sums``: count,
   ``Σ x``, ``Σ x²`` and the smallest ``x`` above τ, ``f`` and ``f'``; six row-wise reductions per tile, no
   block-wide one, no appends). A threshold pass without candidates would be a row-maximum sweep and then such
   sweeps until every row of the block is solved by the closed form: about 6 per 64-row block at L = 8192 on
   these inputs, from the lower bound ``mean - 1/sqrt(n)`` (Jensen) of the scores kept near the running maximum
   (a float64 simulation of the fallback's steps), 7.6 from ``τ = -1``. Its time against mode 3's says whether
   that pass could beat the appends.

Each mode's time, registers and spills are printed next to SDPA and both fused threshold passes from the same run,
so the step that makes a sweep expensive is named by a measurement rather than guessed. The threshold is set so
that about ``--appends`` scores per row pass it (inputs are N(0, 1), so scores are about N(0, 1)).

    python scripts/benchmark_sweep_costs.py --output benchmarks/sweep_costs.md     # on a GPU, under a minute
    TRITON_INTERPRET=1 python scripts/benchmark_sweep_costs.py --smoke            # CPU: checks the modes agree
"""

from __future__ import annotations

import argparse
import datetime
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_sparse.benchmarking import median_ms  # noqa: E402
from hf_sparse.entmax_triton import GPU_BLOCKS, entmax_attention  # noqa: E402

MODES = {
    0: "scores + row maximum (the floor)",
    1: "+ threshold test, one block-wide reduction per tile",
    2: "+ cumulative sum (ranks of the taken scores)",
    3: "+ appends (score and key index to the row's slots)",
    4: "appends one taken score per row at a time (no cumulative sum, no tile of addresses)",
    5: "Newton sums at a per-row τ (six row-wise reductions, the fallback's step)",
}


@triton.jit
def sweep_kernel(
    Q, K, OUT, COUNT, HELD, KEYS, SUMS, L, scale, theta,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CAP: tl.constexpr, MODE: tl.constexpr,
):
    """One program per (query block, batch·head), as the fused kernels: sweep every key tile once."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    cols = tl.arange(0, BN)
    base = bh.to(tl.int64) * L * D
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])
    m = tl.full((BM,), float("-inf"), tl.float32)
    count = tl.zeros((BM,), tl.int32)
    ranks = tl.zeros((BM,), tl.int32)  # mode 2: the cumulative sum's result must be used
    first = (bh.to(tl.int64) * L + offs_m) * CAP
    n_above = tl.zeros((BM,), tl.float32)  # mode 5: the Newton sums
    s1 = tl.zeros((BM,), tl.float32)
    s2 = tl.zeros((BM,), tl.float32)
    smallest = tl.full((BM,), float("inf"), tl.float32)
    f = tl.zeros((BM,), tl.float32)
    slope = tl.zeros((BM,), tl.float32)
    for start_n in range(0, L, BN):
        offs_n = start_n + cols
        k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), out_dtype=tl.float32) * scale
        m = tl.maximum(m, tl.max(s, 1))
        if MODE == 5:  # the 1.5-entmax sums of _add_sums at τ = theta (x = s here: the cost, not the scale)
            d = s - theta
            pos = d > 0
            n_above += tl.sum(pos.to(tl.float32), 1)
            s1 += tl.sum(tl.where(pos, s, 0.0), 1)
            s2 += tl.sum(tl.where(pos, s * s, 0.0), 1)
            smallest = tl.minimum(smallest, tl.min(tl.where(pos, s, float("inf")), 1))
            d = tl.where(pos, d, 0.0)
            f += tl.sum(d * d, 1)
            slope += tl.sum(2 * d, 1)
        elif MODE >= 1:
            take = s > theta
            new = tl.sum(take.to(tl.int32), 1)
            most = tl.max(new, 0)
            if MODE == 4:
                left = take
                for _ in range(0, most):  # round r stores each row's r-th taken score of this tile
                    j = tl.min(tl.where(left, cols[None, :], BN), 1)
                    has = j < BN
                    here = cols[None, :] == j[:, None]
                    value = tl.max(tl.where(here, s, float("-inf")), 1)
                    into = has & (count < CAP)
                    tl.store(HELD + first + count, value, mask=into)
                    tl.store(KEYS + first + count, start_n + j, mask=into)
                    count += has.to(tl.int32)
                    left = left & ~here
            elif most > 0:
                if MODE >= 2:
                    at = count[:, None] + tl.cumsum(take.to(tl.int32), 1) - 1
                    if MODE >= 3:
                        into = take & (at < CAP)
                        tl.store(HELD + first[:, None] + at, s, mask=into)
                        tl.store(KEYS + first[:, None] + at, offs_n[None, :] + tl.zeros((BM, BN), tl.int32),
                                 mask=into)
                    else:
                        ranks = tl.maximum(ranks, tl.max(tl.where(take, at, 0), 1))
                count += new
    tl.store(OUT + bh * L + offs_m, m)
    tl.store(COUNT + bh * L + offs_m, count + 0 * ranks)
    if MODE == 5:  # (every sum stored, so none is compiled away)
        count = n_above.to(tl.int32)
        tl.store(COUNT + bh * L + offs_m, count)
        tl.store(SUMS + (bh * L + offs_m) * 5, s1)
        tl.store(SUMS + (bh * L + offs_m) * 5 + 1, s2)
        tl.store(SUMS + (bh * L + offs_m) * 5 + 2, smallest)
        tl.store(SUMS + (bh * L + offs_m) * 5 + 3, f)
        tl.store(SUMS + (bh * L + offs_m) * 5 + 4, slope)


def run_sweep(q, k, mode: int, warps: int, theta: float, cap: int, blocks):
    bh, n, d = q.shape
    bm, bn = blocks
    out = torch.empty(bh, n, device=q.device, dtype=torch.float32)
    count = torch.empty(bh, n, device=q.device, dtype=torch.int32)
    held = torch.empty(bh * n * cap if mode in (3, 4) else 1, device=q.device, dtype=torch.float32)
    keys = torch.empty(bh * n * cap if mode in (3, 4) else 1, device=q.device, dtype=torch.int32)
    sums = torch.empty(bh * n * 5 if mode == 5 else 1, device=q.device, dtype=torch.float32)
    kernel = sweep_kernel[(n // bm, bh)](
        q, k, out, count, held, keys, sums, n, d**-0.5, theta, D=d, BM=bm, BN=bn, CAP=cap, MODE=mode, num_warps=warps
    )
    return out, count, held, keys, sums, kernel


def check_smoke(q, k, theta, cap, blocks) -> None:
    """Every mode finds the same row maxima, and the counted and appended scores are the ones above ``theta``
    (mode 5: its sums are those of the dense scores above ``theta``)."""
    scores = (q.float() @ k.float().transpose(1, 2)) * q.shape[-1] ** -0.5
    want_max, want_count = scores.amax(-1), (scores > theta).sum(-1).to(torch.int32)
    for mode in MODES:
        out, count, held, keys, sums, _ = run_sweep(q, k, mode, 4, theta, cap, blocks)
        torch.testing.assert_close(out, want_max, atol=1e-4, rtol=0)
        if mode == 5:
            above = scores > theta
            d = torch.where(above, scores - theta, 0)
            want = torch.stack([torch.where(above, scores, 0).sum(-1), torch.where(above, scores**2, 0).sum(-1),
                                torch.where(above, scores, torch.inf).amin(-1), (d * d).sum(-1), 2 * d.sum(-1)], -1)
            assert torch.equal(count, want_count), mode
            torch.testing.assert_close(sums.view(*count.shape, 5), want, atol=1e-3, rtol=1e-4)
        elif mode >= 1:
            assert torch.equal(count, want_count), mode
        if mode in (3, 4):
            held, keys = held.view(*count.shape, cap), keys.view(*count.shape, cap).long()
            for row in range(count.shape[1]):
                c = min(int(count[0, row]), cap)
                torch.testing.assert_close(held[0, row, :c], scores[0, row, keys[0, row, :c]], atol=1e-4, rtol=0)
                assert torch.all(held[0, row, :c] > theta)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton's interpreter: checks only")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--appends", type=int, default=64, help="scores per row above the threshold (about)")
    parser.add_argument("--output", type=Path, help="write the table here (markdown)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    n, heads, dim = (64, 2, 16) if args.smoke else (args.length, 16, 64)
    blocks = (16, 16) if args.smoke else GPU_BLOCKS[:2]
    cap = 4 * 32  # the stream pass's slots per row at the default tiles
    dtype = torch.float32 if args.smoke else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(heads, n, dim, generator=g).to(device, dtype) for _ in "qkv")
    theta = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - min(args.appends, n - 1) / n)))
    if args.smoke:
        check_smoke(q, k, theta, cap, blocks)
        print("smoke: every mode agrees with dense scores (row maxima, counts, appended scores and keys)")
        return 0
    q4, k4, v4 = (t[None] for t in (q, k, v))
    lines = [
        "# What one sweep over the keys costs, step by step",
        "",
        f"`python scripts/benchmark_sweep_costs.py --length {n} --appends {args.appends}` on "
        f"{torch.cuda.get_device_name()}, {datetime.date.today()}: torch {torch.__version__}, triton "
        f"{triton.__version__}; bf16, {heads} heads, head dim {dim}, tiles {blocks[0]}x{blocks[1]}, threshold "
        f"{theta:.3f} (about {args.appends} scores per row above it), CUDA-event medians of 20.",
        "",
        "| what | warps | ms | registers | spills (B) |",
        "|---|---:|---:|---:|---:|",
    ]
    with torch.no_grad():
        for name, fn in (
            ("SDPA forward (softmax attention, multiplies by V)", partial(F.scaled_dot_product_attention, q4, k4, v4)),
            ("fused entmax forward, `topk` pass", partial(entmax_attention, q4, k4, v4, threshold_pass="topk")),
            ("fused entmax forward, `stream` pass", partial(entmax_attention, q4, k4, v4, threshold_pass="stream")),
        ):
            fn()  # compiles
            lines.append(f"| {name} | | {median_ms(fn, 20, device):.2f} | | |")
            print(lines[-1], flush=True)
        for mode, what in MODES.items():
            for warps in (4, 16):
                fn = partial(run_sweep, q, k, mode, warps, theta, cap, blocks)
                kernel = fn()[-1]  # compiles
                ms = median_ms(fn, 20, device)
                regs, spills = getattr(kernel, "n_regs", "?"), getattr(kernel, "n_spills", "?")
                lines.append(f"| {mode}. {what} | {warps} | {ms:.2f} | {regs} | {spills} |")
                print(lines[-1], flush=True)
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
