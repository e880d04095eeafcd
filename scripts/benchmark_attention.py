"""Forward-pass timing of the attention kernels in ``hf_sparse.attention``, against dense SDPA.

For each (pattern, length) it times, interleaved round-robin over ``--repeats`` and reported as medians:

* dense SDPA without a mask (the baseline): ``F.scaled_dot_product_attention(q, k, v)``;
* SDPA with the pattern's boolean mask (backend ``sdpa``);
* compiled FlexAttention with a block-sparse ``BlockMask`` (backend ``flex``);
* building that ``BlockMask`` (``create_block_mask``), paid once per model forward and shared by all layers.

Before timing, both masked kernels are checked against a float64 eager reference; a mismatch aborts.
FlexAttention has no backward on CPU, so only the forward pass is timed, under ``torch.no_grad()``.
Writes a markdown report (default ``benchmarks/attention_backends.md``) used to set ``FLEX_MIN_LENGTH`` and
``FLEX_MAX_BLOCK_DENSITY`` in ``hf_sparse/attention.py``.

    python scripts/benchmark_attention.py [--repeats N] [--lengths ...] [--patterns ...]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without installing the package

from hf_sparse import attention, patterns  # noqa: E402

DEFAULT_PATTERNS = ["window:64", "longformer:64,1", "bigbird:64,1,3", "strided:128", "block_local:128", "dense"]
DEFAULT_LENGTHS = [256, 512, 1024, 2048, 4096]
TOLERANCE = 1e-4  # max abs difference to the float64 eager reference
MIN_SAMPLE_S = 0.02  # short calls are repeated within one sample until it lasts about this long
CPU = torch.device("cpu")

# If dynamo ever gives up compiling (e.g. its recompile limit), flex_attention silently runs unfused and
# materialises the full score matrix; that would time the wrong kernel, so make it fail instead.
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


def reference(q, k, v, pattern, n, scaling):
    """float64 eager attention, a few heads at a time to bound memory at long lengths."""
    mask = attention.build_mask(pattern, None, n, CPU, "eager")
    step = max(1, 2**26 // (n * n))  # about 0.5 GB of float64 scores per chunk
    outs = [
        attention.attend(
            q[:, h : h + step].double(), k[:, h : h + step].double(), v[:, h : h + step].double(), mask, scaling=scaling
        )[0]
        for h in range(0, q.shape[1], step)
    ]
    return torch.cat(outs, dim=2)  # attend returns (B, L, H, D)


def check(name, out, ref, spec, n):
    diff = (out.double() - ref).abs().max().item()
    if not diff < TOLERANCE:  # also catches NaN
        sys.exit(
            f"ABORT: {name} disagrees with the float64 eager reference for {spec!r} at L={n}: "
            f"max abs diff {diff:.3e} >= {TOLERANCE}"
        )
    return diff


def measure(variants: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Sample the variants round-robin (rotating the order every round); return the median seconds of
    ``dense`` and, for every other variant, the median over rounds of its time / dense's time in that round.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    # calls per sample, so that a dense SDPA sample lasts about MIN_SAMPLE_S (short kernels are not timer noise)
    start = time.perf_counter()
    variants["dense"]()
    inner = max(1, math.ceil(MIN_SAMPLE_S / max(time.perf_counter() - start, 1e-6)))
    names = list(variants)
    samples = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    dense = samples.pop("dense")
    ratios = {name: statistics.median(t / d for t, d in zip(s, dense)) for name, s in samples.items()}
    return {"dense": statistics.median(dense), **ratios}


def bench_one(spec: str, n: int, args: argparse.Namespace) -> dict:
    pattern = patterns.parse(spec)
    shape = (args.batch, args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape) for _ in range(3))
    scaling = args.head_dim**-0.5

    torch._dynamo.reset()  # fresh compile per (pattern, L): realistic first-call cost, no recompile limit
    sdpa_mask = attention.build_mask(pattern, None, n, CPU, "sdpa")
    flex_mask = attention.build_mask(pattern, None, n, CPU, "flex")
    start = time.perf_counter()
    flex_out = attention.attend(q, k, v, flex_mask, scaling=scaling)[0]
    first_call = time.perf_counter() - start

    ref = reference(q, k, v, pattern, n, scaling)
    sdpa_diff = check("sdpa-masked", attention.attend(q, k, v, sdpa_mask, scaling=scaling)[0], ref, spec, n)
    flex_diff = check("flex", flex_out, ref, spec, n)
    del ref

    times = measure(
        {
            "dense": lambda: F.scaled_dot_product_attention(q, k, v),
            "sdpa": lambda: attention.attend(q, k, v, sdpa_mask, scaling=scaling),
            "flex": lambda: attention.attend(q, k, v, flex_mask, scaling=scaling),
            "flex_mask": lambda: attention.build_mask(pattern, None, n, CPU, "flex"),
        },
        args.repeats,
        args.warmup,
    )
    return {
        "pattern": spec,
        "L": n,
        "density": 1.0 - patterns.sparsity(pattern, n),
        "block_density": patterns.block_density(pattern, n, attention.FLEX_BLOCK_SIZE),
        "first_call": first_call,
        "max_diff": max(sdpa_diff, flex_diff),
        **times,
    }


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
                row = bench_one(spec, n, args)
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
