"""What the ``stream`` threshold pass's time depends on: its forward at L = 8192 (bf16, 16 heads, head dim 64,
non-causal) for several slot counts per row (``entmax_triton.STREAM_SLOTS``, times the candidates), Newton
steps per raising of the bounds (``STREAM_STEPS``) and warps per program (``STREAM_WARPS``), with each kernel's
GPU time (torch.profiler). Fewer slots mean more raisings; if raisings were the cost, more slots would be faster
(on an H200 they were not: benchmarks/gpu.md). More warps spread each program's registers: 255 per thread at 4
warps, 128 at 16 (benchmarks/kernel_resources.md).

    python scripts/benchmark_stream_slots.py            # on a GPU
    TRITON_INTERPRET=1 python scripts/benchmark_stream_slots.py --smoke   # CPU, tiny sizes, no timing

Prints one line per setting, with the max difference of the output to the ``topk`` pass's (bf16 rounding).
"""

import argparse
import sys
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

import hf_sparse.entmax_triton as entmax_triton
from hf_sparse.benchmarking import median_ms

# (slots per candidate, Newton steps per raising, warps): the default first
SETTINGS = ((4, 8, 4), (4, 8, 8), (4, 8, 16), (8, 8, 4), (16, 8, 4), (4, 3, 4), (2, 8, 4))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton's interpreter, no timing")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    n, heads, dim = (64, 2, 16) if args.smoke else (8192, 16, 64)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    blocks = (16, 16, 16) if args.smoke else entmax_triton.GPU_BLOCKS
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g).to(device, dtype) for _ in "qkv")
    with torch.no_grad():
        reference = entmax_triton.entmax_attention(q, k, v, blocks=blocks, threshold_pass="topk").float()
        for slots, steps, warps in SETTINGS:
            entmax_triton.STREAM_SLOTS, entmax_triton.STREAM_STEPS, entmax_triton.STREAM_WARPS = slots, steps, warps
            fn = partial(entmax_triton.entmax_attention, q, k, v, blocks=blocks, threshold_pass="stream")
            out = fn()
            ms = float("nan") if args.smoke else median_ms(fn, 10, device)  # after `out = fn()` compiled it
            activity = ProfilerActivity.CPU if args.smoke else ProfilerActivity.CUDA
            with profile(activities=[activity]) as prof:
                fn()
                if not args.smoke:
                    torch.cuda.synchronize()
            per = {
                event.key.removesuffix("_kernel"): round((getattr(event, "device_time_total", 0) or 0) / 1000, 2)
                for event in prof.key_averages()
                if event.key.endswith("_kernel") and not event.key.startswith("aten")
            }
            diff = float((out.float() - reference).abs().max())
            print(f"slots {slots} x candidates, {steps} steps per raising, {warps} warps: forward {ms:.2f} ms, "
                  f"per kernel {per}, "
                  f"max |diff| to topk {diff:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
