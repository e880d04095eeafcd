"""Forward-pass timing of the attention kernels in :mod:`hf_sparse.attention` against dense SDPA, on CPU, for
the kernel alone and for a whole SparseBERT layer with the model's own mask building.

This is the measuring core shared by ``scripts/benchmark_attention.py`` (which writes the committed report
``benchmarks/attention_backends.md`` behind ``BLOCK_SPARSE_MIN_LENGTH`` and ``BLOCK_SPARSE_MAX_DENSITY``),
``scripts/benchmark_model_masks.py`` (``benchmarks/model_masks_cpu.md``) and the ``hf-sparse benchmark`` command.
It lives in the package because scripts are not installed with it; report writing stays in the scripts. Not
imported by modeling code.

:func:`bench_one` checks the masked kernels against a float64 eager reference (:func:`reference`,
:func:`check`), then times dense SDPA, masked SDPA, compiled FlexAttention, the tiles kernel and the mask builds
interleaved round-robin (:func:`measure`). :func:`bench_layer` does the same for one BERT layer, mask building
included, so that per-forward work outside the kernel shows. FlexAttention has no backward on CPU: forward only.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from . import attention, block_maps, patterns

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


def median_ms(fn, repeats: int, device: torch.device) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn``: CUDA events on a GPU (the device's own time for the
    call, synchronised after each), ``perf_counter`` on CPU."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def marian_generate(attention_fn: str, backend: str, device: torch.device, *, smoke: bool = False):
    """Issue 12's decoding benchmark: an untrained entmax-capable Marian (6 + 6 layers, d_model 512, 8 heads;
    tiny with ``smoke``) and a ``generate`` call of 16 sequences x 64 new tokens from 64-token sources (greedy,
    ``min_new_tokens`` = 64 so every run decodes the same count), ``attention_fn`` in every attention. Returns
    ``(model, generate)``; ``generate()`` returns the token ids."""
    from functools import partial

    from .configuration_entmax_marian import EntmaxSparsefinderMarianConfig
    from .modeling_entmax_marian import EntmaxSparsefinderMarianMTModel

    d_model, layers, heads, batch, new_tokens = (32, 1, 2, 2, 8) if smoke else (512, 6, 8, 16, 64)
    config = EntmaxSparsefinderMarianConfig(
        vocab_size=1000, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model, max_position_embeddings=256, pad_token_id=0, decoder_start_token_id=0,
        eos_token_id=1, forced_eos_token_id=None, encoder_attention_fn=attention_fn,
        decoder_attention_fn=attention_fn, cross_attention_fn=attention_fn, attention_backend=backend,
    )
    torch.manual_seed(0)
    source = torch.randint(5, 1000, (batch, 12 if smoke else 64), device=device)
    model = EntmaxSparsefinderMarianMTModel(config).to(device).eval()
    generate = partial(
        model.generate, input_ids=source, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        num_beams=1,
    )
    return model, generate


def bench_one(
    spec: str,
    n: int,
    *,
    batch: int = 1,
    heads: int = 12,
    head_dim: int = 64,
    repeats: int = 15,
    warmup: int = 1,
    entmax: bool = False,
) -> dict:
    """Check, then time one (pattern, length) on CPU with float32 ``(batch, heads, n, head_dim)`` inputs.

    Returns the pattern, ``L``, element and block density, the flex first call (compile + run) and the block map
    build (once per pattern and length) in seconds, the largest max abs diff of the masked kernels to the
    reference, ``dense`` (median seconds) and the ratios ``sdpa``, ``flex``, ``tiles`` and ``flex_mask`` (the
    per-forward ``BlockMask`` lookup, from the cache) to dense (see :func:`measure`). With ``entmax`` also
    ``eager_entmax`` and ``tiles_entmax`` (entmax15 on the eager and the tiles kernel) to dense SDPA.
    """
    pattern = patterns.parse(spec)
    shape = (batch, heads, n, head_dim)
    q, k, v = (torch.randn(shape) for _ in range(3))
    scaling = head_dim**-0.5

    with torch.no_grad(), _flex_must_compile():
        torch._dynamo.reset()  # fresh compile per (pattern, L): realistic first-call cost, no recompile limit
        start = time.perf_counter()
        block_maps.build_block_map(pattern, n, CPU)
        map_build = time.perf_counter() - start  # once per (pattern, length), then cached
        sdpa_mask = attention.build_mask(pattern, None, n, CPU, "sdpa")
        flex_mask = attention.build_mask(pattern, None, n, CPU, "flex")
        tiles_mask = attention.build_mask(pattern, None, n, CPU, "tiles")
        start = time.perf_counter()
        flex_out = attention.attend(q, k, v, flex_mask, scaling=scaling)[0]
        first_call = time.perf_counter() - start

        ref = reference(q, k, v, pattern, n, scaling)
        sdpa_diff = check("sdpa-masked", attention.attend(q, k, v, sdpa_mask, scaling=scaling)[0], ref, spec, n)
        flex_diff = check("flex", flex_out, ref, spec, n)
        tiles_diff = check("tiles", attention.attend(q, k, v, tiles_mask, scaling=scaling)[0], ref, spec, n)
        del ref

        variants = {
            "dense": lambda: F.scaled_dot_product_attention(q, k, v),
            "sdpa": lambda: attention.attend(q, k, v, sdpa_mask, scaling=scaling),
            "flex": lambda: attention.attend(q, k, v, flex_mask, scaling=scaling),
            "tiles": lambda: attention.attend(q, k, v, tiles_mask, scaling=scaling),
            "flex_mask": lambda: attention.build_mask(pattern, None, n, CPU, "flex"),
        }
        if entmax:
            eager_mask = attention.build_mask(pattern, None, n, CPU, "eager")
            variants["eager_entmax"] = lambda: attention.attend(
                q, k, v, eager_mask, scaling=scaling, attention_fn="entmax15"
            )
            variants["tiles_entmax"] = lambda: attention.attend(
                q, k, v, tiles_mask, scaling=scaling, attention_fn="entmax15"
            )
        times = measure(variants, repeats, warmup)
    return {
        "pattern": spec,
        "L": n,
        "density": 1.0 - patterns.sparsity(pattern, n),
        "block_density": patterns.block_density(pattern, n, attention.FLEX_BLOCK_SIZE),
        "first_call": first_call,
        "map_build": map_build,
        "max_diff": max(sdpa_diff, flex_diff, tiles_diff),
        **times,
    }


def machine() -> str:
    """CPU model, core count and torch's thread count, for benchmark reports."""
    import os
    from pathlib import Path

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch.get_num_threads() = {torch.get_num_threads()}"


