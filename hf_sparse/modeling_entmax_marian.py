"""Marian with α-entmax attention (per attention type), the model of Sparsefinder's MT experiments.

The network is Transformers' own ``MarianModel`` / ``MarianMTModel``: same modules, same weight names, same
generation, caches and beam search. What changes is the attention function, plugged in through Transformers'
``AttentionInterface`` (and a matching boolean mask through ``AttentionMaskInterface``): it picks the normaliser
of each attention type from the config (encoder self, decoder self = causal, decoder cross) and runs
:func:`hf_sparse.attention.attend`. With all three set to ``softmax`` the outputs equal ``MarianMTModel``'s.

This file is copied next to saved checkpoints (remote code): torch, transformers' public API and siblings only.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, MarianModel, MarianMTModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import AttentionMask, attend
from .configuration_entmax_marian import EntmaxSparsefinderMarianConfig

ATTENTION_NAME = "hf_sparse_entmax"


def attention_type(module) -> str:
    """``decoder`` (causal self-attention), ``cross`` (decoder over encoder) or ``encoder``."""
    if getattr(module, "is_causal", False):
        return "decoder"
    return "cross" if getattr(module, "is_decoder", False) else "encoder"


def entmax_marian_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers attention-function signature; ``attention_mask`` is boolean ``(B, 1, Lq, Lk)`` (True = attend)."""
    config = module.config
    fn = getattr(config, f"{attention_type(module)}_attention_fn")
    keep = attention_mask if attention_mask is None or attention_mask.dtype == torch.bool else attention_mask == 0
    return attend(
        query,
        key,
        value,
        AttentionMask("eager", keep=keep),
        scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
        dropout=dropout,
        attention_fn=fn,
        alpha=config.entmax_alpha,
        output_attentions=True,
    )


def boolean_mask(*args, **kwargs) -> torch.Tensor:
    """SDPA's boolean mask, always materialised: the attention function never guesses causality from ``None``."""
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(*args, allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


AttentionInterface.register(ATTENTION_NAME, entmax_marian_attention)
AttentionMaskInterface.register(ATTENTION_NAME, boolean_mask)


def _use_entmax_attention(model) -> None:
    # Transformers' attn_implementation ("sdpa", "eager", ...) has no notion of entmax: the config's *_attention_fn
    # fields decide, through this one registered function.
    model.config._attn_implementation = ATTENTION_NAME


class EntmaxSparsefinderMarianModel(MarianModel):
    config_class = EntmaxSparsefinderMarianConfig

    def __init__(self, config: EntmaxSparsefinderMarianConfig):
        super().__init__(config)
        _use_entmax_attention(self)


class EntmaxSparsefinderMarianMTModel(MarianMTModel):
    config_class = EntmaxSparsefinderMarianConfig

    def __init__(self, config: EntmaxSparsefinderMarianConfig):
        super().__init__(config)
        _use_entmax_attention(self)


EntmaxSparsefinderMarianModel.register_for_auto_class("AutoModel")
EntmaxSparsefinderMarianMTModel.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = ["EntmaxSparsefinderMarianModel", "EntmaxSparsefinderMarianMTModel"]
