"""Count the work each threshold pass of the fused entmax kernel does on the GPU benchmark's inputs, on a CPU.

GPU time is rare here, and which threshold pass is faster is the GPU's to say; but how much work each one does on
a given input is not a timing, and a CPU can count it exactly by replaying the kernels' decisions for one 64-row
block at a time (``hf_sparse.entmax_triton``'s docstring describes the passes):

- ``topk``: per key tile, the rows' newcomers above their 32nd-largest score so far; a tile where
  some row has more than ``SORT_ABOVE`` is merged by sorting, otherwise its newcomers are inserted one round each
  (the largest count over the block's rows). Rows whose support exceeds the 32 candidates fail the certificate.
- ``bound``: one sweep keeps each row's two largest scores per key column of the tiles (keys ``c, c + 64, ...``);
  their τ is a lower bound of the row's. The row's largest score among neither (a column's third) certifies it:
  below that τ, no other score enters the support. The fallback's Newton steps solve the other rows from the
  bound (counted here as the first version did too: every row from one or two scores per column).
- ``stream``: per key tile, every score above the row's bound is appended to its 128 slots; when some row's slots
  would overflow, the block raises every row's bound to the τ of what it holds (exactly, here; the kernel's
  Newton steps give a bound at most this tight) and drops the scores below it. A row whose support outgrows the
  slots would go to the fallback. Once τ is known, each row keeps only its support, whose values the output
  reads.

The fallback's Newton sweeps over the keys are counted three ways, all per 64-row block of the input: per block,
as the kernel ran before it gathered the marked rows (a block with one marked row swept all its keys for it,
until its last row was solved); gathered in one launch (each program takes the next 64 marked rows of the head,
from any block, and sweeps until its last one is solved); and in two, as it runs now for 1.5-entmax and sparsemax
(one sweep for every marked row, then the rows still unsolved gathered again).

The inputs are ``scripts/benchmark_gpu.py``'s: q and k with standard normal entries, head dim 64, scores scaled by
1/8, 1.5-entmax, non-causal. ::

    python scripts/simulate_threshold_passes.py --output benchmarks/threshold_passes_work.md
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_sparse.entmax_topk import entmax15  # noqa: E402
from hf_sparse.entmax_triton import GPU_BLOCKS, SORT_ABOVE, STREAM_SLOTS  # noqa: E402

ROWS, KEYS, CANDIDATES = GPU_BLOCKS
SLOTS = STREAM_SLOTS * CANDIDATES
DIM = 64


def block_scores(length: int, generator: torch.Generator) -> torch.Tensor:
    """One 64-row block's scores against ``length`` keys, as the benchmark draws them (float64 here)."""
    q = torch.randn(ROWS, DIM, generator=generator, dtype=torch.float64)
    k = torch.randn(length, DIM, generator=generator, dtype=torch.float64)
    return q @ k.T / DIM**0.5


def row_thresholds(scores: torch.Tensor) -> torch.Tensor:
    """Each row's τ on the score scale: p = ((s - θ)/2)² above θ (-inf for a row of -inf)."""
    p = entmax15(scores)
    inside = p > 0
    return torch.where(inside, scores - 2 * p.sqrt(), torch.inf).min(-1).values


def block_sweeps(sweeps: torch.Tensor) -> int:
    """Sweeps of one program over these rows' keys: until its last row is solved."""
    return int(sweeps.max()) if len(sweeps) else 0


def gathered_sweeps(sweeps: torch.Tensor) -> int:
    """Sweeps of the programs that take the marked rows 64 at a time, in order (``sweeps``: each marked row's)."""
    return sum(block_sweeps(sweeps[i : i + ROWS]) for i in range(0, len(sweeps), ROWS))


