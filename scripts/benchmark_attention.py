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
    parser.add_argument("--repeats", type=int, default=7, help="timed samples per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per variant after the first")
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
        attention.attend(q[:, h : h + step].double(), k[:, h : h + step].double(), v[:, h : h + step].double(),
                         mask, scaling=scaling)[0]
        for h in range(0, q.shape[1], step)
    ]
    return torch.cat(outs, dim=2)  # attend returns (B, L, H, D)


def check(name, out, ref, spec, n):
    diff = (out.double() - ref).abs().max().item()
    if not diff < TOLERANCE:  # also catches NaN
        sys.exit(f"ABORT: {name} disagrees with the float64 eager reference for {spec!r} at L={n}: "
                 f"max abs diff {diff:.3e} >= {TOLERANCE}")
    return diff


def measure(variants: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each variant, sampled round-robin (rotating the order every round)."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    # calls per sample, from the cheapest variant (dense SDPA), so short kernels are not timer noise
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
    return {name: statistics.median(s) for name, s in samples.items()}


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
        d = r["dense"]
        lines.append(
            f"| `{r['pattern']}` | {r['L']} | {r['density']:.3f} | {r['block_density']:.3f} | {d * 1e3:.2f} "
            f"| {r['sdpa'] / d:.2f} | {r['flex'] / d:.2f} | {r['flex_mask'] / d:.2f} | {d / r['flex']:.2f}x "
            f"| {r['first_call']:.1f} |"
        )
    return "\n".join(lines)


def crossover(rows: list[dict], cost) -> tuple[int | None, float | None, float | None]:
    """(L*, d_win, d_lose): from L* on, every pattern with block density <= d_win beats dense SDPA.

    At each length, d_win is the densest winning pattern below the sparsest losing one (d_lose).
    L* is the smallest length from which on every length has such a d_win; d_win/d_lose are then the
    conservative values over those lengths. ``cost(row)`` is flex's time relative to dense SDPA.
    """
    by_length: dict[int, tuple[float | None, float | None]] = {}
    for n in sorted({r["L"] for r in rows}):
        at_n = [r for r in rows if r["L"] == n]
        losing = [r["block_density"] for r in at_n if cost(r) >= 1]
        d_lose = min(losing, default=None)
        winning = [r["block_density"] for r in at_n if cost(r) < 1 and (d_lose is None or r["block_density"] < d_lose)]
        by_length[n] = (max(winning, default=None), d_lose)
    start = None
    for n in sorted(by_length, reverse=True):
        if by_length[n][0] is None:
            break
        start = n
    if start is None:
        return None, None, None
    from_start = [by_length[n] for n in by_length if n >= start]
    d_win = min(w for w, _ in from_start)
    d_lose = min((lo for _, lo in from_start if lo is not None), default=None)
    return start, d_win, d_lose


def crossover_text(rows: list[dict], layers: int) -> str:
    def sentence(cost, what):
        start, d_win, d_lose = crossover(rows, cost)
        if start is None:
            return f"{what}: flex never beats dense SDPA at the longest length measured, for any pattern."
        bound = "" if d_lose is None else f" (the sparsest pattern that lost there had block density {d_lose:.3f})"
        return (f"{what}: flex beats dense SDPA from **L = {start}** on, for patterns with **block density "
                f"<= {d_win:.3f}**{bound}.")

    flex_only = sentence(lambda r: r["flex"] / r["dense"], "Kernel alone (flex / dense < 1)")
    amortised = sentence(
        lambda r: (r["flex"] + r["flex_mask"] / layers) / r["dense"],
        f"Including the mask build shared by {layers} layers ((flex + build/{layers}) / dense < 1)",
    )
    return (
        f"{flex_only}\n\n{amortised}\n\n"
        "Derived from the table above (\"beats\" = median time ratio below 1); between the densest winning and "
        "the sparsest losing block density the threshold is not resolved by these patterns. "
        "The one-off compile (first call) is excluded from the ratios."
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
    rows = []
    with torch.no_grad():
        for spec in args.patterns:
            for n in args.lengths:
                row = bench_one(spec, n, args)
                rows.append(row)
                print(
                    f"{spec:>16} L={n:<5} dense {row['dense'] * 1e3:8.2f} ms  sdpa/dense {row['sdpa'] / row['dense']:5.2f}"
                    f"  flex/dense {row['flex'] / row['dense']:5.2f}  build/dense {row['flex_mask'] / row['dense']:5.2f}"
                    f"  first call {row['first_call']:5.1f} s  max diff {row['max_diff']:.1e}",
                    flush=True,
                )
    total = time.perf_counter() - began
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])
    report = f"""# Attention backends: forward time on CPU

Command (from the repository root): `{command}`

- Machine: {machine()}
- Versions: Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}
- Date: {datetime.date.today().isoformat()}
- Shapes: B={args.batch}, H={args.heads}, D={args.head_dim}, float32, forward only under `torch.no_grad()`
- Timing: `time.perf_counter`, median of {args.repeats} samples per variant, variants interleaved round-robin;
  FlexAttention BlockMask tiles of {attention.FLEX_BLOCK_SIZE}; total runtime {total / 60:.1f} min
- Checked first: sdpa-masked and flex agree with a float64 eager reference (max abs diff < {TOLERANCE:g};
  largest seen {max(r["max_diff"] for r in rows):.1e})

Ratios are to dense SDPA without a mask (`F.scaled_dot_product_attention(q, k, v)`); below 1 is faster than dense.
*flex mask build* is `create_block_mask` (via `build_mask(..., "flex")`), paid once per model forward and shared
by all layers. *flex first call* is the compile (after `torch._dynamo.reset()`) plus the first run, excluded
from the ratios. Element density is 1 - sparsity; block density is the fraction of {attention.FLEX_BLOCK_SIZE}x
{attention.FLEX_BLOCK_SIZE} tiles FlexAttention has to compute.

{table(rows)}

## Crossover

{crossover_text(rows, args.layers)}
"""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(f"\n{table(rows)}\n\n{crossover_text(rows, args.layers)}\n\nwrote {args.output} in {total / 60:.1f} min")


if __name__ == "__main__":
    main()
