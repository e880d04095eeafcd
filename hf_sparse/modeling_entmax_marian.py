"""Marian with α-entmax attention (per attention type), the model of Sparsefinder's MT experiments.

The network is Transformers' own ``MarianModel`` / ``MarianMTModel``: same modules, same weight names, same
generation, caches and beam search. What changes is the attention function, plugged in through Transformers'
``AttentionInterface`` (and a matching boolean mask through ``AttentionMaskInterface``): it picks the normaliser
of each attention type from the config (encoder self, decoder self = causal, decoder cross) and runs
:func:`hf_sparse.attention.attend`. With all three set to ``softmax`` the outputs equal ``MarianMTModel``'s.

The kernel is chosen per call by :func:`hf_sparse.attention.choose_backend` from ``config.attention_backend``, as in
SparseBERT: by default the fused Triton kernel for the entmax family on CUDA (encoder, decoder self-attention with
its KV cache, cross attention), SDPA for softmax, the exact eager entmax on the CPU, and eager wherever the
probabilities are asked for (``output_attentions``, Sparsefinder's fitting). The fused kernel takes Transformers'
boolean mask as its element mask (padding, causality, cache offsets: exact whatever their layout) and, in the
decoder, ``causal=True`` to skip the tiles above the diagonal unread (predicted attention rebuilds the decoder masks
the model built itself from the padding and causality, so that its pairs can reach the kernel as per-token codes;
a 4D mask passed in is read as it is). ``model.attention_backends_used()`` tells which
kernel each attention module ran. Forward pre-hooks on the encoder and decoder refuse inputs beyond the position
table and give predicted attention the decoder cache's length (where its queries sit, also in a static cache).

This file is copied next to saved checkpoints (remote code): torch, transformers' public API and siblings only.
"""

from __future__ import annotations

import functools
import inspect
import weakref

import torch
from transformers import AttentionInterface, MarianModel, MarianMTModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .attention import (
    AttentionMask,
    attention_backends_used,
    check_batch,
    choose_backend,
    eager_for_output_attentions,
)
from .configuration_entmax_marian import EntmaxSparsefinderMarianConfig
from .loading import ReportsNewWeights, register_family
from .patterns import parse
from .sparsefinder import (
    SparsefinderLayer,
    attend_layer,
    check_loaded_predictors,
    check_predictors_built,
    predicts_layer,
    resolve_config,
    runs_predicted,
)
from .sparsefinder import initialize as initialize_predictor

