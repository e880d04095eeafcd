"""Forward-pass timing of the attention kernels in :mod:`hf_sparse.attention` against dense SDPA, on CPU.

This is the measuring core shared by ``scripts/benchmark_attention.py`` (which writes the committed report
``benchmarks/attention_backends.md`` behind ``FLEX_MIN_LENGTH`` and ``FLEX_MAX_BLOCK_DENSITY``) and by the
``hf-sparse benchmark`` command. It lives in the package because scripts are not installed with it; report
writing stays in the script. Not imported by modeling code.

:func:`bench_one` checks the masked kernels against a float64 eager reference (:func:`reference`,
:func:`check`), then times dense SDPA, masked SDPA, compiled FlexAttention and the ``BlockMask`` build
interleaved round-robin (:func:`measure`). FlexAttention has no backward on CPU: only the forward is timed.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from . import attention, patterns

TOLERANCE = 1e-4  # max abs difference to the float64 eager reference
MIN_SAMPLE_S = 0.02  # short calls are repeated within one sample until it lasts about this long
CPU = torch.device("cpu")


@contextlib.contextmanager
def _flex_must_compile():
    """If dynamo ever gives up compiling (e.g. its recompile limit), flex_attention silently runs unfused and
    materialises the full score matrix; that would time the wrong kernel, so make it fail instead.

    Scoped here rather than set globally, so that importing the package changes no warning filters.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*flex_attention called without torch.compile.*")
        yield


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


class KernelMismatch(RuntimeError):
    """A kernel's output differs from the float64 reference: its timing would be meaningless."""


def check(name, out, ref, spec, n):
    """Max abs difference of ``out`` to the float64 reference; raises if it is not below TOLERANCE (a wrong kernel
    is never timed)."""
    diff = (out.double() - ref).abs().max().item()
    if not diff < TOLERANCE:  # also catches NaN
        raise KernelMismatch(
            f"{name} disagrees with the float64 eager reference for {spec!r} at L={n}: "
            f"max abs diff {diff:.3e} >= {TOLERANCE}"
        )
    return diff


def measure(variants: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Sample the variants round-robin (rotating the order every round); return the median seconds of
    ``dense`` and, for every other variant, the median over rounds of its time / dense's time in that round.
    """
    with _flex_must_compile():
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


def bench_one(
    spec: str, n: int, *, batch: int = 1, heads: int = 12, head_dim: int = 64, repeats: int = 15, warmup: int = 1
) -> dict:
    """Check, then time one (pattern, length) on CPU with float32 ``(batch, heads, n, head_dim)`` inputs.

    Returns the pattern, ``L``, element and block density, the flex first call (compile + run) in seconds, the
    larger max abs diff of the two masked kernels to the reference, ``dense`` (median seconds) and the ratios
    ``sdpa``, ``flex``, ``flex_mask`` to dense (see :func:`measure`).
    """
    pattern = patterns.parse(spec)
    shape = (batch, heads, n, head_dim)
    q, k, v = (torch.randn(shape) for _ in range(3))
    scaling = head_dim**-0.5

    with torch.no_grad(), _flex_must_compile():
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
            repeats,
            warmup,
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
