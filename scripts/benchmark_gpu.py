"""Exact entmax attention on a GPU (issue 12): one prepared run for a lent H100/H200 (GPU time is short and rare).

Checks first, then times (CUDA events, medians), B=1, 16 heads, head dim 64:

1. **Correctness** at L = 1024: the fused kernel (:mod:`hf_sparse.entmax_triton`) against matmul + ``entmax_topk``
   + matmul, causal and not: float32 inputs (outputs and gradients, and the probability rows themselves through
   identity values: same support, largest difference), and bfloat16 inputs (against the same reference on the
   rounded inputs).
2. **Row-wise entmax**, float32 scores (1, 16, L, L), forward and forward+backward: softmax,
   ``entmax_topk.entmax15`` (its torch path and its Triton row kernel, :mod:`hf_sparse.entmax_rows_triton`), the
   ``entmax`` package.
3. **Attention op**, bfloat16 q, k, v, L in {1024, 4096, 8192, 16384}, causal and not, forward and
   forward+backward: SDPA (softmax, the speed of light), FlexAttention (softmax, compiled), the fused entmax kernel
   (each threshold pass), matmul + ``entmax_topk`` + matmul, matmul + the ``entmax`` package + matmul. Ratios to
   SDPA from the same run. Dense paths are skipped where their L x L tensors would not fit, with the reason in the
   table.
   **float32** (:func:`float32_op`): float32 q, k, v at full precision and with TF32, the fused kernel against
   matmul + ``entmax_topk`` + matmul at L in {1024, ..., 16384} (what ``auto`` picks for float32 models);
   **float32_patterns** (:func:`float32_patterns`): the same with windows of growing tile density.
4. **Whole models** (:func:`whole_models`): an entmax SparseBERT training step at L = 4096 and an entmax Marian's
   ``generate``, each against the same model with softmax attention (targets: at most 1.5x).
5. **Long sequences** (:func:`long_sequence`): the fused kernel at L = 32768 and 65536 with its peak memory (the
   O(L·d) target: an L x L float32 score matrix at 65536 would be 256 GiB).

6. **Predicted blocks** (:func:`predicted_blocks`): Sparsefinder's predicted attention through the fused kernel on
   per-token codes (a distance and a k-means clustering predictor), also timed on the element mask of the same
   pairs, against the gathering execution and dense fused entmax.
7. **Profile** (:func:`kernel_profile`): per-kernel time of the fused kernel at L = 8192 for several tile choices
   and threshold passes (what ``GPU_BLOCKS`` should be, and what finding τ costs against the output pass).

``--sections`` reruns some parts only (e.g. ``--sections models,long`` after a run cut short). GPU time is rare, so
one section's failure never costs the others: it is reported (with the rows it had) and the run goes on; the
report is rewritten after every section, so a run killed at the device's time limit still leaves its results; no
section starts after ``--budget-s`` seconds (540: the device call's limit is 600).

Writes ``benchmarks/gpu.md`` (``--output``). Smoke-test it on CPU first (tiny sizes, Triton's interpreter, no
report unless ``--output`` is given):

    python scripts/benchmark_gpu.py --smoke
    python scripts/benchmark_gpu.py --output benchmarks/gpu.md      # on the GPU, about 5 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import time
import traceback
from functools import partial
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first used

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    import hf_sparse  # noqa: F401
except Exception as exc:  # another transformers on a GPU image: the two modules timed here need torch alone
    import types

    print(f"note: import hf_sparse failed ({exc!r}); loading its torch-only modules directly", flush=True)
    package = types.ModuleType("hf_sparse")
    package.__path__ = [str(REPO / "hf_sparse")]
    sys.modules["hf_sparse"] = package

from hf_sparse.benchmarking import median_ms  # noqa: E402
from hf_sparse.entmax_topk import entmax15  # noqa: E402
from hf_sparse.entmax_triton import entmax_attention  # noqa: E402

try:
    import entmax as entmax_package
except ImportError:  # a benchmark-only dependency (the dev extra has it)
    entmax_package = None

COMMAND = "python scripts/benchmark_gpu.py --output benchmarks/gpu.md"
SECTIONS = ("correctness", "rowwise", "op", "float32", "float32_patterns", "models", "long", "predicted", "profile")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, budget_s: float = 0.4, max_repeats: int = 10) -> float:
    """Median ms of ``fn`` after one warm-up call (compilation); as many repeats as fit ``budget_s``."""
    fn()
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t
    repeats = max(1, min(max_repeats, int(budget_s / max(first, 1e-6))))
    return median_ms(fn, repeats, device)


def forward_backward(fn, grad):
    fn().backward(grad)


def causal_keep(n, device):
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def dense_entmax_attention(q, k, v, causal, normaliser):
    """matmul + mask + normaliser + matmul, scores in float32 (the dense reference paths)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    keep = causal_keep(q.shape[2], q.device) if causal else None
    if normaliser in ("topk", "triton"):  # entmax_topk's torch path, or its Triton row kernel
        p = entmax15(scores, keep=keep, backend=normaliser)
    else:
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        p = entmax_package.entmax15(scores, dim=-1)
    return (p @ v.float()).to(q.dtype)


