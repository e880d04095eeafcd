"""Time the fused entmax attention kernel against another version of itself, side by side in one run on one GPU.

A kernel change is judged by its ratio to the version before it, measured in the same process on the same card:
ratios to SDPA from two different runs (or cards) differ by more than many changes gain. The baseline is a folder
holding that version's ``entmax_triton.py``, ``entmax_triton_kernels.py`` and ``entmax_topk.py``, e.g. from git:

    mkdir -p .bench_old && for f in entmax_triton entmax_triton_kernels entmax_topk; do
        git show 244924d:hf_sparse/$f.py > .bench_old/$f.py; done
    python scripts/benchmark_kernel_versions.py --baseline .bench_old --output kernel_versions.md

For each length and mask (non-causal, causal): forward and forward + backward of SDPA, the baseline and this
checkout's kernel (bf16, 16 heads, head dim 64 by default), the largest difference between the two kernels'
outputs and gradients, and the ratios. ``--launch KERNEL:OPTION=VALUE,...`` replaces one kernel's launch options
in this checkout (``entmax_triton.LAUNCH_OPTIONS``; ``KERNEL:`` for Triton's defaults), so that runs in one GPU
call can time, say, ``bound_kernel:maxnreg=128`` and ``bound_kernel:num_warps=8`` each against the same baseline.
``--generate`` adds the entmax Marian's ``generate`` (issue 12's decoding benchmark,
``benchmarking.marian_generate``) with each version's kernel in the model's attention, next to the softmax model:
one query row per call, where a version's launches, not its sweeps, are the cost. ``--padding FRACTION`` pads the
last keys of the sequence as the models pass padding to the kernel, as an element mask (``(B, 1, 1, L)``,
broadcast; SDPA gets the same mask). ``--dropout P`` times training with attention dropout (BERT's default 0.1),
drawn in each version's kernels and in SDPA's: the versions draw different pairs, so their outputs are not compared
then. On CPU (``TRITON_INTERPRET=1``) it runs a small smoke test of the same paths:
the interpreter's times say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import platform
import statistics
import sys
import time
import types
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_sparse import attention, entmax_triton  # noqa: E402
from hf_sparse.benchmarking import marian_generate, median_ms  # noqa: E402

BASELINE_FILES = ("entmax_triton", "entmax_triton_kernels", "entmax_topk")


def load_baseline(folder: Path):
    """The baseline's ``entmax_triton`` module, imported as package ``kernel_baseline`` (its relative imports
    resolve inside ``folder``), next to this checkout's."""
    missing = [f"{name}.py" for name in BASELINE_FILES if not (folder / f"{name}.py").is_file()]
    if missing:
        raise SystemExit(f"--baseline {folder}: missing {', '.join(missing)} (the three modules of one version)")
    package = types.ModuleType("kernel_baseline")  # a package with no __init__: only its modules load
    package.__path__ = [str(folder)]
    sys.modules["kernel_baseline"] = package
    return importlib.import_module("kernel_baseline.entmax_triton")


def launch_option(text: str) -> tuple[str, dict[str, int]]:
    """``KERNEL:OPTION=VALUE,...`` (``--launch``) as ``(kernel, options)``."""
    kernel, _, options = text.partition(":")
    try:
        parsed = {name: int(value) for name, value in (o.split("=") for o in options.split(",") if o)}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected KERNEL:OPTION=VALUE,... (e.g. bound_kernel:maxnreg=128)"
        ) from None
    if kernel not in entmax_triton.TUNABLE_KERNELS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {kernel!r} is not one of the kernels launched with options: "
            f"{', '.join(entmax_triton.TUNABLE_KERNELS)}"
        )
    return kernel, parsed


def measure(fn, device, repeats: int) -> float:
    fn()  # compilation
    if device.type == "cuda":
        torch.cuda.synchronize()
    return median_ms(fn, repeats, device)


