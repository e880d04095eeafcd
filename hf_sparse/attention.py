"""One attention function for every model: which pairs may attend is decided once per forward
(:func:`build_mask`), then :func:`attend` runs the kernel that was chosen for it.

Kernels
    ``eager``  matmul + mask + normaliser; the reference, the only one that returns probabilities and the
               only one for entmax-family normalisers.
    ``sdpa``   ``torch.nn.functional.scaled_dot_product_attention`` with a boolean mask (dense work).
    ``flex``   FlexAttention with a ``BlockMask``: skips fully masked tiles (block-sparse work), compiled.
    ``auto``   picks by what is possible, then by the crossover measured in ``benchmarks/attention_backends.md``.

Every kernel returns exact zeros for a query row with no allowed key (never NaN).
This module is imported by remote code: torch and the standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .entmax_topk import entmax15, entmax_alpha, sparsemax  # `from .x import` form: remote code copies x
from .patterns import Pattern, block_density, block_mask, dense_mask

ATTENTION_FUNCTIONS = ("softmax", "entmax15", "entmax_bisect", "sparsemax")
BACKENDS = ("auto", "eager", "sdpa", "flex")

# Crossover measured by scripts/benchmark_attention.py (benchmarks/attention_backends.md, CPU, 2 cores): the
# block-sparse FlexAttention forward costs ≈ 1.6-1.9 × block density of a dense SDPA call, so it wins up to a
# block density of about 0.55; at 0.5 it takes at most 0.8 of dense. Below L = 512 the gain (≤ 0.2 ms per layer)
# does not pay for a compile. CUDA was not measured here: its entry is a conservative guess.
FLEX_MIN_LENGTH = {"cpu": 512, "cuda": 1024}
FLEX_MAX_BLOCK_DENSITY = 0.5
FLEX_BLOCK_SIZE = 128

_compiled_flex = None


def compiled_flex_attention():
    """FlexAttention compiled once per process (uncompiled it materialises the full score matrix).

    Automatic dynamic shapes (not ``dynamic=False``): a second sequence length recompiles once for symbolic
    lengths; with static shapes every new length recompiles and after 8 dynamo gives up and runs the slow
    unfused path (measured: ~9x slower than dense SDPA).
    """
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


@dataclass
class AttentionMask:
    """Which (query, key) pairs may attend, in the form the chosen kernel wants.

    ``keep`` is a ``(B|1, H|1, Lq, Lk)`` bool tensor for eager/sdpa (``None``: everything allowed);
    ``block_mask`` is the FlexAttention form (``None`` unless ``backend == "flex"``);
    ``bias`` is an additive float ``(B|1, H|1, Lq, Lk)`` term on the scores (the DAM search's −c·(1−M), eager only);
    ``valid_tokens`` is the ``(B, L)`` padding mask itself (True = real token), for predictors and gold graphs.
    """

    backend: str
    keep: torch.Tensor | None = None
    block_mask: BlockMask | None = None
    bias: torch.Tensor | None = None
    valid_tokens: torch.Tensor | None = None


def check_choice(name: str, value: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid values: {', '.join(valid)}")
    return value


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
) -> str:
    """Resolve ``requested`` to a kernel, refusing (not silently replacing) impossible explicit requests.

    ``soft_mask``: an additive, differentiable mask is in play (DAM search), which only the eager kernel takes.
    """
    check_choice("attention_backend", requested, BACKENDS)
    if soft_mask:
        if requested not in ("auto", "eager"):
            raise ValueError(
                f"attention_backend={requested!r} cannot train a DAM mask (it needs the additive soft mask of the "
                "eager kernel); use 'auto' or 'eager' during the search, sparse kernels after freeze_dam()"
            )
        return "eager"
    reasons_not_flex = []
    if attention_fn != "softmax":
        reasons_not_flex.append(f"attention_fn={attention_fn!r} is not a softmax")
    if output_attentions:
        reasons_not_flex.append("output_attentions=True needs the probabilities")
    if needs_grad and device.type == "cpu":
        reasons_not_flex.append("FlexAttention has no backward on CPU")
    if dropout > 0:
        reasons_not_flex.append(f"attention dropout {dropout} is active (set attention_probs_dropout_prob=0)")

    if requested == "flex":
        if reasons_not_flex:
            raise ValueError("attention_backend='flex' is not possible here: " + "; ".join(reasons_not_flex))
        return "flex"
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
    if attention_fn != "softmax" or output_attentions:
        return "eager"
    if reasons_not_flex or pattern.is_dense or n < FLEX_MIN_LENGTH.get(device.type, FLEX_MIN_LENGTH["cuda"]):
        return "sdpa"
    if block_density(pattern, n, FLEX_BLOCK_SIZE) > FLEX_MAX_BLOCK_DENSITY:
        return "sdpa"
    return "flex"


def build_mask(
    pattern: Pattern, key_valid: torch.Tensor | None, n: int, device: torch.device, backend: str
) -> AttentionMask:
    """Combine the pattern with the padding mask (``key_valid``: ``(B, n)`` bool, True = real token)."""
    valid = None if key_valid is None else key_valid.to(device=device, dtype=torch.bool)
    if backend == "flex":
        mask = block_mask(pattern, n, device, valid, FLEX_BLOCK_SIZE)
        return AttentionMask(backend, block_mask=mask, valid_tokens=valid)
    keep = None if pattern.is_dense else dense_mask(pattern, n, device)[None]
    if valid is not None:
        pad = valid[:, None, None, :]
        keep = pad if keep is None else keep & pad
    return AttentionMask(backend, keep=keep, valid_tokens=valid)


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
        if mask.keep is not None:
            out = out * mask.keep.any(dim=-1, keepdim=True)  # rows with no allowed key: 0, and no NaN gradient
        return out.transpose(1, 2).contiguous(), None
    if mask.backend == "flex":
        out = compiled_flex_attention()(query, key, value, block_mask=mask.block_mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    raise ValueError(f"unknown attention backend {mask.backend!r}; valid: eager, sdpa, flex")


def attend_gathered(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pairs: torch.Tensor,
    *,
    scaling: float,
    attention_fn: str = "entmax15",
    alpha: float = 1.5,
    dense_probabilities: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention computed only on predicted ``pairs`` (bool ``(B, H, Lq, Lk)``): no ``Lq x Lk`` score matrix.

    Each query gathers its predicted keys, padded to the largest count ``K`` in the batch, scores those, normalises
    over them (padding slots masked) and mixes the matching values. The result equals dense attention with every
    other pair masked out; a query with no predicted key gets zeros. Returns the ``(B, Lq, H, D)`` output and, only
    if ``dense_probabilities``, the ``(B, H, Lq, Lk)`` probabilities scattered back (else ``None``).
    """
    count = int(pairs.sum(-1).max().item()) if pairs.numel() else 0
    b, h, lq, d = query.shape
    if count == 0:
        return query.new_zeros(b, lq, h, value.shape[-1]), query.new_zeros(pairs.shape) if dense_probabilities else None
    # indices of the kept keys first (stable: in key order), then padding slots
    order = torch.argsort((~pairs).to(torch.int8), dim=-1, stable=True)[..., :count]  # (B, H, Lq, K)
    slot_valid = torch.gather(pairs, -1, order)
    flat = order.reshape(b, h, lq * count, 1)
    keys = torch.gather(key, 2, flat.expand(-1, -1, -1, d)).view(b, h, lq, count, d)
    values = torch.gather(value, 2, flat.expand(-1, -1, -1, value.shape[-1])).view(b, h, lq, count, -1)
    scores = torch.einsum("bhqd,bhqkd->bhqk", query, keys) * scaling
    probs = normalize(scores, slot_valid, attention_fn, alpha)
    out = torch.einsum("bhqk,bhqkd->bhqd", probs, values)
    dense = probs.new_zeros(pairs.shape).scatter_add_(-1, order, probs) if dense_probabilities else None
    return out.transpose(1, 2).contiguous(), dense