ATTENTION_NAME = "hf_sparse_entmax"
_DENSE = parse("dense")  # Marian attends to what Transformers' mask allows: no pattern


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
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Transformers attention-function signature; ``attention_mask`` is boolean ``(B, 1, Lq, Lk)`` (True = attend).

    The normaliser is the config's for this attention type, the kernel ``choose_backend``'s for it; the rest
    (predicted-sparse decoding, collecting the gold graph while fitting) is
    :func:`hf_sparse.sparsefinder.attend_layer`, as in SparseBERT. The probabilities are returned only when
    ``output_attentions`` asks for them (the keyword Transformers passes down, else the config's default, which is
    what Transformers records by), so that the kernels that never build them can run.
    """
    config = module.config
    kind = attention_type(module)
    attention_fn = getattr(config, f"{kind}_attention_fn")
    output_attentions = bool(kwargs.get("output_attentions", getattr(config, "output_attentions", False)))
    backend = choose_backend(
        config.attention_backend,
        pattern=_DENSE,
        n=key.shape[2],
        device=query.device,
        attention_fn=attention_fn,
        # Sparsefinder's collector reads the probabilities
        output_attentions=output_attentions or getattr(module, "sparsefinder_collector", None) is not None,
        dropout=dropout,
        needs_grad=torch.is_grad_enabled() and query.requires_grad,
        dtype=query.dtype,
        pairs=query.shape[0] * query.shape[1] * query.shape[2] * key.shape[2],
        predicted=runs_predicted(module),
    )
    keep = attention_mask if attention_mask is None or attention_mask.dtype == torch.bool else attention_mask == 0
    valid_queries = valid_keys = None
    if keep is not None and keep.shape[-2] == keep.shape[-1]:
        # Transformers' decoder mask marks padded keys only; in (causal) self-attention position i is a padded key
        # iff (i, i) is masked, and then it is no real query either: its row is not part of the gold graph.
        valid_queries = keep.diagonal(dim1=-2, dim2=-1).any(1)
    if keep is not None and kind == "decoder":
        # the real keys, for predictors that look at the keys as a whole (quantization's bucket quantiles): the last
        # query's row, as it sees every key up to it (cache included) and the mask removes only padded keys there;
        # a static cache's empty slots lie beyond it, so they count as padding too
        valid_keys = keep[:, 0, -1]
    # a decoder mask boolean_mask built (not one the caller passed) is causality and these padded keys, no more
    from_padding = kind == "decoder" and keep is not None and _MASKS_BUILT.get(id(keep)) is keep
    causal = kind == "decoder"
    mask = AttentionMask(backend, keep=keep, valid_tokens=valid_keys, causal=causal, from_padding=from_padding)
    return attend_layer(
        module,
        query,
        key,
        value,
        mask,
        where=f"{kind} layer {module.layer_idx}",
        scaling=query.shape[-1] ** -0.5 if scaling is None else scaling,
        attention_fn=attention_fn,
        alpha=config.entmax_alpha,
        dropout=dropout,
        output_attentions=output_attentions,
        causal=causal,
        valid_queries=valid_queries,
        # the cache length, left by _before_decoder (absent: attend_layer takes the last Lq of the Lk positions)
        query_offset=getattr(module, "sparsefinder_query_offset", None) if kind == "decoder" else None,
    )


# The masks boolean_mask made, by id, while they live: Transformers builds Marian's masks with it from the 2D padding
# mask and causality only (a 4D mask a caller passes in reaches the attention function without it), so the
# attention function knows such a mask says nothing more, and predicted attention need not read it.
_MASKS_BUILT: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def boolean_mask(*args, **kwargs) -> torch.Tensor:
    """SDPA's boolean mask, always materialised: the attention function never guesses causality from ``None``."""
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    mask = sdpa_mask(*args, allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)
    if isinstance(mask, torch.Tensor):
        _MASKS_BUILT[id(mask)] = mask
    return mask


AttentionInterface.register(ATTENTION_NAME, entmax_marian_attention)
AttentionMaskInterface.register(ATTENTION_NAME, boolean_mask)


@functools.cache
def _forward_parameters(cls: type) -> tuple[str, ...]:
    return tuple(name for name in inspect.signature(cls.forward).parameters if name != "self")


def _argument(module: torch.nn.Module, args: tuple, kwargs: dict, name: str, *aliases: str):
    """An argument of ``module.forward`` as a forward pre-hook sees it: by keyword (or a deprecated alias), or by
    position."""
    names = (name, *aliases)
    for key in names:
        if kwargs.get(key) is not None:
            return kwargs[key]
    parameters = _forward_parameters(type(module))
    # the first of the names this Transformers' forward has (older releases call the cache past_key_values)
    position = next((parameters.index(key) for key in names if key in parameters), len(args))
    return args[position] if position < len(args) else None


def _check_input(module: torch.nn.Module, side: str, args: tuple, kwargs: dict, past) -> None:
    """Refuse an empty input and, on the encoder, a padding mask that does not match it
    (:func:`hf_sparse.attention.check_batch`; the decoder's mask spans the cache too), and inputs beyond Marian's
    position table, naming the lengths, instead of the embedding lookup's bare ``IndexError: index out of range in
    self`` (stock Marian's; on CUDA a device-side assert).

    ``past`` (the decoder's cache length) is an ``int``, or a static cache's 0-d tensor: read only on the CPU,
    where that is free; on an accelerator reading it would stall every decoding step, so there the steps after the
    first go unchecked (a static cache on an accelerator is the one case left to the lookup's own error)."""
    ids = _argument(module, args, kwargs, "input_ids")
    embeds = _argument(module, args, kwargs, "inputs_embeds")
    if ids is not None or embeds is not None:
        name = ("decoder_" if side == "decoder" else "") + ("input_ids" if ids is not None else "inputs_embeds")
        mask = _argument(module, args, kwargs, "attention_mask") if side == "encoder" else None
        check_batch(name, tuple((ids if ids is not None else embeds).shape), mask)
    new = ids.shape[-1] if ids is not None else embeds.shape[1] if embeds is not None else 0
    limit = module.config.max_position_embeddings
    if isinstance(past, torch.Tensor):
        if past.device.type != "cpu":
            return
        past = int(past)
    if past + new > limit:
        cached = f" ({past} cached + {new} new)" if past else ""
        how = (
            f"truncate the targets (labels / decoder_input_ids) or generate at most {limit} positions "
            "(max_new_tokens / max_length)"
            if side == "decoder"
            else f"truncate it, e.g. tokenizer(..., truncation=True, max_length={limit})"
        )
        raise ValueError(
            f"the {side} input spans {past + new} positions{cached}, more than config.max_position_embeddings="
            f"{limit}, the rows of Marian's position table: {how}"
        )