class EchoedLines(list):
    """A section's report lines, each also printed when it is added: a run cut at the device's time limit (or
    stuck in a compilation) still shows in its log every line it had."""

    def append(self, line):
        super().append(line)
        print(line, flush=True)


def correctness(n, heads, dim, device, lines):
    """Fused kernel vs matmul + entmax_topk + matmul: float32 (support too, each threshold pass) and bfloat16."""
    g = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(1, heads, n, dim, generator=g) for _ in range(3)]
    for causal in (False, True):
        mask = "causal" if causal else "non-causal"
        for threshold_pass in ("topk", "stream", "bound"):
            try:  # one pass failing (a kernel the GPU's compiler refuses) must not cost the other's lines
                lines.append(correctness_line(base, n, heads, dim, device, causal, threshold_pass))
            except Exception as exc:
                lines.append(f"- float32, {mask}, threshold pass `{threshold_pass}`: failed: {exc!r}"[:600])
        qb, kb, vb = (t.detach().bfloat16() for t in base)
        qb, kb, vb = (t.to(device) for t in (qb, kb, vb))
        with torch.no_grad():
            out_b = entmax_attention(qb, kb, vb, causal=causal).float()
            ref_b = dense_entmax_attention(qb.float(), kb.float(), vb.float(), causal, "topk")
        lines.append(
            f"- bfloat16 inputs, {mask}: output max |diff| "
            f"{float((out_b - ref_b).abs().max()):.1e} against float32 math on the same rounded inputs"
        )
    return lines


def correctness_line(base, n, heads, dim, device, causal, threshold_pass) -> str:
    """One float32 line of :func:`correctness`: output, gradients and support against matmul + entmax_topk."""
    q, k, v = (t.to(device).requires_grad_() for t in base)
    attend = partial(entmax_attention, causal=causal, threshold_pass=threshold_pass)
    out = attend(q, k, v)
    ref = dense_entmax_attention(q, k, v, causal, "topk")
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    eye = torch.eye(n, device=device)
    with torch.no_grad():  # the probabilities: identity values, 64 columns a call
        chunks = [eye[:, c : c + 64].expand(1, heads, n, -1) for c in range(0, n, 64)]
        p = torch.cat([attend(q, k, chunk) for chunk in chunks], -1)
        scores = (q @ k.transpose(-1, -2)) * dim**-0.5
        p_ref = entmax15(scores, keep=causal_keep(n, device) if causal else None, backend="topk")
    differ = int(((p > 0) != (p_ref > 0)).sum())
    grads = ", ".join(f"d{name} {float((a - b).abs().max()):.1e}" for name, a, b in zip("qkv", got, want))
    return (
        f"- float32, {'causal' if causal else 'non-causal'}, L={n}, threshold pass `{threshold_pass}`: output max "
        f"|diff| {float((out - ref).abs().max()):.1e}, {grads}; probabilities max |diff| "
        f"{float((p - p_ref).abs().max()):.1e}, support differs in {differ} of {p.numel()} pairs "
        f"(support size median {int((p_ref > 0).sum(-1).median())}, max {int((p_ref > 0).sum(-1).max())})"
    )


