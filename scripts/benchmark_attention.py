"""Forward-pass timing of the attention kernels in ``hf_sparse.attention``, against dense SDPA.

For each (pattern, length) it times, interleaved round-robin over ``--repeats`` and reported as medians:

* dense SDPA without a mask (the baseline): ``F.scaled_dot_product_attention(q, k, v)``;
* SDPA with the pattern's boolean mask (backend ``sdpa``);
* compiled FlexAttention with a block-sparse ``BlockMask`` (backend ``flex``);
* the tiles kernel (backend ``tiles``: the touched key tiles gathered per tile row, no compiler);
* the per-forward ``BlockMask`` lookup (from the cache of block maps);
* entmax15 on the eager kernel and on the tiles kernel.

Before timing, the masked kernels are checked against a float64 eager reference; a mismatch aborts.
FlexAttention has no backward on CPU, so only the forward pass is timed, under ``torch.no_grad()``.
Writes a markdown report (default ``benchmarks/attention_backends.md``) used to set ``BLOCK_SPARSE_MIN_LENGTH``
and ``BLOCK_SPARSE_MAX_DENSITY`` in ``hf_sparse/attention.py``. The checking and timing live in
``hf_sparse.benchmarking`` (shared with ``hf-sparse benchmark``); this script writes the report.

    python scripts/benchmark_attention.py [--repeats N] [--lengths ...] [--patterns ...]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without installing the package

from hf_sparse import attention  # noqa: E402
from hf_sparse.benchmarking import TOLERANCE, bench_one, machine  # noqa: E402

DEFAULT_PATTERNS = ["window:64", "longformer:64,1", "bigbird:64,1,3", "strided:128", "block_local:128", "dense"]
DEFAULT_LENGTHS = [256, 512, 1024, 2048, 4096]

# If dynamo ever gives up compiling (e.g. its recompile limit), flex_attention silently runs unfused and
# materialises the full score matrix; that would time the wrong kernel, so make it fail instead.
# (hf_sparse.benchmarking does the same within its functions; this also covers the whole script.)
warnings.filterwarnings("error", message=".*flex_attention called without torch.compile.*")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", "-B", type=int, default=1)
    parser.add_argument("--heads", "-H", type=int, default=12)
    parser.add_argument("--head-dim", "-D", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS)
    parser.add_argument("--patterns", nargs="+", default=DEFAULT_PATTERNS)
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (medians reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "attention_backends.md")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def table(rows: list[dict]) -> str:
    lines = [
        "| pattern | L | element density | block density | dense SDPA (ms) | sdpa-masked / dense | flex / dense "
        "| tiles / dense | block mask lookup / dense | block map build, once (ms) | flex first call (s) "
        "| eager entmax15 / dense | tiles entmax15 / eager entmax15 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['pattern']}` | {r['L']} | {r['density']:.3f} | {r['block_density']:.3f} | {r['dense'] * 1e3:.2f} "
            f"| {r['sdpa']:.2f} | {r['flex']:.2f} | {r['tiles']:.2f} | {r['flex_mask']:.3f} "
            f"| {r['map_build'] * 1e3:.1f} | {r['first_call']:.1f} | {r['eager_entmax']:.2f} "
            f"| {r['tiles_entmax'] / r['eager_entmax']:.2f} |"
        )
    return "\n".join(lines)


def crossover(rows: list[dict], ratio) -> tuple[int, float, float, float] | None:
    """The widest rule "L >= L_min and block density <= d_max" under which a kernel won every measured row.

    ``ratio(row)`` is the kernel's cost relative to its dense rival (a loss is >= 1). For each candidate L_min the rule
    extends up to the sparsest loss at L >= L_min; the candidate covering the most rows wins (ties: smaller
    L_min). Returns (smallest covered L, densest covered block density, sparsest loss beyond it or inf,
    worst covered ratio), or None if flex won nowhere.
    """
    losses = [r for r in rows if ratio(r) >= 1]
    best: list[dict] = []
    best_lose = math.inf
    for n_min in sorted({r["L"] for r in rows}):
        d_lose = min((r["block_density"] for r in losses if r["L"] >= n_min), default=math.inf)
        covered = [r for r in rows if r["L"] >= n_min and r["block_density"] < d_lose]  # all wins by construction
        if len(covered) > len(best):
            best, best_lose = covered, d_lose
    if not best:
        return None
    return (
        min(r["L"] for r in best),
        max(r["block_density"] for r in best),
        best_lose,
        max(ratio(r) for r in best),
    )


def crossover_text(rows: list[dict]) -> str:
    def sentence(ratio, kernel, rival, what):
        found = crossover(rows, ratio)
        if found is None:
            return f"{what}: {kernel} never beat {rival}."
        n_min, d_max, d_lose, worst = found
        lost = (
            "it never lost there"
            if d_lose == math.inf
            else f"the sparsest pattern it lost with at those lengths had block density {d_lose:.3f}"
        )
        return (
            f"{what}: {kernel} beat {rival} at every measured length **L >= {n_min}** for block density "
            f"**<= {d_max:.3f}** (closest call: ratio {worst:.2f}); {lost}."
        )

    lines = [
        sentence(lambda r: r["flex"], "flex", "dense SDPA", "FlexAttention, softmax (flex / dense < 1)"),
        sentence(lambda r: r["tiles"], "tiles", "dense SDPA", "Tiles kernel, softmax (tiles / dense < 1)"),
        sentence(
            lambda r: r["tiles_entmax"] / r["eager_entmax"],
            "tiles",
            "the eager kernel",
            "Tiles kernel, entmax15 (tiles entmax15 / eager entmax15 < 1)",
        ),
    ]
    return (
        "\n\n".join(lines) + "\n\nDerived from the table above (medians of per-round ratios). The block-density "
        "threshold lies between the densest covered and the sparsest losing pattern, which these patterns do not "
        "resolve further; below the smallest covered L no pattern here is sparse enough at tile level to tell. The "
        "one-off compile (first call) and block map build are excluded: both happen once per pattern and length."
    )


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    began = time.perf_counter()
    load_before = os.getloadavg()
    rows = []
    with torch.no_grad():
        for spec in args.patterns:
            for n in args.lengths:
                row = bench_one(
                    spec,
                    n,
                    batch=args.batch,
                    heads=args.heads,
                    head_dim=args.head_dim,
                    repeats=args.repeats,
                    warmup=args.warmup,
                    entmax=True,
                )
                rows.append(row)
                print(
                    f"{spec:>16} L={n:<5} dense {row['dense'] * 1e3:8.2f} ms  sdpa/dense {row['sdpa']:5.2f}"
                    f"  flex/dense {row['flex']:5.2f}  tiles/dense {row['tiles']:5.2f}"
                    f"  eager entmax/dense {row['eager_entmax']:5.2f}  tiles entmax/dense {row['tiles_entmax']:5.2f}"
                    f"  first call {row['first_call']:5.1f} s  max diff {row['max_diff']:.1e}",
                    flush=True,
                )
    total = time.perf_counter() - began
    load = " / ".join(f"{x:.2f}" for x in (*load_before, *os.getloadavg()))
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    bs = attention.FLEX_BLOCK_SIZE
    report = f"""# Attention backends: forward time on CPU

