"""The fused entmax kernels and the row kernel compile for the GPU (sm_90) here, on a machine without one.

The other kernel tests run under Triton's interpreter, which never meets the GPU compiler: a kernel that does not
compile, or whose compilation never ends (a threshold-pass kernel, since replaced, did both on an H100),
passed them. ``scripts/kernel_resources.py`` compiles every kernel a forward and backward call launches for a
stand-in sm_90 target and reports each one's registers and spills from ptxas; this runs it on every case it
knows.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# after the threshold pass, whichever it is; the sweeps write their own tile lists: no list kernel of their own
LATER = {"fallback_kernel", "forward_kernel", "backward_dq_kernel", "backward_dkdv_kernel", "tile_columns_kernel"}
TOPK = LATER | {"threshold_kernel"}
STREAM = LATER | {"stream_kernel", "gather_kernel"}
BOUND = LATER | {"bound_kernel"}
ROWS = {"rows_forward_kernel", "rows_backward_kernel"}  # entmax_topk's Triton row kernel
CASES_ROWS = (  # each normaliser with rows held whole and swept in chunks; element masks; the narrowest tile
    "rows-2", "rows-1000", "rows-8000", "rows-16000", "rows-sparsemax", "rows-sparsemax-16000", "rows-bisection",
    "rows-bisection-16000",
)
SWEEPS = TOPK - {"tile_columns_kernel"} | {"bound_kernel"}
# the sweeps over key (or query) tiles that must stay software-pipelined: their loop bodies hold no branch on the
# tile (tile lists instead) and no inner loop; full float32's dK/dV kernel runs unpipelined on purpose
# (entmax_triton.FULL_PRECISION_DKDV_STAGES)
PIPELINED = SWEEPS
UNPIPELINED = {("float32", "backward_dkdv_kernel"), ("float32-dropout", "backward_dkdv_kernel")}
# the sweeps that read a block's whole tiles first, without the mask tests (hf_sparse.entmax_triton_kernels.
# _unmasked_tiles): two loops, the first the shorter; the training forward too with dropout, whose draws take it past
# 168 registers either way, and one loop without (164 registers against 183: three programs per SM instead of two)
SPLIT = {"bound_kernel", "fallback_kernel", "backward_dq_kernel"}
SPLIT_WITH_DROPOUT = {"forward_kernel"}
# dK/dV's list of query tiles starts with those that need the tests (causal: the diagonal's; with codes: all; with an
# element mask: all in the key tiles past the keys every query keeps), the others after them (_masked_query_tiles):
# two loops in the causal and element-mask cases, the second the shorter; one elsewhere
SPLIT_MASKED_FIRST = {"backward_dkdv_kernel"}
TWO_DKDV_LOOPS = {"causal", "stream-causal-dropout", "predicted-mask", "padding-dropout"}
MAX_SPILLED_BYTES = 4096
# attention dropout's Philox draws, 8 pairs each, laid out as the tensor cores lay out a tile (no trip through shared
# memory): a tile with dropout takes about twice the instructions of one without (1.8-2.1x on sm_90 with Triton
# 3.9); a draw per pair took 5-7x (hf_sparse.entmax_triton_kernels._kept)
DROPOUT_KERNELS = {"forward_kernel", "backward_dq_kernel", "backward_dkdv_kernel"}
MAX_DROPOUT_COST = 3
EXPECTED = {
    "default": BOUND,
    "causal": BOUND,
    "dropout": BOUND,
    "stream": STREAM,
    "stream-causal-dropout": STREAM,
    "stream-bisection": STREAM,
    "topk": TOPK,
    "topk-block-mask": TOPK,
    "topk-bisection": TOPK,
    "float32": BOUND,
    "float32-dropout": BOUND,
    "tf32": BOUND,
    "sparsemax": BOUND,
    "block-mask": BOUND,
    "bisection": BOUND,
    "predicted-mask": BOUND,
    "padding-dropout": BOUND,
    "predicted-codes": BOUND,
    "predicted-distance": BOUND | {"code_tiles_kernel"},  # distance codes' exact tiles first
    **{case: ROWS for case in CASES_ROWS},
}


def test_every_kernel_of_every_case_compiles_for_sm_90(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # compiled now, not found from an earlier run
    report = tmp_path / "kernels.md"
    done = subprocess.run(
        [sys.executable, "scripts/kernel_resources.py", "--arch", "90", "--output", str(report)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # a compilation that never ends fails here (stdout says which kernel it was in)
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = [line.split("|")[1:-1] for line in report.read_text().splitlines() if line.startswith("| ") and "`" in line]
    compiled, first_loop = {}, {}
    for case, kernel, _tiles, _seconds, registers, spills, _shared, _warps, prefetch, loops in rows:
        case, kernel = case.strip(), kernel.strip(" `")
        compiled.setdefault(case, set()).add(kernel)
        counts = [] if loops.strip() == "-" else [int(n) for n in loops.split("+")]  # instructions per loop
        if counts:
            first_loop[case, kernel] = counts[0]
        if kernel in SPLIT:
            unmasked, masked = counts[:2]
            assert unmasked < masked, (case, kernel, loops)
        if kernel in SPLIT_WITH_DROPOUT:
            assert len(counts) == (2 if "dropout" in case else 1), (case, kernel, loops)
            assert len(counts) == 1 or counts[0] < counts[1], (case, kernel, loops)
        if kernel in SPLIT_MASKED_FIRST:
            assert len(counts) == (2 if case in TWO_DKDV_LOOPS else 1), (case, kernel, loops)
            assert len(counts) == 1 or counts[1] < counts[0], (case, kernel, loops)
        if kernel in PIPELINED:
            assert (int(prefetch) > 0) == ((case, kernel) not in UNPIPELINED), (case, kernel, prefetch)
        assert 0 < int(registers) <= 255, (case, kernel, registers)
        # a few hundred bytes spilled is register pressure; 11-28 KB was full float32 at 64 x 64 tiles, whose
        # products the FMA lowering kept in local memory (the reason for GPU_BLOCKS_FULL_PRECISION)
        stored = int(spills.split("/")[0])
        assert stored <= MAX_SPILLED_BYTES, f"{case} {kernel}: {stored} bytes spilled per thread"
    assert compiled == EXPECTED
    for kernel in DROPOUT_KERNELS:
        cost = first_loop["dropout", kernel] / first_loop["default", kernel]
        assert cost <= MAX_DROPOUT_COST, f"{kernel}: a tile with dropout takes {cost:.1f}x the instructions"