def bert_layer(spec: str, n: int, backend: str, *, hidden: int = 768, heads: int = 12, attention_fn: str = "softmax"):
    """A one-layer BERT-base-sized SparseBERT (eval mode, no dropout) and its layer forward *with* the model's mask
    building (``attention_masks_for``: cache lookups, padding), as a model forward runs it."""
    from .configuration_sparse_bert import SparseBertConfig
    from .modeling_sparse_bert import SparseBertModel

    config = SparseBertConfig(
        vocab_size=8,
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=n,
        attention_pattern=spec,
        attention_backend=backend,
        attention_fn=attention_fn,
        attention_probs_dropout_prob=0.0,
        hidden_dropout_prob=0.0,
    )
    model = SparseBertModel(config, add_pooling_layer=False).eval()
    layer = model.encoder.layer[0]

    def forward(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, length = hidden_states.shape[:2]
        needs_grad = torch.is_grad_enabled() and hidden_states.requires_grad
        masks, _, _ = model.attention_masks_for(attention_mask, b, length, hidden_states.device, False, needs_grad)
        return layer(hidden_states, masks[0])[0]

    return model, forward


def bench_layer(
    spec: str,
    n: int,
    backends: tuple[str, ...] = ("flex", "tiles"),
    *,
    batch: int = 1,
    heads: int = 12,
    head_dim: int = 64,
    repeats: int = 7,
) -> dict:
    """One BERT layer (BERT-base: 12 heads of 64) at length ``n``: the pattern on each of ``backends`` against the
    dense SDPA layer, forward only, mask building included; checked first against the eager layer (float32, max
    abs diff).

    Also times the bare kernels (dense SDPA; each backend with its mask prebuilt) so that the model's own overhead
    shows: ``overhead_<backend>`` = layer time / (dense layer - dense kernel + bare kernel).
    """
    torch.manual_seed(0)
    hidden = heads * head_dim
    x = torch.randn(batch, n, hidden)
    dense_model, dense_forward = bert_layer("dense", n, "sdpa", hidden=hidden, heads=heads)
    layers = {"dense_layer": lambda: dense_forward(x)}
    diffs = {}
    with torch.no_grad(), _flex_must_compile():
        eager_model, eager_forward = bert_layer(spec, n, "eager", hidden=hidden, heads=heads)
        eager_model.load_state_dict(dense_model.state_dict())
        want = eager_forward(x)
        for backend in backends:
            model, forward = bert_layer(spec, n, backend, hidden=hidden, heads=heads)
            model.load_state_dict(dense_model.state_dict())
            diffs[backend] = (forward(x) - want).abs().max().item()
            layers[f"layer_{backend}"] = lambda forward=forward: forward(x)
        del want
        attention_module = dense_model.encoder.layer[0].attention.self
        q, k, v = (
            proj(x).view(batch, n, heads, head_dim).transpose(1, 2)
            for proj in (attention_module.query, attention_module.key, attention_module.value)
        )
        pattern = patterns.parse(spec)
        kernels = {"kernel_dense": lambda: F.scaled_dot_product_attention(q, k, v)}
        for backend in backends:
            mask = attention.build_mask(pattern, None, n, CPU, backend)
            kernels[f"kernel_{backend}"] = lambda mask=mask: attention.attend(q, k, v, mask, scaling=head_dim**-0.5)
        variants = {**layers, **kernels}
        variants["dense"] = variants.pop("dense_layer")  # measure() takes ratios to the entry named "dense"
        times = measure(variants, repeats, warmup=1)
    dense_layer = times["dense"]
    absolute = {name: ratio * dense_layer for name, ratio in times.items() if name != "dense"}
    row = {"pattern": spec, "L": n, "batch": batch, "dense_layer": dense_layer, "max_diff": max(diffs.values())}
    for backend in backends:
        row[f"layer_{backend}"] = times[f"layer_{backend}"]  # ratio to the dense layer
        row[f"kernel_{backend}"] = times[f"kernel_{backend}"] / times["kernel_dense"]
        row[f"overhead_{backend}"] = absolute[f"layer_{backend}"] / (
            dense_layer - absolute["kernel_dense"] + absolute[f"kernel_{backend}"]
        )
    return row