def two_launch_sweeps(sweeps: torch.Tensor) -> int:
    """The same in two launches: one sweep for every marked row, then the rest for the rows it left, gathered."""
    return -(-len(sweeps) // ROWS) + gathered_sweeps(sweeps[sweeps > 1] - 1)


def topk_work(scores: torch.Tensor) -> dict:
    best = torch.full((ROWS, CANDIDATES), -torch.inf, dtype=scores.dtype)
    sorts = rounds = 0
    for start in range(0, scores.shape[1], KEYS):
        tile = scores[:, start : start + KEYS]
        newcomers = int((tile > best.min(-1, keepdim=True).values).sum(-1).max())
        if newcomers > SORT_ABOVE:
            sorts += 1
        else:
            rounds += newcomers
        best = torch.cat([best, tile], -1).topk(CANDIDATES, -1).values
    failing = (entmax15(scores) > 0).sum(-1) > CANDIDATES
    start = row_thresholds(best)
    sweeps = newton_sweeps(scores[failing], start[failing])
    return dict(sorts=sorts, rounds=rounds, failing_rows=int(failing.sum()), fallback=bool(failing.any()),
                sweeps=block_sweeps(sweeps), marked=sweeps)


def newton_sweeps(scores: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """The sweeps over the keys the fallback makes until each of these rows is solved, from lower bounds ``start``
    of their τ (score scale): per sweep, over ``S = {x > τ}``, the closed form on S, which solves a row once S's
    smallest score lies above it, else a Newton step (``entmax_triton``'s fallback)."""
    m = scores.max(-1, keepdim=True).values
    x = (scores - m) / 2
    tau = ((start[:, None] - m) / 2)[:, 0]
    active = torch.ones(len(x), dtype=torch.bool)
    sweeps = torch.zeros(len(x), dtype=torch.long)
    while active.any():
        sweeps += active.long()
        d = (x - tau[:, None]).clamp(min=0)
        inside = d > 0
        n = inside.sum(-1)
        mean = d.sum(-1) / n
        spread = (d * d).sum(-1) - d.sum(-1) * mean
        closed = tau + mean - ((1 - spread) / n).clamp(min=0).sqrt()
        solved = torch.where(inside, x, torch.inf).min(-1).values > closed
        active &= ~solved
        tau = torch.where(active, tau + ((d * d).sum(-1) - 1) / (2 * d.sum(-1)), tau)
    return sweeps


def bound_work(scores: torch.Tensor, per_column: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's Newton sweeps from the τ of its ``per_column`` largest scores per key column, and whether the
    certificate (its largest score among neither, a column's next, below that τ) spares it the fallback."""
    top = scores.unflatten(-1, (-1, KEYS)).topk(per_column + 1, dim=1).values
    bound = row_thresholds(top[:, :per_column].flatten(1))
    return newton_sweeps(scores, bound), top[:, per_column].amax(-1) <= bound


def stream_work(scores: torch.Tensor) -> dict:
    bound = torch.full((ROWS,), -torch.inf, dtype=scores.dtype)
    held = torch.full((ROWS, 0), -torch.inf, dtype=scores.dtype)
    raisings = lost = 0
    for start in range(0, scores.shape[1], KEYS):
        tile = scores[:, start : start + KEYS]
        count = (held > -torch.inf).sum(-1)
        take = tile > bound[:, None]
        if bool((count + take.sum(-1) > SLOTS).any()):
            raisings += 1
            bound = torch.maximum(bound, row_thresholds(held))
            held = torch.where(held > bound[:, None], held, -torch.inf)
            take = tile > bound[:, None]
            lost += int(((held > -torch.inf).sum(-1) + take.sum(-1) > SLOTS).sum())
        held = torch.cat([held, torch.where(take, tile, -torch.inf)], -1)
        held = held.sort(-1, descending=True).values[:, : int((held > -torch.inf).sum(-1).max())]
    support = int((entmax15(scores) > 0).sum(-1).max())  # what the kernel keeps for the output, once τ is known
    return dict(raisings=raisings, lost_rows=lost, held_at_end=held.shape[1], support=support)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1024,4096,8192,16384", help="keys per row, comma-separated")
    parser.add_argument("--blocks", type=int, default=8, help="64-row blocks drawn per length")
    parser.add_argument("--output", help="write the Markdown report here (default: print it)")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        topk, stream, bound = [], [], []
        for _ in range(args.blocks):  # (the blocks of one head: their marked rows are gathered across them)
            scores = block_scores(length, generator)
            topk.append(topk_work(scores))
            stream.append(stream_work(scores))
            one, _ = bound_work(scores, 1)
            two, certified = bound_work(scores, 2)
            bound.append(dict(one=block_sweeps(one), two=block_sweeps(two), certified=int(certified.sum()),
                              marked=two[~certified]))
        mean = lambda runs, key: sum(run[key] for run in runs) / len(runs)  # noqa: E731
        def gathered(runs):  # one launch / two launches
            marked = torch.cat([run["marked"] for run in runs])
            return f"{gathered_sweeps(marked) / len(runs):.2f} / {two_launch_sweeps(marked) / len(runs):.2f}"

        rows.append(
            f"| {length} | {length // KEYS} | {mean(topk, 'sorts'):.1f} | {mean(topk, 'rounds'):.0f} | "
            f"{mean(topk, 'failing_rows') / ROWS:.0%} | {mean(topk, 'fallback'):.0%} | {mean(topk, 'sweeps'):.1f} | "
            f"{gathered(topk)} | {mean(bound, 'one'):.1f} | {mean(bound, 'two'):.1f} | "
            f"{mean(bound, 'certified') / ROWS:.0%} | {gathered(bound)} | "
            f"{mean(stream, 'raisings'):.1f} | {max(run['held_at_end'] for run in stream)} | "
            f"{max(run['support'] for run in stream)} | "
            f"{sum(run['lost_rows'] for run in stream)} |"
        )
        print(rows[-1], flush=True)
    report = [
        "# Work of the threshold passes on the GPU benchmark's inputs (counted on a CPU, not timed)",
        "",
        f"`python scripts/simulate_threshold_passes.py --blocks {args.blocks} --output ...` on {platform.machine()}, "
        f"{datetime.date.today()}: torch {torch.__version__}. Per 64-row block (mean of {args.blocks} blocks; the"
        " largest over them for held scores and supports, the sum for rows outgrowing the slots): "
        f"tiles of {KEYS} keys, `topk` with {CANDIDATES} candidates (sorting a tile where some row has more than "
        f"{SORT_ABOVE} newcomers), `stream` with {SLOTS} slots per row, `bound` from one or two scores per key"
        " column. Newton sweeps: the fallback's sweeps over the keys, per 64-row block of the input; per block (the"
        " kernel before it gathered them: each block with a marked row sweeps until its last row is solved;"
        " `bound`: every row, before its certificate) or gathered, 64 marked rows of the head per program from any"
        " block (`bound`: the rows failing its certificate), in one launch / in two (now: one sweep for every marked"
        " row, then the rows it left unsolved, gathered again).",
        "",
        "| L | key tiles | `topk`: tiles sorted | `topk`: insertion rounds | rows failing the certificate | blocks "
        "running the fallback | `topk`: Newton sweeps per block | `topk`: Newton sweeps gathered, one / two launches "
        "| `bound`, one per "
        "column, every row: Newton sweeps per block | `bound`, two per column, every row: Newton sweeps per block | "
        "`bound`: rows certified | `bound`: Newton sweeps gathered, one / two launches | `stream`: bound raisings | "
        "`stream`: most "
        "scores a row held at the end of the sweep | `stream`: largest support (the output's reads per row) | "
        "`stream`: rows outgrowing the slots |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Each fallback step is one more sweep over the block's keys; a bound raising works on the held slots only,"
        " never on the keys.",
        "",
    ]
    text = "\n".join(report)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        print(text)


if __name__ == "__main__":
    main()
