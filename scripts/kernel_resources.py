"""Compile the fused entmax kernels (and the row kernel) for a GPU architecture without a GPU; report what each costs.

GPU time is rare here, and a kernel that does not compile for the GPU (or whose compilation never ends: a
threshold-pass kernel that ranked 64 candidates per row all at once sat in LLVM for minutes on an H100 and here
alike) breaks every GPU user while the interpreter-run tests stay green. Triton's compiler needs no GPU, only a
target: a stand-in driver names one (``sm_90`` by default), every launch of a forward and backward call on CPU
tensors is turned into a compile-only warm-up, and ``ptxas -v`` (Triton's own) reports each kernel's registers
and spilled bytes. Registers and spills are static facts about the code, not timings; they say
where a kernel runs out of registers, which the GPU's timings then confirm or not.

    python scripts/kernel_resources.py --output benchmarks/kernel_resources.md
    python scripts/kernel_resources.py --cases default,stream --arch 80

It also reads each kernel's machine code (``nvdisasm``, shipped with Triton) for the length of its innermost loops:
the instructions one thread issues per trip, which for the sweeps is per key tile (each thread of a 4-warp program
holds 32 scores of a 64 x 64 tile). A sweep over a tile is mostly elementwise arithmetic on its scores, so fewer
instructions per tile is less work per tile, whatever the GPU makes of it.

``tests/test_kernel_compile.py`` runs it for every case, so CI compiles every kernel of both threshold passes,
each normaliser, float32 (both precisions), causal masks and dropout for the GPU. ``--arch 80`` (A100) works too
(Triton's older bundled ptxas).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

os.environ.pop("TRITON_INTERPRET", None)  # GPU code, not the interpreter: read when @triton.jit is applied

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_sparse import entmax_rows_triton, entmax_triton  # noqa: E402
from hf_sparse.pair_codes import PairCodes  # noqa: E402


class Case(NamedTuple):
    threshold_pass: str = entmax_triton.DEFAULT_THRESHOLD_PASS
    dtype: torch.dtype = torch.bfloat16
    causal: bool = False
    dropout: float = 0.0
    alpha: float = 1.5
    float32_precision: str = "highest"  # torch.set_float32_matmul_precision: "highest" full float32, "high" TF32
    block_mask: bool = False  # a tile mask (patterns, frozen DAM, Sparsefinder's predicted blocks)
    rows: int = 0  # > 0: entmax_topk's Triton row kernel (hf_sparse.entmax_rows_triton) on float32 rows this long
    keep: bool = False  # the row kernel with an element mask (eager attention's padding and patterns)
    # pairs tested inside the attention kernels' tiles: "mask", an element mask (patterns, Sparsefinder's top_k and
    # bigbird), with its tiles as block mask; "codes", per-token codes (Sparsefinder's k-means clustering: one word
    # of membership bits, up to 32 clusters, and its window of 3); "distance", distance codes (its default
    # predictor: 4 projected coordinates, and the window); "padding", an element mask alone (the models' padding)
    pairs: str = ""


# what models run, with a backward each
CASES = {
    "default": Case(),  # SparseBERT, Sparsefinder's encoder, bf16
    "causal": Case(causal=True),  # Marian's decoder
    "dropout": Case(dropout=0.1),  # training with attention dropout
    "stream": Case(threshold_pass="stream"),
    "stream-causal-dropout": Case(threshold_pass="stream", causal=True, dropout=0.1),  # its gather's dropout
    "stream-bisection": Case(threshold_pass="stream", alpha=1.3),  # its bisection over the held scores
    "topk": Case(threshold_pass="topk"),  # the other threshold passes
    "topk-block-mask": Case(threshold_pass="topk", block_mask=True),  # its loop over the allowed tiles' list
    "topk-bisection": Case(threshold_pass="topk", alpha=1.3),  # its bisection over the candidates
    "float32": Case(dtype=torch.float32),  # full float32 products (torch's default precision)
    "float32-dropout": Case(dtype=torch.float32, dropout=0.1),  # their 32-key tiles' dropout draws
    "tf32": Case(dtype=torch.float32, float32_precision="high"),
    "sparsemax": Case(alpha=2.0),
    "block-mask": Case(block_mask=True),  # the threshold pass loops over the allowed tiles' list
    "bisection": Case(alpha=1.3),
    "predicted-mask": Case(pairs="mask"),
    "padding-dropout": Case(pairs="padding", dropout=0.1),  # fine-tuning a SparseBERT on padded batches
    "predicted-codes": Case(pairs="codes"),
    "predicted-distance": Case(pairs="distance"),
    # the row kernel (eager attention and entmax_topk on CUDA), float32 scores: rows held whole (the longest at 16
    # warps) and the long-row path; rows of two scores. Lengths that are not multiples of 16, as attention's mostly
    # are (Triton compiles multiples of 16 apart, with wider loads)
    "rows-2": Case(rows=2, keep=True),  # the narrowest tile, 128 rows to a program
    "rows-1000": Case(rows=1000),
    "rows-8000": Case(rows=8000, keep=True),
    "rows-16000": Case(rows=16000, keep=True),
    "rows-sparsemax": Case(rows=1000, alpha=2.0, keep=True),
    "rows-sparsemax-16000": Case(rows=16000, alpha=2.0),
    "rows-bisection": Case(rows=1000, alpha=1.3, keep=True),
    "rows-bisection-16000": Case(rows=16000, alpha=1.3),
}


class StandInDriver:
    """What Triton's launcher asks the active driver while it compiles: the target, a device and a stream."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def innermost_loops(cubin: bytes) -> list[int]:
    """Instructions in each innermost loop of the kernel in ``cubin`` that multiplies matrices, in code order: the
    sweeps over key (or query) tiles, not the loops that write tile lists. From ``nvdisasm``: a loop is a backward
    branch's span; a matrix product is a tensor-core instruction (``HGMMA``, ``HMMA``) or, full float32 lowered to
    the CUDA cores, at least 64 fused multiply-adds (a 32 x 32 x 32 product is 256 per thread)."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([knobs.nvidia.nvdisasm.path, "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout
    labels, branches, code = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line.strip())
        if label:
            labels[label.group(1)] = len(code)
        elif re.match(r"^\s+/\*[0-9a-f]{4,}\*/", line):
            target = re.search(r"\bBRA\b.*?(\.L_x_\d+)", line)
            if target:
                branches.append((len(code), target.group(1)))
            code.append(line)
    spans = [(labels[name], at) for at, name in branches if name in labels and labels[name] <= at]
    inner = [(a, b) for a, b in spans if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in spans)]

    def multiplies(body):
        return any(re.search(r"\bH(?:G)?MMA\b", line) for line in body) or sum(" FFMA" in line for line in body) >= 64

    return [b - a + 1 for a, b in sorted(inner) if multiplies(code[a : b + 1])]


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spilled bytes and stack of the kernel in ``ptx``, from Triton's own ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "kernel.ptx"
        source.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        done = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(source), "-o", str(Path(tmp) / "k")],
            capture_output=True,
            text=True,
        )
    log = done.stderr + done.stdout
    if done.returncode:
        raise RuntimeError(f"ptxas failed for sm_{arch}: {log[-2000:]}")

    def number(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
    }


seen: set[int] = set()  # the kernels compiled so far (the launcher's own cache hands them out again)


def compile_case(name: str, arch: int, report, blocks=None) -> None:
    """Compile every kernel one forward (and backward) call of case ``name`` launches; ``report(row)`` each."""
    case = CASES[name]
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        began = time.perf_counter()
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        seconds = None if id(kernel) in seen else time.perf_counter() - began  # None: an earlier case's kernel
        seen.add(id(kernel))
        row = dict(case=name, kernel=self.fn.__name__, seconds=seconds, warps=kernel.metadata.num_warps)
        # query rows x keys (gather_kernel: rows only; tile_columns_kernel: neither)
        row["tiles"] = f"{kwargs.get('BM', '-')}x{kwargs.get('BN', '-')}"
        ptx = kernel.asm["ptx"]
        # software pipelining shows as asynchronous global-to-shared copies (the next tile's loads in flight)
        row.update(shared=kernel.metadata.shared, prefetch=len(re.findall(r"\bcp\.async\.(?:ca|cg|bulk)", ptx)))
        row.update(ptxas_report(ptx, arch), loops=innermost_loops(kernel.asm["cubin"]))
        report(row)
        return kernel

    with compiling_only(compile_only, entmax_rows_triton if case.rows else entmax_triton):
        if case.rows:
            kind = {1.5: "entmax15", 2.0: "sparsemax"}.get(case.alpha, "entmax_alpha")
            x = torch.randn(4, case.rows, requires_grad=True)
            keep = torch.ones(x.shape, dtype=torch.bool) if case.keep else None
            entmax_rows_triton.entmax_rows(x, keep, kind, alpha=case.alpha).sum().backward()
            return
        q, k, v = (torch.randn(1, 2, 256, 64, dtype=case.dtype, requires_grad=True) for _ in range(3))
        block_mask = torch.ones(1, 1, 2, 2, dtype=torch.bool) if case.block_mask or case.pairs == "mask" else None
        keep = None
        if case.pairs in ("mask", "padding"):
            keep = torch.ones(1, 2, 256, 256, dtype=torch.bool)
        elif case.pairs == "codes":
            clusters = torch.ones(1, 2, 256, 1, dtype=torch.int64)
            keep = PairCodes(clusters, clusters, match="bits", window=3)
        elif case.pairs == "distance":
            coordinates = torch.randn(1, 2, 256, 5, dtype=torch.float64)
            keep = PairCodes(coordinates, coordinates, match="distance", window=3)
        precision = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(case.float32_precision)
        try:
            out = entmax_triton.entmax_attention(
                q,
                k,
                v,
                alpha=case.alpha,
                causal=case.causal,
                dropout=case.dropout,
                threshold_pass=case.threshold_pass,
                blocks=blocks,
                block_mask=block_mask,  # 128-tiles of 256
                keep=keep,
            )
            out.sum().backward()  # nothing ran: the values are garbage, the launches are real
        finally:
            torch.set_float32_matmul_precision(precision)


@contextlib.contextmanager
def compiling_only(compile_only, module):
    """Every kernel launch compiles instead (``compile_only`` as ``JITFunction.run``), and ``module`` (the one whose
    function the case calls) finds the kernels runnable: the CPU tensors only give the kernels their types."""
    run, available = JITFunction.run, module.unavailable_reasons
    JITFunction.run = compile_only
    module.unavailable_reasons = lambda device: []
    try:
        yield
    finally:
        JITFunction.run = run
        module.unavailable_reasons = available


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100/H200), 80 (A100)")
    parser.add_argument("--blocks", default=None, help="kernel tiles 'rows,keys,candidates' (default: the kernel's)")
    parser.add_argument("--output", type=Path, default=None, help="write the report here (markdown)")
    args = parser.parse_args()
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; valid: {','.join(CASES)}")
    blocks = tuple(int(x) for x in args.blocks.split(",")) if args.blocks else None
    driver.set_active(StandInDriver(args.arch))
    rows = []

    def loops(row):
        return " + ".join(map(str, row["loops"])) or "-"

    def seconds(row):
        return "same as above" if row["seconds"] is None else f"{row['seconds']:.1f} s"

    def report(row):
        rows.append(row)
        print(
            f"{row['case']:>10} {row['kernel']:<22} {row['tiles']:>6} {seconds(row):>13}  "
            f"{row['registers']:3d} registers  spills {row['spill_stores']}/{row['spill_loads']} B  "
            f"shared {row['shared'] // 1024} KiB  async copies {row['prefetch']}  loops {loops(row)}",
            flush=True,  # a compilation that never ends shows where it is
        )

    began = time.perf_counter()
    for name in cases:
        compile_case(name, args.arch, report, blocks)
    total = time.perf_counter() - began
    command = " ".join(["python scripts/kernel_resources.py", *sys.argv[1:]])
    lines = [
        f"# The fused entmax kernels and the row kernel compiled for sm_{args.arch}, without a GPU",
        "",
        f"`{command}` on {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
        f"{datetime.date.today().isoformat()}: torch {torch.__version__}, triton {triton.__version__}; "
        f"{total:.0f} s in all. Tiles: {'--blocks ' + args.blocks if blocks else 'the defaults'} (query rows x "
        "keys in the table), head dim 64. Registers are per thread (255 is the most a thread gets); spilled "
        "bytes are per thread, stores/loads. Compile seconds are this machine's CPU (a kernel found in Triton's "
        "on-disk cache takes about a second); `same as above`: a kernel an earlier case compiled. Async copies: "
        "`cp.async` instructions in the PTX, the loads Triton's software pipelining issues for the next tile while "
        "this one is computed (0: every load waits). Loop instructions: the length of each innermost loop that "
        "multiplies matrices, in the machine code and in code order (a sweep that reads its unmasked tiles first has "
        "two: unmasked, then masked; the fallback two such sweeps; causal dK/dV the diagonal's masked query "
        "tiles, then the others), the instructions a thread issues per tile. "
        "1.5-entmax and sparsemax run the fallback in two launches, compiled apart: first one Newton step for "
        "every marked row (one sweep), then the rest for the rows it left (the sweep and the closing one). "
        "`rows-*`: entmax_topk's Triton row kernel (`hf_sparse.entmax_rows_triton`) on 4 float32 rows of that many "
        "scores (1000 if not named; some cases with an element mask: `CASES` in the script). It multiplies no "
        "matrices: its loops are listed only where a body holds 64 fused multiply-adds or more.",
        "",
        "| case | kernel | tiles | compile | registers | spills (B) | shared (KiB) | warps | async copies "
        "| loop instructions |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | `{r['kernel']}` | {r['tiles']} | {seconds(r)} | {r['registers']} "
            f"| {r['spill_stores']}/{r['spill_loads']} | {r['shared'] // 1024} | {r['warps']} | {r['prefetch']} "
            f"| {loops(r)} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
