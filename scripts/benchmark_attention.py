"""Forward-pass timing of the attention kernels in ``hf_sparse.attention``, against dense SDPA.

For each (pattern, length) it times, interleaved round-robin over ``--repeats`` and reported as medians:

* dense SDPA without a mask (the baseline): ``F.scaled_dot_product_attention(q, k, v)``;
* SDPA with the pattern's boolean mask (backend ``sdpa``);
* compiled FlexAttention with a block-sparse ``BlockMask`` (backend ``flex``);
* building that ``BlockMask`` (``create_block_mask``), paid once per model forward and shared by all layers.

Before timing, both masked kernels are checked against a float64 eager reference; a mismatch aborts.
FlexAttention has no backward on CPU, so only the forward pass is timed, under ``torch.no_grad()``.
Writes a markdown report (default ``benchmarks/attention_backends.md``) used to set ``FLEX_MIN_LENGTH`` and
``FLEX_MAX_BLOCK_DENSITY`` in ``hf_sparse/attention.py``. The checking and timing live in
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
from hf_sparse.benchmarking import TOLERANCE, bench_one  # noqa: E402

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
    parser.add_argument(
        "--layers", type=int, default=12, help="layers sharing one mask build (for the amortised crossover)"
    )
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "attention_backends.md")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def table(rows: list[dict]) -> str:
    lines = [
        "| pattern | L | element density | block density | dense SDPA (ms) | sdpa-masked / dense | flex / dense "
        "| flex mask build / dense | flex speedup over dense | flex first call (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['pattern']}` | {r['L']} | {r['density']:.3f} | {r['block_density']:.3f} | {r['dense'] * 1e3:.2f} "
            f"| {r['sdpa']:.2f} | {r['flex']:.2f} | {r['flex_mask']:.2f} | {1 / r['flex']:.2f}x "
            f"| {r['first_call']:.1f} |"
        )
    return "\n".join(lines)


def crossover(rows: list[dict], ratio) -> tuple[int, float, float, float] | None:
    """The widest rule "L >= L_min and block density <= d_max" under which flex won every measured row.

    ``ratio(row)`` is flex's cost relative to dense SDPA (a loss is >= 1). For each candidate L_min the rule
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


def crossover_text(rows: list[dict], layers: int) -> str:
    def sentence(ratio, what):
        found = crossover(rows, ratio)
        if found is None:
            return f"{what}: flex never beat dense SDPA."
        n_min, d_max, d_lose, worst = found
        lost = (
            "it never lost there"
            if d_lose == math.inf
            else f"the sparsest pattern it lost with at those lengths had block density {d_lose:.3f}"
        )
        return (
            f"{what}: flex beat dense SDPA at every measured length **L >= {n_min}** for block density "
            f"**<= {d_max:.3f}** (closest call: ratio {worst:.2f}); {lost}."
        )

    kernel = sentence(lambda r: r["flex"], "Kernel alone (flex / dense < 1)")
    amortised = sentence(
        lambda r: r["flex"] + r["flex_mask"] / layers,
        f"Paying one mask build per forward shared by {layers} layers ((flex + build / {layers}) / dense < 1)",
    )
    return (
        f"{kernel}\n\n{amortised}\n\n"
        "Derived from the table above (medians of per-round ratios). The block-density threshold lies between "
        "the densest covered and the sparsest losing pattern, which these patterns do not resolve further; "
        "below the smallest covered L no pattern here is sparse enough at tile level to tell. "
        "The one-off compile (first call) is excluded."
    )


def machine() -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch.get_num_threads() = {torch.get_num_threads()}"


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
                )
                rows.append(row)
                print(
                    f"{spec:>16} L={n:<5} dense {row['dense'] * 1e3:8.2f} ms  sdpa/dense {row['sdpa']:5.2f}"
                    f"  flex/dense {row['flex']:5.2f}  build/dense {row['flex_mask']:5.2f}"
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
- Checked first: sdpa-masked and flex agree with a float64 eager reference (max abs diff < {TOLERANCE:g};
  largest seen {max(r["max_diff"] for r in rows):.1e})

Ratios are to dense SDPA without a mask (`F.scaled_dot_product_attention(q, k, v)`); below 1 is faster than dense.
*flex mask build* is `create_block_mask` (via `build_mask(..., "flex")`), paid once per model forward and shared
by all layers. *flex first call* is the compile (after `torch._dynamo.reset()`) plus the first run, excluded
from the ratios; it is a few seconds cold and much less when Inductor's on-disk cache already holds the kernel.
Element density is 1 - sparsity; block density is the fraction of {bs}x{bs} tiles FlexAttention computes.

{table(rows)}

## Crossover

{crossover_text(rows, args.layers)}
"""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(f"\n{table(rows)}\n\n{crossover_text(rows, args.layers)}\n\nwrote {args.output} in {total / 60:.1f} min")


if __name__ == "__main__":
    main()
