"""Sparse patterns inside the model on a GPU: one prepared run for a lent H100/H200 (GPU time is short and rare).

Checks first, then times (CUDA events, medians, variants interleaved), bf16 inputs:

1. **Correctness.** The `window:64` layer on flex and tiles against the eager layer; the flex and tiles kernels
   against a float64 reference, with padding.
2. **Whole layer.** One BERT-base layer (hidden 768, 12 heads) with the model's own mask building, window:64, at
   L = 4096 and 16384: flex and tiles against the dense SDPA layer, forward and forward+backward; and the model's
   flex forward against the bare kernel (BlockMask built once) plus the layer's dense parts.
3. **Bare kernel.** FlexAttention with a BlockMask built once (B=1, H=12, D=64, |i−j| ≤ 64) against SDPA at
   L = 16384 and 65536 (forward), and the block map / BlockMask build time.
4. **Twenty patterns.** Compilations and the steady-state forward of window:64 before and after twenty other
   patterns in the same process (the tile-lookup mask_mod: patterns as data).

Writes ``benchmarks/masks_gpu.md``. Smoke-test it on CPU first: ``python scripts/benchmark_gpu_masks.py --smoke``
(tiny sizes, forward only, no report unless ``--output`` is given).

    python scripts/benchmark_gpu_masks.py [--output benchmarks/masks_gpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
import traceback
import warnings
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_sparse import attention, block_maps, patterns  # noqa: E402
from hf_sparse.benchmarking import bert_layer, median_ms  # noqa: E402

warnings.filterwarnings("error", message=".*flex_attention called without torch.compile.*")


def interleaved(variants: dict, repeats: int, time_one) -> dict[str, float]:
    for fn in variants.values():  # warm-up: compiles, caches
        fn()
        fn()
    samples = {name: [] for name in variants}
    for r in range(repeats):
        names = list(variants)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(time_one(variants[name], 1))
    return {name: statistics.median(s) for name, s in samples.items()}


def layer_section(device, dtype, lengths, repeats, backward: bool, time_one) -> list[dict]:
    return [layer_row(n, device, dtype, repeats, backward, time_one) for n in lengths]


def layer_row(n, device, dtype, repeats, backward: bool, time_one) -> dict:
    x = torch.randn(1, n, 768, device=device, dtype=dtype)
    dense_model, dense_forward = bert_layer("dense", n, "sdpa")
    models = {"dense": (dense_model, dense_forward)}
    for backend in ("flex", "tiles"):
        model, forward = bert_layer("window:64", n, backend)
        model.load_state_dict(dense_model.state_dict())
        models[backend] = (model, forward)
    eager_model, eager_forward = bert_layer("window:64", n, "eager")
    eager_model.load_state_dict(dense_model.state_dict())
    for model, _ in [*models.values(), (eager_model, None)]:
        model.to(device=device, dtype=dtype)
    with torch.no_grad():
        want = eager_forward(x).float() if n <= 4096 else None
        diffs = {
            b: (models[b][1](x).float() - want).abs().max().item() if want is not None else None
            for b in ("flex", "tiles")
        }
        del want
        forward_times = interleaved({b: (lambda f=f: f(x)) for b, (_, f) in models.items()}, repeats, time_one)
        attn = dense_model.encoder.layer[0].attention.self
        q, k, v = (p(x).view(1, n, 12, 64).transpose(1, 2) for p in (attn.query, attn.key, attn.value))
        bm = attention.build_mask(patterns.parse("window:64"), None, n, device, "flex")
        kernels = interleaved(
            {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                "flex": lambda: attention.attend(q, k, v, bm, scaling=0.125),
            },
            repeats,
            time_one,
        )
    row = {"L": n, "forward": forward_times, "kernels": kernels, "diffs": diffs}
    row["overhead_flex"] = forward_times["flex"] / (forward_times["dense"] - kernels["sdpa"] + kernels["flex"])
    if backward:
        xg = x.clone().requires_grad_(True)
        for model, _ in models.values():
            model.train()

        def step(forward):
            forward(xg).float().sum().backward()

        row["backward"] = interleaved({b: (lambda f=f: step(f)) for b, (_, f) in models.items()}, repeats, time_one)
    print(row, flush=True)
    return row


def kernel_section(device, dtype, lengths, repeats, time_one) -> list[dict]:
    return [kernel_row(n, device, dtype, repeats, time_one) for n in lengths]


def kernel_row(n, device, dtype, repeats, time_one) -> dict:
    q, k, v = (torch.randn(1, 12, n, 64, device=device, dtype=dtype) for _ in range(3))
    pattern = patterns.parse("window:64")
    block_maps.CACHE.clear()
    t = time.perf_counter()
    bm = attention.build_mask(pattern, None, n, device, "flex")
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_build = (time.perf_counter() - t) * 1e3
    with torch.no_grad():
        times = interleaved(
            {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                "flex": lambda: attention.attend(q, k, v, bm, scaling=0.125),
                "lookup": lambda: attention.build_mask(pattern, None, n, device, "flex"),
            },
            repeats,
            time_one,
        )
    row = {"L": n, "first_build_ms": first_build, **times}
    print(row, flush=True)
    return row


def lookup_with_arithmetic(block_map, device):
    """The library's tile-lookup ``mask_mod`` with positions split into (tile, offset) by ``//`` and ``%`` instead of
    two lookup tables (the tables are there for Inductor's CPU template; on CUDA the lookup is the only user)."""
    bits, tile_id = block_map.bits.reshape(-1), block_map.tile_id.reshape(-1)
    blocks, block = torch.tensor(block_map.blocks, device=device), block_map.block
    step = torch.tensor(int(block_map.heads > 1), device=device)

    def mask_mod(b, h, q_idx, k_idx):
        tile = tile_id[((h * step * blocks + q_idx // block) * blocks + k_idx // block).clamp(min=0)]
        return bits[((tile * block + q_idx % block) * block + k_idx % block).clamp(min=0)]

    return mask_mod


def mask_mod_row(n, device, dtype, repeats, time_one) -> dict:
    """What the bare flex kernel's time is made of at length ``n`` (window:64, the same block structure every time,
    only the ``mask_mod`` differs): the library's tile lookup (six table reads per pair), the same lookup with
    positions split by ``//`` and ``%`` (two reads), the pattern's own closed form (no read), and none at all (every
    pair of a visited tile kept: the floor the block structure allows; its output is not window:64's)."""
    from hf_sparse.block_maps import cached_block_map

    pattern = patterns.parse("window:64")
    q, k, v = (torch.randn(1, 12, n, 64, device=device, dtype=dtype) for _ in range(3))
    block_map = cached_block_map(pattern, n, device, 128)
    mods = {
        "tile lookup": None,
        "tile lookup, // and %": lookup_with_arithmetic(block_map, device),
        "own closed form": pattern.mask_mod(n, device),
        "none (floor)": lambda b, h, q_idx, k_idx: q_idx >= 0,
    }
    flex = attention.compiled_flex_attention(device.type)
    row = {"L": n, "sdpa": time_one(lambda: F.scaled_dot_product_attention(q, k, v), repeats)}
    want = None
    for name, mod in mods.items():
        try:
            call = partial(flex, q, k, v, block_mask=block_map.block_mask(None, mod), scale=0.125)
            with torch.no_grad():
                out = call()  # compiles
                want = out if want is None else want
                row[name] = (time_one(call, repeats), (out.float() - want.float()).abs().max().item())
        except Exception as exc:  # a mask_mod the compiler refuses (the CPU template, smoke runs): say so
            row[name] = (None, f"{type(exc).__name__}: {exc}"[:80])
    print(row, flush=True)
    return row


def many_section(device, dtype, n, repeats, time_one) -> dict:
    from torch._dynamo.utils import counters

    others = [f"window:{w}" for w in (3, 9, 17, 33, 96)] + ["global:2", "strided:128", "fixed:128,8", "logsparse"]
    others += ["dilated:16,4", "block_local:256", "star", "longformer:32,2", "bigbird:32,1,2", "causal"]
    others += ["no_diagonal", "window:48&causal", "window:40+global:3", "block_local:128+strided:512", "random:4"]
    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(1, n, 768, device=device, dtype=dtype)
    model, forward = bert_layer("window:64", n, "flex")
    model.to(device=device, dtype=dtype)
    with torch.no_grad():
        before = interleaved({"f": lambda: forward(x)}, repeats, time_one)["f"]
        for spec in others:
            model.config.attention_pattern = spec
            forward(x)
        model.config.attention_pattern = "window:64"
        after = interleaved({"f": lambda: forward(x)}, repeats, time_one)["f"]
    return {"L": n, "before_ms": before, "after_ms": after, "compilations": counters["stats"]["unique_graphs"]}


SECTIONS = ("layer", "kernel", "mask_mod", "patterns")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, forward only")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (device time is short: run what is still unmeasured)",
    )
    args = parser.parse_args()
    chosen = args.sections.split(",")
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; valid: {','.join(SECTIONS)}")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    time_one = partial(median_ms, device=device)
    repeats = 2 if args.smoke else args.repeats
    began = time.perf_counter()
    failed = []  # GPU time is rare: a section that fails is reported and the others still run

    def section(name, run, empty):
        if name not in chosen:
            return empty
        try:
            return run()
        except Exception as exc:
            traceback.print_exc()
            failed.append(f"- {name}: {type(exc).__name__}: {exc}"[:600])
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return empty

    layers = section(
        "layer",
        lambda: layer_section(device, dtype, [256] if args.smoke else [4096, 16384], repeats, not args.smoke, time_one),
        [],
    )
    kernels = section(
        "kernel",
        lambda: kernel_section(device, dtype, [512] if args.smoke else [16384, 65536], repeats, time_one),
        [],
    )
    mask_mods = section(
        "mask_mod",
        lambda: [mask_mod_row(n, device, dtype, repeats, time_one) for n in ([256] if args.smoke else [16384, 65536])],
        [],
    )
    many = section(
        "patterns", lambda: many_section(device, dtype, 256 if args.smoke else 4096, repeats, time_one), None
    )
    print(many, flush=True)
    total = time.perf_counter() - began
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    lines = [
        "# Sparse patterns inside the model on a GPU",
        "",
        f"Command: `python scripts/benchmark_gpu_masks.py{' --smoke' if args.smoke else ''}"
        f"{'' if args.sections == ','.join(SECTIONS) else ' --sections ' + args.sections}`  ",
        f"Device: {name}; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{datetime.date.today().isoformat()}; {total / 60:.1f} min; {dtype}; CUDA-event medians of {repeats}.",
        "",
        "## Whole layer (window:64, BERT-base), mask building included",
        "",
        "| L | dense SDPA layer fwd (ms) | flex / dense | tiles / dense | fwd+bwd dense (ms) | flex / dense "
        "| tiles / dense | flex layer / (dense parts + bare kernel) | max abs diff to eager (flex, tiles) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in layers:
        f, b = r["forward"], r.get("backward")
        bw = f"{b['dense']:.2f} | {b['flex'] / b['dense']:.2f} | {b['tiles'] / b['dense']:.2f}" if b else "- | - | -"
        lines.append(
            f"| {r['L']} | {f['dense']:.2f} | {f['flex'] / f['dense']:.2f} | {f['tiles'] / f['dense']:.2f} | {bw} "
            f"| {r['overhead_flex']:.2f} | {r['diffs']} |"
        )
    lines += [
        "",
        "## Bare kernel (B=1, H=12, D=64, window:64)",
        "",
        "| L | SDPA (ms) | flex (ms) | SDPA / flex | first block map + BlockMask (ms) | cached BlockMask lookup (ms) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in kernels:
        lines.append(
            f"| {r['L']} | {r['sdpa']:.3f} | {r['flex']:.3f} | {r['sdpa'] / r['flex']:.1f}x "
            f"| {r['first_build_ms']:.1f} | {r['lookup']:.3f} |"
        )
    if mask_mods:
        names = [name for name in mask_mods[0] if name not in ("L", "sdpa")]
        lines += [
            "",
            "## What the bare flex kernel's time is made of: its mask_mod (window:64, same BlockMask tiles), ms",
            "",
            "max abs diff to the library's tile lookup in brackets; `none` keeps every pair of a visited tile.",
            "",
            "| L | SDPA | " + " | ".join(names) + " |",
            "|---:|---:|" + "---:|" * len(names),
        ]
        for r in mask_mods:
            cells = [f"{r[name][0]:.3f} ({r[name][1]:.2g})" if r[name][0] is not None else r[name][1] for name in names]
            lines.append(f"| {r['L']} | {r['sdpa']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "## Twenty patterns in one process", ""]
    if many is not None:
        lines += [
            f"window:64 layer at L={many['L']}: {many['before_ms']:.2f} ms before, {many['after_ms']:.2f} ms after "
            f"twenty other patterns ({many['after_ms'] / many['before_ms']:.2f}x); {many['compilations']} "
            "compilations in all.",
            "",
        ]
    if failed:
        lines += ["## Sections that failed", "", *failed, ""]
    report = "\n".join(lines)
    print(report)
    output = args.output or (None if args.smoke else REPO / "benchmarks" / "masks_gpu.md")
    if output is not None:
        output.write_text(report)
        print(f"wrote {output}")


if __name__ == "__main__":
    main()