def _before_encoder(encoder: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the encoder: an empty input, a padding mask that does not match it and inputs beyond
    the position table are refused (:func:`_check_input`)."""
    _check_input(encoder, "encoder", args, kwargs, 0)


def _before_decoder(decoder: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the decoder: tells each predicting self-attention where its queries sit, and refuses
    enabled Sparsefinder settings that layers without a predictor would silently ignore, an empty input and inputs
    beyond the position table (:func:`_check_input`).

    Predictors are made when the model is built (:func:`_setup`); ``config.sparsefinder`` set afterwards on a model
    built without it (or naming more ``layers``) would leave those layers dense. Checked here, once per forward, on
    Python objects only.

    Predicted attention places its window and causality by absolute position. The attention function cannot see
    the cache, and the key count is no substitute: a static cache (``generate(..., cache_implementation="static")``)
    has ``max_cache_len`` keys, mostly empty slots. The decoder's own positions start at the cache's length, so that
    is the offset: an ``int`` for a dynamic cache; for a static cache a 0-d tensor on the device, which the layers'
    cache updates increment in place, so a copy is kept (and never read back to the host).
    """
    cache = _argument(decoder, args, kwargs, "cache", "past_key_values")
    cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache: the self-attention half
    past = 0 if cache is None else cache.get_seq_length()
    _check_input(decoder, "decoder", args, kwargs, past)
    if isinstance(past, torch.Tensor):
        past = past.clone()
    attentions = [layer.self_attn for layer in decoder.layers]
    check_predictors_built(decoder.config.sparsefinder, attentions, "decoder layers", "EntmaxSparsefinderMarianMTModel")
    for attention in attentions:
        if getattr(attention, "sparsefinder", None) is not None:
            attention.sparsefinder_query_offset = past


def _setup(model) -> None:
    """Route attention through :func:`entmax_marian_attention` and give decoder self-attention its predictors.

    Transformers' ``attn_implementation`` ("sdpa", "eager", ...) has no notion of entmax: the config's
    ``*_attention_fn`` fields decide, through the one registered function. Predictors live on the attention modules
    they serve (``model.decoder.layers.<i>.self_attn.sparsefinder``), so they are in the state dict.
    """
    model.config._attn_implementation = ATTENTION_NAME
    # module-level function, reaching the decoder through its argument: a deepcopy of the model keeps a working hook
    model.get_encoder().register_forward_pre_hook(_before_encoder, with_kwargs=True)
    model.get_decoder().register_forward_pre_hook(_before_decoder, with_kwargs=True)
    if model.config.sparsefinder is None:
        return
    settings = resolve_config(model.config.sparsefinder)
    for i, layer in enumerate(model.get_decoder().layers):
        if predicts_layer(settings, i):
            attention = layer.self_attn
            attention.sparsefinder = SparsefinderLayer(settings, attention.num_heads, attention.head_dim)


def _refuse_other_attention(cls: type, attn_implementation) -> None:
    requested = (
        attn_implementation.get("", ATTENTION_NAME) if isinstance(attn_implementation, dict) else attn_implementation
    )
    if requested != ATTENTION_NAME:
        raise ValueError(
            f"{cls.__name__} computes attention with its own function ({ATTENTION_NAME!r}), which runs "
            "config.encoder_attention_fn / decoder_attention_fn / cross_attention_fn and Sparsefinder; "
            f"attn_implementation={requested!r} would run softmax instead. Change those config fields "
            "(e.g. decoder_attention_fn='softmax') to change the normaliser"
        )


class _EntmaxSparsefinderMarian(ReportsNewWeights):
    """What both classes add to Transformers' Marian: entmax attention, predictors, and their initialisation."""

    config_class = EntmaxSparsefinderMarianConfig

    def __init__(self, config: EntmaxSparsefinderMarianConfig):
        super().__init__(config)
        _setup(self)  # predictors initialise themselves; from_pretrained fills missing ones (initialize_weights)

    @classmethod
    def check_loaded_state(cls, model, missing_keys: set[str], unexpected_keys) -> None:
        """Fitted predictors the checkpoint lost: refused (:func:`hf_sparse.sparsefinder.check_loaded_predictors`)."""
        check_loaded_predictors(model, missing_keys, unexpected_keys)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """Only this model's own attention function: Transformers' ``sdpa`` or ``eager`` would silently make it a
        softmax model and bypass Sparsefinder."""
        _refuse_other_attention(type(self), attn_implementation)
        return super().set_attn_implementation(attn_implementation, *args, **kwargs)

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        """``from_pretrained(..., attn_implementation="sdpa")`` and the config's field: refused as
        :meth:`set_attn_implementation` refuses it (it was accepted, then silently replaced by this model's own).
        The "eager" that Transformers' config sets by itself for ``output_attentions=True`` (``from_pretrained(path,
        output_attentions=True)``) is no request: the attention function returns the probabilities whatever the
        normaliser; :meth:`from_pretrained` refuses an explicit one before the config could hide it."""
        if attn_implementation is not None and not eager_for_output_attentions(self.config, attn_implementation):
            _refuse_other_attention(type(self), attn_implementation)
        return super()._check_and_adjust_attn_implementation(None, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, attn_implementation=None, **kwargs):
        """An explicit ``attn_implementation`` other than this model's own is refused (see
        :meth:`_check_and_adjust_attn_implementation`)."""
        if attn_implementation is not None:
            _refuse_other_attention(cls, attn_implementation)
        return super().from_pretrained(*args, **kwargs)

    def initialize_weights(self):
        """Transformers' initialisation, then fresh state for every predictor the checkpoint did not provide.

        Marian's encoder and decoder are ``PreTrainedModel``s, so Transformers initialises their submodules with
        their own ``_init_weights``, never this class's: an ``_init_weights`` hook here would not reach the
        predictors inside the decoder layers, which ``from_pretrained`` then left as uninitialised memory (NaN
        projections, a random ``fitted`` flag). :func:`hf_sparse.sparsefinder.initialize` leaves loaded tensors
        alone."""
        super().initialize_weights()
        with torch.no_grad():
            for module in self.modules():
                initialize_predictor(module)

    def attention_backends_used(self) -> dict[str, str]:
        """The kernel each attention module ran in the latest forward (``generate``: the latest step), by module
        name, e.g. ``{"model.decoder.layers.0.self_attn": "fused", ...}``: ``eager``, ``sdpa``, ``fused``,
        ``sparsefinder`` (predicted pairs, gathered) or ``fused (predicted blocks)`` (predicted pairs on the fused
        kernel). Recorded as plain strings while dispatching, so asking costs no device sync; see
        ``config.attention_backend`` for how the choice is made."""
        return attention_backends_used(self)

    def sparsefinder_modules(self) -> dict[int, torch.nn.Module]:
        """Decoder self-attention modules that carry a predictor (what ``hf_sparse.sparsefinder_fit.fit`` fits)."""
        layers = self.get_decoder().layers
        return {i: layer.self_attn for i, layer in enumerate(layers) if hasattr(layer.self_attn, "sparsefinder")}


class EntmaxSparsefinderMarianModel(_EntmaxSparsefinderMarian, MarianModel):
    pass


class EntmaxSparsefinderMarianMTModel(_EntmaxSparsefinderMarian, MarianMTModel):
    pass


register_family(
    _EntmaxSparsefinderMarian,
    __name__,
    {EntmaxSparsefinderMarianModel: "AutoModel", EntmaxSparsefinderMarianMTModel: "AutoModelForSeq2SeqLM"},
)

__all__ = ["EntmaxSparsefinderMarianModel", "EntmaxSparsefinderMarianMTModel"]