Command (from the repository root): `{command}`

- Machine: {machine()}
- Versions: Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}
- Date: {datetime.date.today().isoformat()}
- Shapes: B={args.batch}, H={args.heads}, D={args.head_dim}, float32, forward only under `torch.no_grad()`
- Timing: `time.perf_counter`; the variants are interleaved round-robin for {args.repeats} rounds (after
  {args.warmup} untimed warm-up round(s)); a ratio is the median over rounds of (variant time / dense SDPA time
  in the same round), the dense SDPA column the median of its own times. Total runtime {total / 60:.1f} min
- Load average (1/5/15 min) before / after: {load} (this run's own threads count; other processes on
  these cores slow everything unevenly: the dense SDPA column, identical work at a given L, shows how much)
- Checked first: sdpa-masked, flex and tiles agree with a float64 eager reference (max abs diff <
  {TOLERANCE:g}; largest seen {max(r["max_diff"] for r in rows):.1e})

Ratios are to dense SDPA without a mask (`F.scaled_dot_product_attention(q, k, v)`); below 1 is faster than dense.
*Block mask lookup* is what a model forward pays for its `BlockMask` once the pattern's block map is cached
(`build_mask(..., "flex")`); *block map build* is the one-off work per pattern and length (exact tiles from the
pattern's analytic tile map, its `mask_mod` evaluated only on undecided tiles). *flex first call* is the compile
(after `torch._dynamo.reset()`; on CPU one per pattern and length, static shapes) plus the first run, excluded
from the ratios. *tiles* is the block-sparse kernel by gathering (no compiler). The entmax15 columns compare
the tiles kernel with the eager kernel (the only other way to run entmax with a pattern). Element density is
1 - sparsity; block density is the fraction of {bs}x{bs} tiles a block-sparse kernel computes.

{table(rows)}

## Crossover

{crossover_text(rows)}
"""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(f"\n{table(rows)}\n\n{crossover_text(rows)}\n\nwrote {args.output} in {total / 60:.1f} min")


if __name__ == "__main__":
    main()