def fits(n, heads, device, factor: float) -> bool:
    """Whether ``factor`` float32 (1, heads, L, L) tensors fit in half the free GPU memory."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info()
    return factor * heads * n * n * 4 < free / 2


def rowwise(lengths, heads, device, rows):
    """Row-wise 1.5-entmax of float32 scores, forward and forward+backward: softmax, ``entmax_topk``'s torch path
    (``backend="topk"``), its Triton row kernel (``backend="triton"``, the CUDA default), the ``entmax`` package;
    and how far the row kernel's output lies from the torch path's (largest difference, pairs whose support
    membership differs)."""
    for n in lengths:
        if not fits(n, heads, device, 6):
            rows.append(f"| {n} | skipped: (1, {heads}, L, L) scores do not fit |" + " |" * 8)
            continue
        x = torch.randn(1, heads, n, n, device=device, requires_grad=True)
        grad = torch.randn_like(x)
        methods = {
            "softmax": partial(torch.softmax, x, -1),
            "topk": partial(entmax15, x, backend="topk"),
            "triton": partial(entmax15, x, backend="triton"),
            "package": partial(entmax_package.entmax15, x, dim=-1) if entmax_package is not None else None,
        }
        cells = []
        for backward in (False, True):
            for name, fn in methods.items():
                if fn is None:
                    cells.append("not installed")
                elif name == "package" and n > 8192:
                    cells.append("skipped: sorts every row (> 1 s)")
                else:
                    with torch.set_grad_enabled(backward):
                        cells.append(f"{time_ms(partial(forward_backward, fn, grad) if backward else fn, device):.2f}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        with torch.no_grad():
            p_rows, p_topk = entmax15(x, backend="triton"), entmax15(x, backend="topk")
            differ = int(((p_rows > 0) != (p_topk > 0)).sum())
            cells.append(f"{float((p_rows - p_topk).abs().max()):.1e}, {differ}")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
        del x, grad, p_rows, p_topk
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def attention_op(lengths, heads, dim, device, rows, flex):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for n in lengths:
        for causal in (False, True):
            q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype, requires_grad=True) for _ in "qkv")
            grad = torch.randn_like(q)
            methods = {
                "sdpa": partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal),
                "flex": partial(flex, q, k, v, causal) if flex is not None else None,
                "fused": partial(entmax_attention, q, k, v, causal=causal, threshold_pass="topk"),
                "stream": partial(entmax_attention, q, k, v, causal=causal, threshold_pass="stream"),
                "bound": partial(entmax_attention, q, k, v, causal=causal, threshold_pass="bound"),
                "topk": partial(dense_entmax_attention, q, k, v, causal, "topk"),
                "triton": partial(dense_entmax_attention, q, k, v, causal, "triton"),
                "package": partial(dense_entmax_attention, q, k, v, causal, "package"),
            }
            for backward in (False, True):
                cells, sdpa_ms = [], None
                for name, fn in methods.items():
                    why = None
                    if fn is None:
                        why = "not run here"
                    elif name in ("topk", "triton", "package") and not fits(n, heads, device, 8 if backward else 4):
                        why = "L x L tensors do not fit"
                    elif name == "package" and entmax_package is None:
                        why = "not installed"
                    elif name == "package" and (n > 8192 or (causal and n > 4096)):
                        why = "too slow (sorts every row)"
                    elif name == "flex" and backward and device.type == "cpu":
                        why = "no CPU backward"
                    if why:
                        cells.append(why)
                        continue
                    call = partial(forward_backward, fn, grad) if backward else fn
                    try:  # one method failing (a kernel the GPU's compiler refuses) must not cost the table
                        with torch.set_grad_enabled(backward):
                            ms = time_ms(call, device)
                    except Exception as exc:
                        cells.append(f"failed: {type(exc).__name__}")
                        print(f"{name}, L={n}, causal={causal}, backward={backward}: {exc!r}"[:600], flush=True)
                        continue
                    sdpa_ms = ms if name == "sdpa" else sdpa_ms
                    cells.append(f"{ms:.2f} ({ms / sdpa_ms:.1f}x)" if sdpa_ms else f"{ms:.2f}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                kind = "fwd+bwd" if backward else "fwd"
                rows.append(f"| {n} | {'causal' if causal else 'non-causal'} | {kind} | " + " | ".join(cells) + " |")
                print(rows[-1], flush=True)
    return rows


def float32_op(lengths, heads, dim, device, rows):
    """float32 inputs, where the fused kernel's products follow ``torch.set_float32_matmul_precision`` as torch's
    matmuls do: at ``"highest"`` (torch's default) ``tl.dot`` multiplies in full float32 on the CUDA cores, with
    smaller tiles (``GPU_BLOCKS_FULL_PRECISION``), while cuBLAS keeps its own float32 kernels; at ``"high"`` both
    use TF32 tensor cores. Fused kernel against matmul + ``entmax_topk`` + matmul (the ``eager`` path, whose
    entmax runs the Triton row kernel on CUDA), which decides what ``auto`` should pick for float32 models."""
    before = torch.get_float32_matmul_precision()
    try:
        for n in lengths:
            for causal in (False, True):
                q, k, v = (torch.randn(1, heads, n, dim, device=device, requires_grad=True) for _ in "qkv")
                grad = torch.randn_like(q)
                fused = partial(entmax_attention, q, k, v, causal=causal)
                eager = partial(dense_entmax_attention, q, k, v, causal, "triton")  # what `eager` runs on CUDA
                for backward in (False, True):
                    cells = []
                    for precision in ("highest", "high"):
                        torch.set_float32_matmul_precision(precision)
                        times = []
                        for fn in (eager, fused):
                            if fn is eager and not fits(n, heads, device, 8 if backward else 4):
                                times.append(None)
                                continue
                            call = partial(forward_backward, fn, grad) if backward else fn
                            with torch.set_grad_enabled(backward):
                                times.append(time_ms(call, device))
                            if device.type == "cuda":  # the next `fits` reads free memory
                                torch.cuda.empty_cache()
                        eager_ms, fused_ms = times
                        cells += ["L x L tensors do not fit" if eager_ms is None else f"{eager_ms:.2f}",
                                  f"{fused_ms:.2f}", "" if eager_ms is None else f"{fused_ms / eager_ms:.2f}x"]
                    mask, kind = "causal" if causal else "non-causal", "fwd+bwd" if backward else "fwd"
                    rows.append(f"| {n} | {mask} | {kind} | " + " | ".join(cells) + " |")
                del q, k, v, grad
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        torch.set_float32_matmul_precision(before)
    return rows


def attend_backward(attend, q, k, v, mask, grad):
    """One forward+backward of ``hf_sparse.attention.attend`` (1.5-entmax) with ``mask``."""
    out, _ = attend(q, k, v, mask, scaling=q.shape[-1] ** -0.5, attention_fn="entmax15")
    out.backward(grad)


def float32_patterns(lengths, windows, heads, dim, device, rows):
    """Full-precision float32 with a pattern: ``auto`` keeps the fused kernel when the pattern leaves at most
    ``attention.FULL_PRECISION_EAGER_MIN_DENSITY`` of the 128 x 128 tiles (inferred from the dense timings: the
    fused kernel's work shrinks with the tiles, eager's does not). This times both kernels as the models run
    them (``attention.build_mask`` + ``attention.attend``, forward+backward) for windows of growing density."""
    from hf_sparse.attention import FLEX_BLOCK_SIZE, attend, build_mask, choose_backend
    from hf_sparse.block_maps import cached_block_density
    from hf_sparse.patterns import parse

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for n in lengths:
            q, k, v = (torch.randn(1, heads, n, dim, device=device, requires_grad=True) for _ in "qkv")
            grad = torch.randn(1, n, heads, dim, device=device)
            for width in windows:
                pattern = parse(f"window:{width}")
                density = cached_block_density(pattern, n, "cpu", FLEX_BLOCK_SIZE)
                times = {}
                for backend in ("eager", "fused"):
                    mask = build_mask(pattern, None, n, device, backend)
                    times[backend] = time_ms(partial(attend_backward, attend, q, k, v, mask, grad), device)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                picked = choose_backend(
                    "auto", pattern=pattern, n=n, device=device, attention_fn="entmax15", needs_grad=True,
                    dtype=torch.float32, pairs=heads * n * n,
                )
                rows.append(
                    f"| {n} | window:{width} | {density:.2f} | {times['eager']:.2f} | {times['fused']:.2f} | "
                    f"{times['fused'] / times['eager']:.2f}x | {picked} |"
                )
            del q, k, v, grad
    finally:
        torch.set_float32_matmul_precision(before)
    return rows


def whole_models(device, smoke, lines):
    """Issue 12's model targets, each model against the same model with softmax attention (its default kernel):

    - SparseBERT, 2 layers, hidden 768, 12 heads, L = 4096, batch 1: one training step (forward, MLM loss,
      backward; BERT's default dropout, attention dropout 0.1 included), float32 and bfloat16 autocast; entmax15
      on the fused kernel (``auto`` on CUDA) with its ``bound`` and ``topk`` threshold passes, and on ``eager``
      (matmul + ``entmax_topk`` + matmul).
    - entmax Marian, 6 + 6 layers, d_model 512, 8 heads: ``generate`` of 16 sequences x 64 new tokens from 64-token
      sources (greedy, ``min_new_tokens`` = 64 so every run decodes the same count), entmax15 in every attention.
    """
    try:
        from hf_sparse import SparseBertConfig, SparseBertForMaskedLM
        from hf_sparse.benchmarking import marian_generate
    except ImportError as exc:
        return lines + [f"- skipped: hf_sparse does not import here ({exc!r})"]
    length, layers, hidden, heads = (64, 2, 32, 2) if smoke else (4096, 2, 768, 12)
    ids = torch.randint(5, 1000, (1, length), device=device)
    labels = ids.clone()

    # precision modes: float32 (torch's default, full float32 products), float32 with TF32 allowed
    # (torch.set_float32_matmul_precision("high"), which the fused kernel follows too), bfloat16 autocast
    modes = ("float32", "float32, TF32 allowed", "bfloat16 autocast")

    def step(model, mode):
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if mode == modes[1] else before)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == modes[2]):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
        finally:
            torch.set_float32_matmul_precision(before)
        model.zero_grad(set_to_none=True)

    from hf_sparse import entmax_triton

    results = {}
    # (attention_fn, backend, the fused kernel's threshold pass, set through the models' default)
    variants = (
        ("softmax", "auto", None), ("entmax15", "auto", "bound"), ("entmax15", "auto", "topk"),
        ("entmax15", "eager", None),
    )
    default_pass = entmax_triton.DEFAULT_THRESHOLD_PASS
    for fn, backend, threshold_pass in variants:
        entmax_triton.DEFAULT_THRESHOLD_PASS = threshold_pass or default_pass
        config = SparseBertConfig(
            vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * hidden, max_position_embeddings=length, attention_fn=fn, attention_backend=backend,
        )
        torch.manual_seed(0)
        model = SparseBertForMaskedLM(config).to(device).train()
        try:
            for mode in modes:
                if mode != modes[0] and device.type == "cpu":
                    continue
                ms = time_ms(partial(step, model, mode), device, budget_s=1.0)
                kernel = sorted(set(model.attention_backends_used().values()))
                results[fn, backend, threshold_pass, mode] = (ms, "/".join(kernel))
        finally:
            entmax_triton.DEFAULT_THRESHOLD_PASS = default_pass
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines += [
        f"SparseBERT training step ({layers} layers, hidden {hidden}, {heads} heads, L={length}, batch 1), ms:",
        "",
        "| precision | softmax | entmax15 (auto, `bound` pass) | entmax15 (auto, `topk` pass) | entmax15 (eager) "
        "| bound / softmax | topk / softmax |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in modes:
        if ("softmax", "auto", None, mode) not in results:
            continue
        row = [results[(*variant, mode)] for variant in variants]
        lines.append(
            f"| {mode} | "
            + " | ".join(f"{ms:.1f} ({name})" for ms, name in row)
            + f" | {row[1][0] / row[0][0]:.2f}x | {row[2][0] / row[0][0]:.2f}x |"
        )
    lines.append("")

    timings = {}
    for label, fn in (("softmax", "softmax"), ("entmax15", "entmax15")):
        for backend in ("auto", "eager") if fn != "softmax" else ("auto",):
            model, generate = marian_generate(fn, backend, device, smoke=smoke)
            with torch.no_grad():
                ms = time_ms(generate, device, budget_s=3.0, max_repeats=3)
            kernel = "/".join(sorted(set(model.attention_backends_used().values())))
            timings[label, backend] = (ms, kernel)
            c, call = model.config, generate.keywords  # for the table's title
            batch, new_tokens = len(call["input_ids"]), call["max_new_tokens"]
            del model
    soft = timings["softmax", "auto"][0]
    lines += [
        f"Entmax Marian generate ({c.encoder_layers}+{c.decoder_layers} layers, d_model {c.d_model}, {batch} sequences "
        f"x {new_tokens} new tokens, greedy, float32), ms (ratio to softmax):",
        "",
        "| softmax | entmax15 (auto) | entmax15 (eager) |",
        "|---:|---:|---:|",
        "| " + " | ".join(
            f"{timings[key][0]:.0f} ({timings[key][1]}, {timings[key][0] / soft:.2f}x)"
            for key in (("softmax", "auto"), ("entmax15", "auto"), ("entmax15", "eager"))
        ) + " |",
        "",
    ]
    return lines


def long_sequence(device, smoke, lines):
    """Memory O(L·d): the fused kernel at L = 65536 (16 heads, d 64, bfloat16), forward and forward+backward,
    with the peak memory allocated (an L x L float32 score matrix alone would be 256 GiB)."""
    heads, dim = (2, 16) if smoke else (16, 64)
    dtype = torch.float32 if smoke else torch.bfloat16
    for n in ((64,) if smoke else (32768, 65536)):
        for causal in (False, True):
            q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype, requires_grad=True) for _ in "qkv")
            grad = torch.randn_like(q)
            cells = []
            for backward in (False, True):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                fn = partial(entmax_attention, q, k, v, causal=causal)
                if backward:
                    ms = time_ms(partial(forward_backward, fn, grad), device, budget_s=2.0, max_repeats=3)
                else:
                    with torch.no_grad():
                        ms = time_ms(fn, device, budget_s=2.0, max_repeats=3)
                sdpa = partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal)
                with torch.no_grad() if not backward else contextlib.nullcontext():
                    ref = time_ms(partial(forward_backward, sdpa, grad) if backward else sdpa, device,
                                  budget_s=1.0, max_repeats=3)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else float("nan")
                cells.append(f"{ms:.0f} ms ({ms / ref:.1f}x SDPA), peak +{peak:.0f} MiB")
            lines.append(f"| {n} | {'causal' if causal else 'non-causal'} | " + " | ".join(cells) + " |")
            del q, k, v, grad
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return lines


def kernel_profile(device, smoke, lines):
    """Where the fused kernel's time goes, and which tiles pay: per-kernel GPU time (torch.profiler) of one forward
    and one forward+backward at L = 8192 for each ``blocks`` choice (rows, keys, candidates per row); the default
    is ``entmax_triton.GPU_BLOCKS``. A choice that does not compile or run says why in its row."""
    from torch.profiler import ProfilerActivity, profile

    from hf_sparse.entmax_triton import GPU_BLOCKS

    n, heads, dim = (48, 2, 16) if smoke else (8192, 16, 64)
    dtype = torch.float32 if smoke else torch.bfloat16
    # Tiles x threshold pass. (64, 64, 16): fewer candidates, a cheaper "topk" pass against more fallback passes (a
    # CPU simulation of these inputs: 85 % of rows fail 16 candidates, 3 fallback passes per 64-row block; 32
    # candidates: 20 %, 1.9). "stream": one sweep without sorting or certificate (scripts/simulate_threshold_passes.py:
    # 3.6 raisings of the bounds per 64-row block at L = 8192 with 128 slots per row, no row outgrowing them).
    # "bound": a sweep keeping each row's two largest scores per key column and the largest it let go of (the
    # certificate), then the fallback's Newton sweeps for the rows that fail it (simulated: 58 % certified and
    # 0.56 sweeps per 64-row block at L = 8192, scripts/simulate_threshold_passes.py); (64, 128, 32): twice the
    # columns, a tighter bound.
    choices = [((16, 16, 16), "topk"), ((16, 16, 16), "stream"), ((16, 16, 16), "bound")] if smoke else [
        (GPU_BLOCKS, "bound"), (GPU_BLOCKS, "topk"), ((64, 128, 32), "bound"), (GPU_BLOCKS, "stream"),
        ((64, 64, 16), "stream"), ((64, 64, 16), "topk"), ((128, 64, 32), "topk"),
    ]
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g).to(device, dtype).requires_grad_() for _ in "qkv")
    grad = torch.randn_like(q)
    for blocks, threshold_pass in choices:  # the default tiles' two passes first, both masks each: a run cut short
        for causal in (False, True):  # keeps what decides the default
            mask = "causal" if causal else "non-causal"
            fn = partial(entmax_attention, q, k, v, causal=causal, blocks=blocks, threshold_pass=threshold_pass)
            try:
                with torch.no_grad():
                    fwd = time_ms(fn, device)
                both = time_ms(partial(forward_backward, fn, grad), device)
                with profile(activities=[activity]) as prof:
                    forward_backward(fn, grad)
                    sync(device)
            except Exception as exc:  # a tile choice the compiler or the GPU refuses: say so, go on
                lines.append(f"| {mask} | {blocks} {threshold_pass} | failed: {exc!r:.120} | | |")
                continue
            per = {}
            for event in prof.key_averages():
                name = event.key
                if name.endswith("_kernel") and not name.startswith("aten"):
                    total = getattr(event, "device_time_total", 0) or getattr(event, "cpu_time_total", 0)
                    per[name] = total / 1000
            split = ", ".join(f"{name.removesuffix('_kernel')} {ms:.2f}" for name, ms in sorted(per.items()))
            lines.append(f"| {mask} | {blocks} {threshold_pass} | {fwd:.2f} | {both:.2f} | {split} |")
    return lines


def predicted_blocks(device, smoke, lines):
    """Sparsefinder's predicted attention on the fused kernel (predicted pairs as per-token codes, and as its tile
    and element masks) against the gathering execution and dense fused entmax: ``scripts/
    benchmark_fused_sparsefinder.py``'s synthetic clustered inputs and a distance or clustering predictor at
    about 5 % of the pairs, BERT-base heads (12 x 64)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from benchmark_fused_sparsefinder import time_predicted_attention
    except ImportError as exc:
        return lines + [f"| skipped: {exc!r} | | | | | | | |"]
    dtype = torch.float32 if smoke else torch.bfloat16
    for method in ("distance", "clustering"):
        for n in ((64,) if smoke else (4096, 8192)):
            for causal in (False, True):
                row = time_predicted_attention(
                    n, heads=2 if smoke else 12, head_dim=16 if smoke else 64, density=0.05, causal=causal,
                    dtype=dtype, device=device.type, repeats=2 if smoke else 10, method=method,
                )
                fused, gathered, dense = (row[f"{name} ms"] for name in ("fused predicted", "gathered predicted",
                                                                          "fused dense"))
                element_mask = row.get("fused predicted, element mask ms")
                lines.append(
                    f"| {method} | {n} | {'causal' if causal else 'non-causal'} | {row['pair density']:.3f} | "
                    f"{row['tile density']:.3f} | {fused:.2f} | "
                    f"{'-' if element_mask is None else f'{element_mask:.2f}'} | {gathered:.2f} | {dense:.2f} | "
                    f"{dense / fused:.1f}x | {row['max abs diff to float32 gathered']:.1e} |"
                )
    return lines


def make_flex(device):
    """Compiled FlexAttention, softmax (the block-sparse softmax baseline); causal through a BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention) if device.type == "cuda" else flex_attention
    masks = {}

    def run(q, k, v, causal):
        mask = None
        if causal:
            key = q.shape[2]
            if key not in masks:
                masks[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, key, key, device=str(device))
            mask = masks[key]
        return compiled(q, k, v, block_mask=mask)

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton's interpreter")
    parser.add_argument("--output", help="write the report here (markdown), again after every section")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated parts to run (default: {','.join(SECTIONS)})"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="start no section after this many seconds (the device call's limit is 600 s); the report says which "
        "were left out",
    )
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on a CPU")
    heads, dim = (2, 16) if args.smoke else (16, 64)
    lengths = [32, 48] if args.smoke else [1024, 4096, 8192, 16384]
    started = time.perf_counter()
    run = set(args.sections.split(","))
    unknown = run - set(SECTIONS)
    if unknown:
        parser.error(f"unknown --sections {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    parts = {
        "correctness": lambda out: correctness(40 if args.smoke else 1024, heads, dim, device, out),
        "rowwise": lambda out: rowwise(lengths, heads, device, out),
        "op": lambda out: attention_op(
            lengths, heads, dim, device, out, make_flex(device) if device.type == "cuda" else None
        ),
        "float32": lambda out: float32_op(
            [32, 48] if args.smoke else [1024, 2048, 4096, 8192, 16384], heads, dim, device, out
        ),
        "float32_patterns": lambda out: float32_patterns(
            [48] if args.smoke else [4096, 8192], [4, 16] if args.smoke else [64, 300, 600, 900, 1200], heads, dim,
            device, out,
        ),
        "models": lambda out: whole_models(device, args.smoke, out),
        "long": lambda out: long_sequence(device, args.smoke, out),
        "predicted": lambda out: predicted_blocks(device, args.smoke, out),
        "profile": lambda out: kernel_profile(device, args.smoke, out),
    }
    results = {name: EchoedLines() for name in SECTIONS}
    notes = []  # sections that failed or were left out: GPU time is rare, one failure must not cost the others
    for name in SECTIONS:
        if name not in run:
            continue
        if time.perf_counter() - started > args.budget_s:
            notes.append(f"- `{name}`: not run, the time budget ({args.budget_s:.0f} s) was spent")
        else:
            began = time.perf_counter()
            try:
                parts[name](results[name])  # each section appends its rows as it goes: kept if it fails
            except Exception as exc:
                traceback.print_exc()
                notes.append(f"- `{name}` failed after {len(results[name])} rows: {type(exc).__name__}: {exc}"[:600])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(f"[section {name}: {time.perf_counter() - began:.0f} s]", flush=True)  # to plan the next run
        if args.output:
            Path(args.output).write_text(render(results, notes, device, heads, dim, started))
    if args.output:
        print(f"wrote {args.output}")
    else:
        print(render(results, notes, device, heads, dim, started))
    return 0


def render(results: dict, notes: list, device, heads: int, dim: int, started: float) -> str:
    """The report (markdown) from the sections' rows so far."""
    import triton

    checks, row_rows, op_rows = results["correctness"], results["rowwise"], results["op"]
    model_lines, long_rows, float32_rows = results["models"], results["long"], results["float32"]
    pattern_rows = results["float32_patterns"]
    predicted_rows, profile_rows = results["predicted"], results["profile"]
    machine = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "CPU"
    report = [
        "# Exact entmax attention on a GPU",
        "",
        f"`{COMMAND}` on {machine}, {datetime.date.today()}: torch {torch.__version__}, triton {triton.__version__},"
        f" entmax {getattr(entmax_package, '__version__', 'absent')}, Python {platform.python_version()}; "
        f"B=1, {heads} heads, head dim {dim}; one run, medians of up to 10 timed calls (CUDA events) after a warm-up."
        f" Whole run {time.perf_counter() - started:.0f} s.",
        "",
        "## Correctness (fused kernel against matmul + `entmax_topk` + matmul)",
        "",
        *checks,
        "",
        "## Row-wise entmax15, float32 scores (1, H, L, L), ms",
        "",
        "`entmax_topk.entmax15` with `backend=\"topk\"` (its torch path) and `backend=\"triton\"` (its Triton row"
        " kernel, the CUDA default); the last column: the row kernel's largest difference to the torch path, and"
        " the pairs whose support membership differs.",
        "",
        "| L | softmax fwd | topk fwd | triton fwd | package fwd | softmax fwd+bwd | topk fwd+bwd | triton fwd+bwd "
        "| package fwd+bwd | triton vs topk |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *row_rows,
        "",
        "## Attention q, k, v -> output, bfloat16, ms (ratio to SDPA in the same row)",
        "",
        "SDPA and FlexAttention compute softmax attention (the target to be compared with); the others compute"
        " exact 1.5-entmax attention: the fused kernel with each threshold pass (`topk`, `stream` and `bound`,"
        " the default), matmul + `entmax_topk` + matmul (its torch path, and its Triton row kernel, the CUDA default),"
        " and matmul + the `entmax` package + matmul (scores in"
        " float32).",
        "",
        "| L | mask | pass | SDPA | FlexAttention | fused, topk | fused, stream | fused, bound "
        "| matmul + entmax_topk (topk) | matmul + entmax_topk (triton rows) | matmul + entmax package |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *op_rows,
        "",
        "## float32 inputs: the fused kernel against matmul + `entmax_topk` + matmul (the `eager` path), ms",
        "",
        "Full float32 products (`torch.set_float32_matmul_precision('highest')`, torch's default) and TF32"
        " (`'high'`); 1.5-entmax, the default threshold pass.",
        "",
        "| L | mask | pass | eager, highest | fused, highest | fused / eager | eager, TF32 | fused, TF32 "
        "| fused / eager |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
        *float32_rows,
        "",
        "## Full-precision float32 with a pattern: eager or fused (forward+backward, ms)",
        "",
        "`attention.build_mask` + `attention.attend` for each kernel, as the models run them; `auto` is what"
        " `choose_backend` picks on this GPU (eager above a third of the tiles, an inference these rows test).",
        "",
        "| L | pattern | tile density | eager | fused | fused / eager | auto |",
        "|---|---|---:|---:|---:|---:|---|",
        *pattern_rows,
        "",
        "## Whole models, entmax against the same model with softmax",
        "",
        *model_lines,
        "## Long sequences: the fused kernel where L x L tensors cannot exist (bfloat16, 16 heads, head dim 64)",
        "",
        "Peak: memory allocated during the calls beyond q, k, v (and their gradients) already held.",
        "",
        "| L | mask | fwd | fwd+bwd |",
        "|---|---|---|---|",
        *long_rows,
        "",
        "## Sparsefinder's predicted pairs on the fused kernel (bfloat16, 12 heads, head dim 64, ms)",
        "",
        "Synthetic clustered q, k, v and a predictor set to about 5 % of the pairs "
        "(`scripts/benchmark_fused_sparsefinder.py`): `distance` (a threshold on projected distances) and "
        "`clustering` (k-means) run on per-token codes (the `element mask` column: the same pairs as an element "
        "mask, the execution before codes); the difference is to the gathering execution in float32.",
        "",
        "| predictor | L | mask | pair density | tile density | fused predicted | element mask | "
        "gathered predicted | fused dense | dense / predicted | max diff |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *predicted_rows,
        "",
        "## Where the fused kernel's time goes, by tile choice and threshold pass (L=8192, bfloat16, ms)",
        "",
        "`blocks` = (query rows, keys, candidates per row) of a kernel tile, then the `threshold_pass`; per-kernel"
        " times are one forward+backward under torch.profiler.",
        "",
        "| mask | blocks, pass | fwd | fwd+bwd | per kernel (fwd+bwd) |",
        "|---|---|---:|---:|---|",
        *profile_rows,
        "",
    ]
    if notes:
        report += ["## Sections that failed or were left out", "", *notes, ""]
    return "\n".join(report)


if __name__ == "__main__":
    sys.exit(main())