def compare(versions: dict, n: int, heads: int, dim: int, dtype, causal: bool, device, repeats: int,
            padding: float = 0.0, dropout: float = 0.0) -> dict:
    """Forward and forward + backward times of every version at one length, and the kernels' largest differences
    (None with ``dropout``: each version draws its own pairs). ``padding``: that share of the keys, the last,
    padded by an element mask (``keep``; None without padding)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, heads, n, dim, device=device, dtype=dtype)
    keep = None
    if padding:
        keep = (torch.arange(n, device=device) < round(n * (1 - padding))).expand(1, 1, n, n)
    row = {}
    outputs = {}
    for name, attend in versions.items():
        def forward(attend=attend):
            with torch.no_grad():
                return attend(q, k, v, causal, keep, dropout)

        def forward_backward(attend=attend):
            q.grad = k.grad = v.grad = None
            attend(q, k, v, causal, keep, dropout).backward(grad)

        row[name] = (measure(forward, device, repeats), measure(forward_backward, device, repeats))
        if name != "SDPA":
            forward_backward()
            outputs[name] = [forward().float(), q.grad.float(), k.grad.float(), v.grad.float()]
    current, baseline = outputs["this checkout"], outputs["baseline"]
    row["difference"] = None if dropout else max((a - b).abs().max().item() for a, b in zip(current, baseline))
    return row


def compare_generate(baseline, this, device, repeats: int, smoke: bool) -> list[str]:
    """The entmax Marian's ``generate`` with the baseline's kernel and this checkout's (the models call
    ``attention.entmax_attention``, patched for the baseline), and the softmax model; the token ids must agree.
    Timed round-robin, one call of each per round, medians over the rounds: a whole ``generate`` is host-bound,
    and times taken one version after the other drifted by more than the versions differ (the softmax model's
    took 584 to 786 ms in three calls on one kind of machine)."""
    variants = {
        "softmax": ("softmax", None),
        "baseline": ("entmax15", baseline.entmax_attention),
        "this checkout": ("entmax15", this),
    }
    models, times, tokens = {}, {name: [] for name in variants}, {}
    kept = attention.entmax_attention

    def run(name):
        fn, kernel = variants[name]
        attention.entmax_attention = kernel or kept
        try:
            with torch.no_grad():
                return models[name][1]()
        finally:
            attention.entmax_attention = kept

    for name, (fn, kernel) in variants.items():
        # "fused" named: what "auto" picks on CUDA, and what the interpreter runs in the CPU smoke test
        models[name] = marian_generate(fn, "auto" if kernel is None else "fused", device, smoke=smoke)
        tokens[name] = run(name)  # (compiles)
        used = sorted(set(models[name][0].attention_backends_used().values()))
        if fn != "softmax" and used != ["fused"]:
            raise SystemExit(f"generate with {name}'s kernel ran {used}, not the fused kernel")
    for _ in range(repeats):
        for name in variants:
            times[name].append(median_ms(lambda name=name: run(name), 1, device))
    soft, base, ours = (statistics.median(times[name]) for name in variants)
    same = torch.equal(tokens["baseline"], tokens["this checkout"])
    return [
        "",
        f"Entmax Marian `generate` (`benchmarking.marian_generate`{', smoke size' if smoke else ''}), float32, "
        f"medians of {repeats} rounds (one call of each per round), ms:",
        "",
        "| softmax | baseline | this | this / baseline | same tokens |",
        "|---:|---:|---:|---:|---|",
        f"| {soft:.0f} | {base:.0f} ({base / soft:.2f}x) | {ours:.0f} ({ours / soft:.2f}x) | {ours / base:.2f} "
        f"| {'yes' if same else 'NO'} |",
    ]


def sdpa(q, k, v, causal, keep, dropout):
    """SDPA on the same pairs (``keep`` and causality as one boolean mask: it takes one or the other)."""
    if keep is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout)
    if causal:
        keep = keep & torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="folder with the other version's modules")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--generate", action="store_true", help="also time the entmax Marian's generate")
    parser.add_argument("--dropout", type=float, default=0.0, metavar="P",
                        help="attention dropout probability (training; BERT's default is 0.1)")
    parser.add_argument("--padding", type=float, default=0.0, metavar="FRACTION",
                        help="pad this share of the keys, the last, with an element mask (as the models do)")
    parser.add_argument(
        "--threshold-pass", choices=entmax_triton.THRESHOLD_PASSES, default=None,
        help="this checkout's threshold pass (default: its DEFAULT_THRESHOLD_PASS); the baseline runs its default",
    )
    parser.add_argument(
        "--launch", type=launch_option, action="append", default=[], metavar="KERNEL:OPTION=VALUE,...",
        help="this checkout's launch options for one kernel instead of entmax_triton.LAUNCH_OPTIONS' (repeatable)",
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    for kernel, options in args.launch:
        entmax_triton.LAUNCH_OPTIONS[kernel] = options
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reasons = entmax_triton.unavailable_reasons(device)
    if reasons:
        raise SystemExit("the fused kernel cannot run here: " + "; ".join(reasons))
    smoke = device.type == "cpu"
    lengths, heads, dim = ([48], 2, 16) if smoke else (args.lengths, args.heads, args.dim)
    repeats = 1 if smoke else args.repeats
    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter's bf16 dot is not a GPU's
    baseline = load_baseline(args.baseline)
    this = partial(entmax_triton.entmax_attention, threshold_pass=args.threshold_pass)
    versions = {
        "SDPA": sdpa,
        "baseline": lambda q, k, v, causal, keep, dropout: baseline.entmax_attention(q, k, v, causal=causal, keep=keep,
                                                                                    dropout=dropout),
        "this checkout": lambda q, k, v, causal, keep, dropout: this(q, k, v, causal=causal, keep=keep,
                                                                     dropout=dropout),
    }
    began = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    lines = [
        f"`python scripts/benchmark_kernel_versions.py {' '.join(sys.argv[1:] if argv is None else argv)}` on "
        f"{name}, {datetime.date.today().isoformat()}: torch {torch.__version__}; {dtype}, {heads} heads, head dim "
        f"{dim}; medians of {repeats} (CUDA events); this checkout's launch options {entmax_triton.LAUNCH_OPTIONS}."
        f"{' CPU smoke run: the times mean nothing.' if smoke else ''}",
        "",
        "| L | mask | SDPA fwd (ms) | baseline fwd | this fwd | this / baseline | SDPA fwd+bwd | baseline fwd+bwd "
        "| this fwd+bwd | this / baseline | max difference |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    for n in lengths:
        for causal in (False, True):
            r = compare(versions, n, heads, dim, dtype, causal, device, repeats, args.padding, args.dropout)
            (sf, sb), (bf, bb), (tf, tb) = r["SDPA"], r["baseline"], r["this checkout"]
            mask = ("causal" if causal else "none") + (f", {args.padding:.0%} padded" if args.padding else "")
            mask += f", dropout {args.dropout:g}" if args.dropout else ""
            difference = "- (other draws)" if r["difference"] is None else f"{r['difference']:.2g}"
            line = (
                f"| {n} | {mask} | {sf:.3f} | {bf:.3f} ({bf / sf:.1f}x) | {tf:.3f} "
                f"({tf / sf:.1f}x) | {tf / bf:.2f} | {sb:.3f} | {bb:.3f} ({bb / sb:.1f}x) | {tb:.3f} ({tb / sb:.1f}x) "
                f"| {tb / bb:.2f} | {difference} |"
            )
            lines.append(line)
            print(line, flush=True)
    if args.generate:
        rows = compare_generate(baseline, this, device, repeats, smoke)
        lines += rows
        print("\n".join(rows), flush=True)
    lines.append("")
    lines.append(f"{time.perf_counter() - began:.0f} s in all.")
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
