"""One attention function for every model: which pairs may attend is decided once per forward
(:func:`build_mask`, from the pattern's cached block map: no pattern is evaluated again for a length it has seen),
then :func:`attend` runs the kernel that was chosen for it.

Kernels
    ``eager``  matmul + mask + normaliser; the reference, and the only one that returns probabilities.
    ``sdpa``   ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask (dense work).
    ``flex``   FlexAttention with a ``BlockMask``: skips fully masked tiles (block-sparse work), compiled; softmax.
    ``tiles``  block-sparse by gathering each tile row's touched key tiles (:func:`attend_tiles`): every
               normaliser, autograd, no compiler.
    ``fused``  the entmax family in fused Triton kernels (:mod:`hf_sparse.entmax_triton`): exact, never builds
               the score matrix, skips the pattern's empty tiles and the tiles entmax gives zero, draws attention
               dropout inside the kernel; CUDA (on CPU only under Triton's interpreter, for tests).
    ``auto``   picks by what is possible, then by the crossover measured in ``benchmarks/attention_backends.md``;
               on CUDA the entmax family runs ``fused``.

Every kernel returns exact zeros for a query row with no allowed key (never NaN).
This module is imported by remote code: torch and the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .block_maps import (
    TileLayout,
    cached_block_density,
    cached_block_map,
    cached_dense_mask,
    cached_tile_layout,
    flex_block_mask,
)
from .checks import check_choice, check_number
from .entmax_topk import entmax15, entmax_alpha, sparsemax  # `from .x import` form: remote code copies x
from .entmax_triton import entmax_attention, full_precision_products, unavailable_reasons
from .patterns import Pattern, bind_rows, rows_mask

ATTENTION_FUNCTIONS = ("softmax", "entmax15", "entmax_bisect", "sparsemax")
BACKENDS = ("auto", "eager", "sdpa", "flex", "tiles", "fused")
FUSED_ALPHA = {"entmax15": 1.5, "sparsemax": 2.0}  # entmax_bisect: the config's alpha

# When a block-sparse kernel pays, measured by scripts/benchmark_attention.py (benchmarks/attention_backends.md,
# CPU, 2 cores, B=1, H=12, D=64): the tiles kernel beat dense SDPA at every length L >= 512 with block density
# <= 0.289 (closest call 0.91; lost at 0.344) and the eager entmax at every L >= 256 with block density <= 0.625
# (closest call 0.82; lost at 0.875). On CUDA softmax runs FlexAttention, measured by
# scripts/benchmark_gpu_masks.py (benchmarks/masks_gpu.md, one H200, BERT-base window:64 layer, bf16): 1.50x the
# dense SDPA layer's forward time at L = 4096 (slower), 0.58x forward and 0.50x forward+backward at L = 16384, so it
# is picked from 16384 on. The CUDA entmax entry (reached only without triton, else the fused kernel runs) is a guess.
BLOCK_SPARSE_MIN_LENGTH = {"cpu": {"softmax": 512, "entmax": 256}, "cuda": {"softmax": 16384, "entmax": 1024}}
BLOCK_SPARSE_MAX_DENSITY = {"softmax": 0.28, "entmax": 0.6}
FLEX_BLOCK_SIZE = 128

# Full-precision products on CUDA (float32 under torch's default matmul precision "highest", float64): the fused
# kernel multiplies on the CUDA cores (32 x 32 tiles), while cuBLAS has fast float32 matmuls. Measured by
# scripts/benchmark_gpu.py (benchmarks/gpu.md, float32 section, one H200, 16 heads, head dim 64), fused / eager
# forward+backward: 1.03x at L = 1024, 2.3x at 2048, 3.0x at 4096, 4.2x at 8192 (non-causal; causal 0.69x, 1.0x,
# 1.7x, 1.9x), so a float32 SparseBERT training step took 4.7x the softmax model's time on the fused kernel against
# 1.9x on eager. With TF32 allowed the fused kernel wins at every length (0.17-0.66x). So from this length on
# `auto` runs eager for full-precision entmax while eager's L x L tensors (EAGER_SCORE_COPIES float32 ones at
# once, forward or training) take at most EAGER_MEMORY_SHARE of the GPU's memory; beyond, the fused kernel, whose
# memory is O(L), still runs.
# A sparse pattern keeps the fused kernel: its work shrinks with the tiles the pattern leaves (eager's does not), so
# at the dense ratio of 2.3-4.2x it wins below about a third of the tiles (an inference from the dense
# measurements; full-precision patterns on the GPU are not measured).
FULL_PRECISION_EAGER_MIN_LENGTH = 2048
FULL_PRECISION_EAGER_MIN_DENSITY = 1 / 3
EAGER_SCORE_COPIES = {False: 4, True: 8}
EAGER_MEMORY_SHARE = 0.25

# Compilations FlexAttention may accumulate before dynamo gives up on it and runs it unfused (which materialises the
# whole score matrix, 2-9x slower than dense). On CUDA they are bounded by the two tile-lookup mask_mods of
# hf_sparse.block_maps, one per offset-only pattern (its own closed form) and a few shape generalisations; on CPU
# there is one per (pattern, length), see compiled_flex_attention. Dynamo's default of 8 would be reached by a CPU
# process that sees nine.
FLEX_RECOMPILE_LIMIT = 256

_compiled_flex: dict[bool, object] = {}


def compiled_flex_attention(device_type: str = "cuda"):
    """FlexAttention compiled once per process (uncompiled it materialises the full score matrix).

    CUDA: automatic dynamic shapes, so a second sequence length recompiles once for symbolic lengths. A pattern of
    the offset ``i - j`` alone (``window``, ``causal``, ...) brings its own closed-form ``mask_mod``, compiled once
    per pattern; every other pattern reaches the kernel as data through the same tile-lookup ``mask_mod``
    (:func:`hf_sparse.block_maps.tile_lookup_in_kernel`).

    CPU: static shapes, one compilation per pattern and length. Under symbolic lengths Inductor's C++
    FlexAttention template (torch 2.13) emits C++ that does not compile for many ``mask_mod``s (``causal``,
    ``no_diagonal``, ``logsparse`` once another pattern compiled first; see ``tile_lookup_in_kernel``), so on CPU
    ``attention_backend="auto"`` runs the ``tiles`` kernel, which needs no compiler, and ``flex`` is there for
    an explicit request.
    """
    dynamic = device_type != "cpu"
    if dynamic not in _compiled_flex:
        _compiled_flex[dynamic] = torch.compile(flex_attention, dynamic=None if dynamic else False)
    return _compiled_flex[dynamic]


@dataclass
class AttentionMask:
    """Which (query, key) pairs may attend, in the form the chosen kernel wants.

    ``keep`` is a ``(B|1, H|1, Lq, Lk)`` bool tensor for eager/sdpa (``None``: everything allowed);
    ``block_mask`` is the FlexAttention form (``None`` unless ``backend == "flex"``);
    ``bias`` is an additive float ``(B|1, H|1, Lq, Lk)`` term on the scores (the DAM search's −c·(1−M), eager only);
    ``valid_tokens`` is the ``(B, L)`` padding mask itself (True = real token), for predictors and gold graphs;
    ``has_key`` is ``keep.any(-1, keepdim=True)``, computed once for every layer that shares the mask (SDPA zeroes
    the rows without a key with it); ``layout`` the pattern's touched tiles for the ``tiles`` kernel; ``tiles``
    the same as a ``(1, H|1, n/128, n/128)`` bool block mask for the ``fused`` kernel (``keep`` holds the pairs
    inside them); ``pattern`` the pattern itself (what predicted-sparse attention meets its prediction with);
    ``causal``: the queries are the last ``Lq`` of the ``Lk`` positions and ``keep`` already excludes every later key
    (a decoder's mask, KV cache included), so the ``fused`` kernel may skip the tiles above that diagonal unread;
    ``from_padding``: ``keep`` is exactly the padded keys of ``valid_tokens`` (and causality, if ``causal``), as a
    mask built from a padding mask is, so predicted attention rebuilds it from them instead of reading it.
    """

    backend: str
    keep: torch.Tensor | None = None
    block_mask: BlockMask | None = None
    bias: torch.Tensor | None = None
    valid_tokens: torch.Tensor | None = None
    has_key: torch.Tensor | None = None
    layout: TileLayout | None = None
    tiles: torch.Tensor | None = None
    pattern: Pattern | None = None
    causal: bool = False
    from_padding: bool = False


# α of entmax_bisect that float32 bisection solves to ~1e-5 of float64 (measured: 1e-5 at α = 1.001, 4.5e-3 at
# α = 4; below α = 1.001 the result drifts towards softmax, above α = 3 towards a wrong argmax).
ENTMAX_ALPHA_RANGE = (1.001, 3.0)


def check_entmax_alpha(alpha, used: bool) -> float:
    """``entmax_alpha`` of a config: a number always; within :data:`ENTMAX_ALPHA_RANGE` when ``entmax_bisect``
    uses it."""
    low, high = ENTMAX_ALPHA_RANGE
    if used:
        why = "alpha -> 1 is softmax: use attention_fn='softmax'; 1.5 and 2 have exact entmax15 and sparsemax"
        return check_number("entmax_alpha", alpha, at_least=low, at_most=high, why=why)
    return check_number("entmax_alpha", alpha)


class ReturnsAttentionsAnyway:
    """Config mixin of both families: ``output_attentions`` stored as given. These models return the attention
    probabilities whatever kernel their config picks (the eager one runs where they are asked for), while
    Transformers' setter and its ``save_pretrained`` validation refuse the flag unless ``attn_implementation`` is
    "eager", which these models refuse in turn: ``model.config.output_attentions = True``, and saving a model
    loaded with ``output_attentions=True``, failed."""

    @property
    def output_attentions(self) -> bool:
        return self._output_attentions

    @output_attentions.setter
    def output_attentions(self, value: bool) -> None:
        self._output_attentions = value

    def validate_output_attentions(self) -> None:
        """Nothing to refuse (see the class)."""


def eager_for_output_attentions(config, requested) -> bool:
    """Whether ``requested`` is the "eager" Transformers' config sets by itself when ``output_attentions=True``
    reaches it before any attention implementation (``from_pretrained(path, output_attentions=True)``), which both
    families accept: they return the attentions anyway (:class:`ReturnsAttentionsAnyway`). An explicit request is
    refused in their ``from_pretrained``, before the config could hide it."""
    return requested == "eager" and bool(getattr(config, "output_attentions", False))


def check_batch(name: str, shape: tuple[int, ...], attention_mask: torch.Tensor | None) -> None:
    """Refuse an input with no sequence or no token, and a padding mask whose rows or length differ from it,
    naming the shapes: both models' forwards call this first, where stock BERT and Marian fail later with a bare
    reshape or index error (or, for an all-ones single-row mask, silently broadcast it). ``name``: the input given
    (``input_ids`` or ``inputs_embeds``)."""
    if len(shape) < 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(
            f"{name} has shape {tuple(shape)}: the model needs a batch of at least one sequence of at least one token "
            "(batch, sequence_length[, hidden])"
        )
    if attention_mask is None or attention_mask.dim() != 2:
        return  # (a model that takes only 2-D padding masks says so itself)
    batch, n = shape[:2]
    if attention_mask.shape[-1] != n:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions but the input has {n}")
    if attention_mask.shape[0] != batch:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[0]} rows but the batch has {batch}: give one row of "
            "padding per sequence (a single row is not broadcast)"
        )


def choose_backend(
    requested: str,
    *,
    pattern: Pattern,
    n: int,
    device: torch.device,
    attention_fn: str = "softmax",
    output_attentions: bool = False,
    needs_grad: bool = False,
    dropout: float = 0.0,
    soft_mask: bool = False,
    per_row: bool = False,
    dtype: torch.dtype | None = None,
    pairs: int = 0,
    predicted: bool = False,
) -> str:
    """Resolve ``requested`` to a kernel, refusing (not silently replacing) impossible explicit requests.

    ``soft_mask``: an additive, differentiable mask is in play (DAM search), which only the eager kernel takes.
    ``per_row``: the pattern draws random keys per sequence (padding given: :func:`hf_sparse.patterns.bind_rows`),
    a mask per batch that only the dense kernels take.
    ``dtype``, ``pairs``: the dtype attention computes in (autocast's, where it is on) and the (query, key) pairs
    of one call over batch and heads, for ``auto``'s choice between the fused kernel and eager at full precision.
    ``predicted``: Sparsefinder's predicted-sparse attention runs (on the fused kernel, or by gathering, never
    dense eager), so that choice does not arise.
    ``auto``: eager when probabilities are asked for; on CUDA the ``fused`` kernel for the entmax family (it skips
    the pattern's empty tiles itself), but eager for full-precision products from
    :data:`FULL_PRECISION_EAGER_MIN_LENGTH` keys on where its memory allows (:func:`eager_beats_fused`) and the
    pattern keeps more than :data:`FULL_PRECISION_EAGER_MIN_DENSITY` of the tiles; a
    block-sparse kernel (FlexAttention on CUDA for softmax, ``tiles`` otherwise) when the sequence is long and the
    pattern block-sparse enough to pay (measured crossover above; the density comes from the pattern's block map
    on the CPU, cached, so no device is read); else SDPA for softmax, eager for the entmax family.
    """
    check_choice("attention_backend", requested, BACKENDS)
    if soft_mask:
        if requested not in ("auto", "eager"):
            raise ValueError(
                f"attention_backend={requested!r} cannot train a DAM mask (it needs the additive soft mask of the "
                "eager kernel); use 'auto' or 'eager' during the search, sparse kernels after freeze_dam()"
            )
        return "eager"
    # Both block-sparse and fused kernels never build the probabilities; the fused kernel also runs the entmax
    # family, trains on CPU (under the interpreter) and draws attention dropout itself, which FlexAttention does not.
    no_probabilities = ["output_attentions=True needs the probabilities"] if output_attentions else []
    reasons_not_flex = []
    if attention_fn != "softmax":
        reasons_not_flex.append(f"attention_fn={attention_fn!r} is not a softmax (the tiles kernel runs it)")
    reasons_not_flex += no_probabilities
    if needs_grad and device.type == "cpu":
        reasons_not_flex.append("FlexAttention has no backward on CPU (the tiles kernel has)")
    if dropout > 0:
        reasons_not_flex.append(
            f"attention dropout {dropout} is active (set the config's attention dropout to 0: "
            "attention_probs_dropout_prob in BERT, attention_dropout in Marian)"
        )
    reasons_not_fused = list(no_probabilities)
    if attention_fn == "softmax":
        reasons_not_fused.append("attention_fn='softmax' is not an entmax ('sdpa' and 'flex' fuse softmax)")
    reasons_not_fused += unavailable_reasons(device)

    if per_row and requested in ("flex", "tiles"):
        raise ValueError(
            f"attention_backend={requested!r} is not possible here: pattern {str(pattern)!r} draws its random keys "
            "among each sequence's own tokens (so they do not depend on the batch's padding), a mask per batch "
            "that only 'eager' and 'sdpa' take; use one of them or 'auto'"
        )
    if requested == "fused":
        if reasons_not_fused:
            raise ValueError("attention_backend='fused' is not possible here: " + "; ".join(reasons_not_fused))
        return "fused"
    if requested == "flex":
        if reasons_not_flex:
            raise ValueError("attention_backend='flex' is not possible here: " + "; ".join(reasons_not_flex))
        return "flex"
    if requested == "tiles":
        if output_attentions:
            raise ValueError(
                "attention_backend='tiles' does not return probabilities (output_attentions=True); use 'eager' or "
                "'auto'"
            )
        return "tiles"
    if requested == "sdpa":
        if attention_fn != "softmax" or output_attentions:
            raise ValueError(
                "attention_backend='sdpa' computes softmax attention without returning probabilities; "
                f"got attention_fn={attention_fn!r}, output_attentions={output_attentions}. Use 'eager' or 'auto'."
            )
        return "sdpa"
    if requested == "eager":
        return "eager"
    # auto
    family = "softmax" if attention_fn == "softmax" else "entmax"
    dense_kernel = "sdpa" if family == "softmax" else "eager"
    if output_attentions:
        return "eager"
    if family == "entmax" and device.type == "cuda" and not reasons_not_fused:
        if predicted or not eager_beats_fused(dtype, n, pairs, needs_grad, device):
            return "fused"
        dense_enough = pattern.is_dense or (
            cached_block_density(pattern, n, "cpu", FLEX_BLOCK_SIZE) > FULL_PRECISION_EAGER_MIN_DENSITY
        )
        return "eager" if dense_enough else "fused"
    min_length = BLOCK_SPARSE_MIN_LENGTH.get(device.type, BLOCK_SPARSE_MIN_LENGTH["cuda"])[family]
    if per_row or pattern.is_dense or n < min_length:
        return dense_kernel
    if cached_block_density(pattern, n, "cpu", FLEX_BLOCK_SIZE) > BLOCK_SPARSE_MAX_DENSITY[family]:
        return dense_kernel
    return "flex" if device.type == "cuda" and not reasons_not_flex else "tiles"


def eager_beats_fused(
    dtype: torch.dtype | None, n: int, pairs: int, needs_grad: bool, device: torch.device
) -> bool:
    """On CUDA, for the entmax family: whether matmul + ``entmax_topk`` + matmul is the faster exact kernel, which
    it is for full-precision products from :data:`FULL_PRECISION_EAGER_MIN_LENGTH` keys on, while its
    :data:`EAGER_SCORE_COPIES` float32 score tensors of ``pairs`` entries take at most :data:`EAGER_MEMORY_SHARE`
    of the device's memory (the measurements above :data:`FULL_PRECISION_EAGER_MIN_LENGTH`)."""
    if dtype is None or not full_precision_products(dtype) or n < FULL_PRECISION_EAGER_MIN_LENGTH:
        return False
    eager_bytes = EAGER_SCORE_COPIES[needs_grad] * pairs * 4
    return eager_bytes <= EAGER_MEMORY_SHARE * device_memory(device)


def device_memory(device: torch.device) -> int:
    """The device's total memory in bytes (a property of the card: the same on every call)."""
    return torch.cuda.get_device_properties(device).total_memory


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype a model of parameter dtype ``dtype`` computes attention in on ``device``: autocast's where it is
    on there (its linear layers hand attention that dtype), else the model's own."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def attention_backends_used(model: torch.nn.Module) -> dict[str, str]:
    """The kernel each attention module of ``model`` ran in its latest forward, by module name.

    ``eager``, ``sdpa``, ``flex``, ``tiles``, ``fused``, ``sparsefinder`` (attention on a predictor's pairs, by
    gathering) or ``fused (predicted blocks)`` (the same pairs on the fused kernel);
    modules that have not run yet are absent. :func:`hf_sparse.sparsefinder.attend_layer` records the name on the
    module as a plain Python string when it dispatches: no device is read, so looking costs nothing per forward.
    With KV-cache decoding the record is the last step's (prefill and steps can differ: a step is one query).
    """
    return {
        name: module.attention_backend_used
        for name, module in model.named_modules()
        if isinstance(getattr(module, "attention_backend_used", None), str)
    }


def build_mask(
    pattern: Pattern, key_valid: torch.Tensor | None, n: int, device: torch.device, backend: str
) -> AttentionMask:
    """Combine the pattern with the padding mask (``key_valid``: ``(B, n)`` bool, True = real token).

    The pattern's part comes from the cache (:mod:`hf_sparse.block_maps`); only the padding is new per batch.
    """
    valid = None if key_valid is None else key_valid.to(device=device, dtype=torch.bool)
    if valid is not None and pattern.has_random:  # random keys among each row's own tokens: a mask per batch
        if backend in ("flex", "tiles"):
            raise ValueError(f"pattern {str(pattern)!r} with padding runs on 'eager' or 'sdpa', not {backend!r}")
        bound = bind_rows(pattern, valid)
        keep = rows_mask(bound, n, device, valid.shape[0]) & valid[:, None, None, :]
        return AttentionMask(
            backend, keep=keep, valid_tokens=valid, has_key=keep.any(dim=-1, keepdim=True), pattern=bound
        )
    if backend == "fused":  # the dense mask (padding and the pattern's pairs) plus the pattern's tiles to skip
        eager = build_mask(pattern, key_valid, n, device, "eager")
        tiles = None
        if not pattern.is_dense:
            block_map = cached_block_map(pattern, n, device, FLEX_BLOCK_SIZE)
            tiles = (block_map.full | block_map.partial)[None]
        return AttentionMask(backend, keep=eager.keep, valid_tokens=valid, tiles=tiles, pattern=pattern)
    if backend == "tiles":
        layout = cached_tile_layout(pattern, n, device)
        return AttentionMask(backend, layout=layout, valid_tokens=valid, pattern=pattern)
    if backend == "flex":
        mask = flex_block_mask(pattern, n, device, valid, FLEX_BLOCK_SIZE)
        return AttentionMask(backend, block_mask=mask, valid_tokens=valid, pattern=pattern)
    keep = None if pattern.is_dense else cached_dense_mask(pattern, n, device)[None]
    if valid is not None:
        pad = valid[:, None, None, :]
        keep = pad if keep is None else keep & pad
    has_key = None if keep is None else keep.any(dim=-1, keepdim=True)
    return AttentionMask(backend, keep=keep, valid_tokens=valid, has_key=has_key, pattern=pattern)


def normalize(scores: torch.Tensor, keep: torch.Tensor | None, attention_fn: str, alpha: float) -> torch.Tensor:
    """Masked softmax / α-entmax over the last dim; exact zeros outside ``keep`` and on rows with no key.

    The entmax family runs :mod:`hf_sparse.entmax_topk`: the ``entmax`` package's exact result (to float rounding),
    solved on each row's top-k scores instead of a sort / bisection over the whole row.
    """
    check_choice("attention_fn", attention_fn, ATTENTION_FUNCTIONS)
    if attention_fn == "softmax":
        if keep is not None:
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        # A fully masked row was normalised over min-valued scores (uniform); zero it. Elsewhere a no-op.
        return probs if keep is None else probs * keep
    if attention_fn == "entmax15":
        return entmax15(scores, keep=keep)
    if attention_fn == "sparsemax":
        return sparsemax(scores, keep=keep)
    return entmax_alpha(scores, alpha, keep=keep)  # entmax_bisect


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: AttentionMask,
    *,
    scaling: float,
    dropout: float = 0.0,
    attention_fn: str = "softmax",
    alpha: float = 1.5,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over ``(B, H, L, D)`` inputs; returns ``(B, L, H, D)`` output and probabilities if asked.

    ``dropout`` is the probability to apply now (0 in eval), as in Transformers' attention functions.
    """
    if mask.backend == "eager":
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        if mask.bias is not None:
            scores = scores + mask.bias
        probs = normalize(scores, mask.keep, attention_fn, alpha)
        out = torch.matmul(F.dropout(probs, p=dropout, training=dropout > 0), value)
        return out.transpose(1, 2).contiguous(), probs if output_attentions else None
    if mask.backend == "sdpa":
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.keep, dropout_p=dropout, scale=scaling)
        if mask.keep is not None:  # rows with no allowed key: 0, and no NaN gradient
            out = out * (mask.has_key if mask.has_key is not None else mask.keep.any(dim=-1, keepdim=True))
        return out.transpose(1, 2).contiguous(), None
    if mask.backend == "flex":
        with torch._dynamo.config.patch(recompile_limit=FLEX_RECOMPILE_LIMIT):
            out = compiled_flex_attention(query.device.type)(
                query, key, value, block_mask=mask.block_mask, scale=scaling
            )
        return out.transpose(1, 2).contiguous(), None
    if mask.backend == "fused":
        keep = mask.keep
        if keep is not None:
            keep = keep.expand(keep.shape[0], keep.shape[1], query.shape[2], key.shape[2])
        out = entmax_attention(
            query,
            key,
            value,
            alpha=FUSED_ALPHA.get(attention_fn, alpha),
            scaling=scaling,
            causal=mask.causal,
            block_mask=mask.tiles,
            mask_block=FLEX_BLOCK_SIZE,
            keep=keep,
            dropout=dropout,
        )
        return out.transpose(1, 2).contiguous(), None
    if mask.backend == "tiles":
        out = attend_tiles(
            query, key, value, mask.layout, mask.valid_tokens, scaling, dropout, attention_fn, alpha
        )
        return out.transpose(1, 2).contiguous(), None
    raise ValueError(f"unknown attention backend {mask.backend!r}; valid: eager, sdpa, flex, tiles, fused")


_TILE_SCORES_PER_STEP = 1 << 22  # scores computed at once by attend_tiles: 16 MB in float32, bounds its memory


def attend_tiles(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout: TileLayout,
    valid_keys: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    attention_fn: str = "softmax",
    alpha: float = 1.5,
) -> torch.Tensor:
    """Block-sparse attention by gathering: each tile row of queries scores only the key tiles it touches.

    Plain tensor operations, so it runs every normaliser (softmax through SDPA, the entmax family through
    :func:`normalize`), trains (autograd), and needs no compilation. Per group of tile rows of similar width the
    touched key and value tiles are gathered, scored, masked by the tiles' contents and the padding, normalised
    over the row and mixed, a few tile rows at a time to bound memory. The result equals dense masked attention
    (keys outside the touched tiles have probability 0 either way). ``(B, H, L, D)`` inputs → ``(B, H, L, Dv)``.
    """
    b, h, n, d = query.shape
    blk, nb, dv = layout.block, layout.blocks, value.shape[-1]
    pad = nb * blk - n

    def tiled(x):  # (B, H, n, D) → (B, H, blocks, blk, D), a view when n fills the tiles
        return (F.pad(x, (0, 0, 0, pad)) if pad else x).view(b, h, nb, blk, x.shape[-1])

    q, k, v = tiled(query), tiled(key), tiled(value)
    valid = None
    if valid_keys is not None:
        valid = F.pad(valid_keys.to(device=query.device, dtype=torch.bool), (0, pad)).view(b, nb, blk)
    out = query.new_zeros(b, h, nb, blk, dv)  # rows touching no key tile stay 0
    for group in layout.groups:
        if group.slots is None:
            continue
        step = max(1, _TILE_SCORES_PER_STEP // max(1, b * h * blk * group.width * blk))
        for start in range(0, len(group.rows), step):
            sl = slice(start, start + step)
            rows = _attend_tile_rows(
                q[:, :, group.rows[sl]], k, v, valid, group.columns[:, sl], group.slots[:, sl], layout.bits,
                scaling, dropout, attention_fn, alpha,
            )
            out.index_copy_(2, group.rows[sl], rows)
    return out.view(b, h, nb * blk, dv)[:, :, :n]


def _attend_tile_rows(q, k, v, valid, columns, slots, bits, scaling, dropout, attention_fn, alpha):
    """``q`` ``(B, H, r, blk, D)`` tile rows against their key tiles ``columns`` ``(H|1, r, K)``."""
    b, h, r, blk, d = q.shape
    width = columns.shape[-1]
    if columns.shape[0] > 1:  # a pattern that differs between heads
        heads = torch.arange(h, device=q.device).view(h, 1, 1)
        keys, values = k[:, heads, columns], v[:, heads, columns]  # (B, H, r, K, blk, D)
    else:
        keys, values = k[:, :, columns[0]], v[:, :, columns[0]]
    keys, values = keys.reshape(b, h, r, width * blk, d), values.reshape(b, h, r, width * blk, v.shape[-1])
    keep = bits[slots.clamp(min=0)] & (slots >= 0)[..., None, None]  # (H|1, r, K, blk, blk), query-major
    keep = keep.transpose(2, 3).reshape(1, -1, r, blk, width * blk)
    if valid is not None:
        gathered = valid[:, columns[0]] if columns.shape[0] == 1 else valid[:, columns]  # (B, [H,] r, K, blk)
        keep = keep & gathered.reshape(b, -1, r, 1, width * blk)
    if attention_fn == "softmax":  # as 4-D inputs, which SDPA's fused CPU kernel takes (5-D runs its math path)
        keep = keep.expand(b, h, r, blk, width * blk)
        out = F.scaled_dot_product_attention(
            q.reshape(b, h * r, blk, d),
            keys.reshape(b, h * r, width * blk, d),
            values.reshape(b, h * r, width * blk, -1),
            attn_mask=keep.reshape(b, h * r, blk, width * blk),
            dropout_p=dropout,
            scale=scaling,
        ).view(b, h, r, blk, -1)
        return out * keep.any(dim=-1, keepdim=True)  # a query with no allowed key: 0, and no NaN gradient
    probs = normalize(torch.matmul(q, keys.transpose(-1, -2)) * scaling, keep, attention_fn, alpha)
    return torch.matmul(F.dropout(probs, p=dropout, training=dropout > 0), values)
