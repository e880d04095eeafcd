"""SparseBERT: BERT whose self-attention only looks where a pattern allows.

The modules mirror Transformers' ``modeling_bert.py`` name for name (``bert.encoder.layer.0.attention.self.query``
...), so every BERT checkpoint loads with no missing or unexpected keys. The only behavioural difference is in
:class:`SparseBertSelfAttention`, which hands the pattern ∩ padding mask to :func:`hf_sparse.attention.attend`.
With ``attention_pattern="dense"`` and ``attention_fn="softmax"`` the outputs equal ``BertModel``'s.

This file is copied next to a saved checkpoint (remote code): it imports only torch, transformers' public
API and its sibling modules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import AttentionInterface, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from .attention import (
    AttentionMask,
    attention_backends_used,
    build_mask,
    check_batch,
    check_entmax_alpha,
    choose_backend,
    compute_dtype,
    eager_for_output_attentions,
)
from .block_maps import cached_dense_mask
from .configuration_sparse_bert import SparseBertConfig
from .dam import DAMGates, check_loaded_dam
from .loading import UNUSED_PRETRAINING, ReportsNewWeights, register_family
from .patterns import Intersection, Learned, Pattern, Union, bind_learned, parse, without_learned
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

_PARSED: dict[str, Pattern] = {}
logger = logging.getLogger(__name__)
#: what ``config._attn_implementation`` holds: Transformers' name for "this model's own attention". SparseBERT
#: computes attention with the kernel ``config.attention_backend`` picks; a name of its own (registered, never
#: called) tells a user's ``attn_implementation="eager"`` from a config that an earlier model left holding
#: Transformers' default, which would otherwise look the same
ATTENTION_NAME = "hf_sparse_bert"
# what a user asking Transformers for an implementation means, in attention_backend's terms
_BACKEND_FOR = {"eager": "eager", "sdpa": "sdpa", "flex_attention": "flex"}


def _never_called(*args, **kwargs):
    raise RuntimeError(f"{ATTENTION_NAME!r} names SparseBERT's own attention, which config.attention_backend picks")


AttentionInterface.register(ATTENTION_NAME, _never_called)


def _requested(attn_implementation):
    """The implementation asked of the model itself: a dict names it under ``""`` (its sub-models under theirs)."""
    return attn_implementation.get("") if isinstance(attn_implementation, dict) else attn_implementation


def _parsed(spec: str) -> Pattern:
    """Parse once per spec string; a plain dict, which torch.compile traces through."""
    if spec not in _PARSED:
        _PARSED[spec] = parse(spec)
    return _PARSED[spec]


# Outputs: Transformers' dataclasses plus the DAM search's penalty (the un-weighted ‖M‖ term that the loss adds
# times λ in training) and mask density (kept fraction of valid pairs), so Trainer callbacks can log them.
@dataclass
class SparseBertModelOutput(BaseModelOutputWithPoolingAndCrossAttentions):
    dam_penalty: torch.FloatTensor | None = None
    dam_density: torch.FloatTensor | None = None


@dataclass
class SparseBertMaskedLMOutput(MaskedLMOutput):
    dam_penalty: torch.FloatTensor | None = None
    dam_density: torch.FloatTensor | None = None


@dataclass
class SparseBertSequenceClassifierOutput(SequenceClassifierOutput):
    dam_penalty: torch.FloatTensor | None = None
    dam_density: torch.FloatTensor | None = None


@dataclass
class SparseBertMultipleChoiceModelOutput(MultipleChoiceModelOutput):
    dam_penalty: torch.FloatTensor | None = None
    dam_density: torch.FloatTensor | None = None


@dataclass
class SparseBertTokenClassifierOutput(TokenClassifierOutput):
    dam_penalty: torch.FloatTensor | None = None
    dam_density: torch.FloatTensor | None = None


@dataclass
class SparseBertQuestionAnsweringModelOutput(QuestionAnsweringModelOutput):
    dam_penalty: torch.FloatTensor | None = None
    dam_density: torch.FloatTensor | None = None


class SparseBertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, as in BERT, refusing sequences longer than the positions."""

    def __init__(self, config: SparseBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.position_ids = nn.Buffer(torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False)
        self.token_type_ids = nn.Buffer(torch.zeros(self.position_ids.size(), dtype=torch.long), persistent=False)

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None) -> torch.Tensor:
        input_shape = input_ids.size() if input_ids is not None else inputs_embeds.size()[:-1]
        batch_size, seq_length = input_shape
        max_positions = self.position_embeddings.num_embeddings
        if position_ids is None:
            if seq_length > max_positions:
                raise ValueError(
                    f"sequence length {seq_length} is longer than max_position_embeddings={max_positions}; "
                    f"truncate the inputs (e.g. tokenizer(..., truncation=True, max_length={max_positions}))"
                )
            position_ids = self.position_ids[:, :seq_length]
        if token_type_ids is None:
            token_type_ids = self.token_type_ids[:, :seq_length].expand(batch_size, seq_length)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        embeddings = inputs_embeds + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class SparseBertSelfAttention(nn.Module):
    def __init__(self, config: SparseBertConfig, layer_idx: int | None = None):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({config.hidden_size}) is not a multiple of num_attention_heads "
                f"({config.num_attention_heads})"
            )
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = self.attention_head_size**-0.5
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.layer_idx = layer_idx
        settings = None if config.sparsefinder is None else resolve_config(config.sparsefinder)
        if settings is not None and predicts_layer(settings, layer_idx or 0):
            self.sparsefinder = SparsefinderLayer(settings, self.num_attention_heads, self.attention_head_size)
        self.sparsefinder_collector = None  # set while Sparsefinder collects this layer's attention

    def forward(self, hidden_states: torch.Tensor, mask: AttentionMask, output_attentions: bool = False):
        hidden_shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query = self.query(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.key(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.value(hidden_states).view(hidden_shape).transpose(1, 2)
        out, probs = attend_layer(
            self,
            query,
            key,
            value,
            mask,
            where=f"layer {self.layer_idx}",
            scaling=self.scaling,
            attention_fn=self.config.attention_fn,
            alpha=self.config.entmax_alpha,
            dropout=self.dropout.p if self.training else 0.0,
            output_attentions=output_attentions,
            valid_queries=mask.valid_tokens,
        )
        return out.reshape(*hidden_states.shape[:-1], -1), probs


class SparseBertSelfOutput(nn.Module):
    def __init__(self, config: SparseBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class SparseBertAttention(nn.Module):
    def __init__(self, config: SparseBertConfig, layer_idx: int | None = None):
        super().__init__()
        self.self = SparseBertSelfAttention(config, layer_idx=layer_idx)
        self.output = SparseBertSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor, mask: AttentionMask, output_attentions: bool = False):
        attention_output, probs = self.self(hidden_states, mask, output_attentions)
        return self.output(attention_output, hidden_states), probs


class SparseBertIntermediate(nn.Module):
    def __init__(self, config: SparseBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = (
            ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class SparseBertOutput(SparseBertSelfOutput):
    def __init__(self, config: SparseBertConfig):
        super().__init__(config)
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class SparseBertLayer(GradientCheckpointingLayer):
    """One encoder layer; Transformers' ``gradient_checkpointing_enable()`` checkpoints it like its own layers."""

    def __init__(self, config: SparseBertConfig, layer_idx: int | None = None):
        super().__init__()
        self.attention = SparseBertAttention(config, layer_idx=layer_idx)
        self.intermediate = SparseBertIntermediate(config)
        self.output = SparseBertOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: AttentionMask,
        bias: torch.Tensor | None = None,
        output_attentions: bool = False,
    ):
        """``bias`` is ``mask.bias`` (the DAM search's −c·(1−M)) passed as a positional tensor of its own: reentrant
        checkpointing differentiates only those, and the gates learn through it."""
        if bias is not None:
            mask = replace(mask, bias=bias)
        attention_output, probs = self.attention(hidden_states, mask, output_attentions)
        return self.output(self.intermediate(attention_output), attention_output), probs


class SparseBertEncoder(nn.Module):
    def __init__(self, config: SparseBertConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([SparseBertLayer(config, layer_idx=i) for i in range(config.num_hidden_layers)])

    def forward(self, hidden_states, masks: list[AttentionMask], output_attentions=False, output_hidden_states=False):
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer, mask in zip(self.layer, masks):
            hidden_states, probs = layer(hidden_states, mask, mask.bias, output_attentions)  # all positional
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        return hidden_states, all_hidden_states, all_attentions


class SparseBertPooler(nn.Module):
    def __init__(self, config: SparseBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


class SparseBertPredictionHeadTransform(nn.Module):
    def __init__(self, config: SparseBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act] if isinstance(config.hidden_act, str) else config.hidden_act
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class SparseBertLMPredictionHead(nn.Module):
    def __init__(self, config: SparseBertConfig):
        super().__init__()
        self.transform = SparseBertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


class SparseBertOnlyMLMHead(nn.Module):
    def __init__(self, config: SparseBertConfig):
        super().__init__()
        self.predictions = SparseBertLMPredictionHead(config)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        return self.predictions(sequence_output)


class SparseBertPreTrainedModel(ReportsNewWeights, PreTrainedModel):
    config_class = SparseBertConfig
    base_model_prefix = "bert"  # same as BERT: checkpoints with and without heads load into each other
    supports_gradient_checkpointing = True
    _no_split_modules = ["SparseBertEmbeddings", "SparseBertLayer"]
    _keys_to_ignore_on_load_unexpected = list(UNUSED_PRETRAINING)

    def __init__(self, config, *args, **kwargs):
        """Takes a stock ``BertConfig`` too (``AutoConfig.from_pretrained(bert, num_labels=3)`` passed on as
        ``config=``): the same fields, converted, with a dense pattern."""
        # by model_type, not class: remote code may hold the config class of another copy of this module
        model_type = getattr(config, "model_type", None)
        if model_type == "bert":
            config = SparseBertConfig.from_dict(config.to_dict())
            config._attn_implementation_internal = None  # a stock model's choice, not a request to this one
        elif model_type != SparseBertConfig.model_type:
            raise ValueError(
                f"{type(self).__name__} takes a SparseBertConfig or a stock BertConfig, got a {type(config).__name__} "
                f"(model_type {model_type!r})"
            )
        super().__init__(config, *args, **kwargs)

    @classmethod
    def check_loaded_state(cls, model, missing_keys: set[str], unexpected_keys) -> None:
        """A frozen DAM mask or fitted predictors the checkpoint lost: refused (they would run fresh and
        meaningless, which Transformers only reports)."""
        check_loaded_dam(model, missing_keys)
        check_loaded_predictors(model, missing_keys, unexpected_keys)

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """Refused: Transformers' attention implementations know no sparsity pattern; ``attention_backend`` in the
        config chooses the kernel (eager, sdpa, flex, tiles, fused, auto)."""
        self._refuse_attn_implementation(attn_implementation)

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        """``from_pretrained(..., attn_implementation="eager")`` (or a config asking for one): refused as
        :meth:`set_attn_implementation` refuses it. It was accepted and ignored ("eager"), or refused by Transformers
        as unsupported ("sdpa", "flex_attention"), which this model is not: ``attention_backend`` runs both."""
        requested = _requested(attn_implementation)
        if requested not in (None, ATTENTION_NAME) and not eager_for_output_attentions(self.config, requested):
            self._refuse_attn_implementation(requested)
        return ATTENTION_NAME

    @classmethod
    def from_pretrained(cls, *args, attn_implementation=None, **kwargs):
        """An explicit ``attn_implementation`` is refused here, where it is told apart from the "eager" that
        Transformers' config sets by itself for ``output_attentions=True`` (which the attentions need no help
        for: ``attention_backend`` runs eager wherever the probabilities are asked for)."""
        requested = _requested(attn_implementation)
        if requested not in (None, ATTENTION_NAME):
            cls._refuse_attn_implementation(requested)
        return super().from_pretrained(*args, **kwargs)

    @classmethod
    def _refuse_attn_implementation(cls, requested) -> None:
        backend = _BACKEND_FOR.get(requested)
        instead = (
            f"give attention_backend={backend!r} instead (a config field, which from_pretrained takes too)"
            if backend
            else "set config.attention_backend instead"
        )
        raise ValueError(
            f"{cls.__name__} does not use Transformers' attn_implementation (asked: {requested!r}): it "
            "computes attention with the kernel config.attention_backend picks ('auto', 'eager', 'sdpa', 'flex', "
            f"'tiles', 'fused'); {instead}"
        )

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, SparseBertLMPredictionHead):
            init.zeros_(module.bias)
        elif isinstance(module, SparseBertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)
        elif isinstance(module, DAMGates):
            init.copy_(module.logits, module.initial_logits())
            init.zeros_(module.frozen_mask)
            init.zeros_(module.is_frozen)
        initialize_predictor(module)

    def attention_backends_used(self) -> dict[str, str]:
        """The kernel each self-attention module ran in the latest forward, by module name, e.g.
        ``{"bert.encoder.layer.0.attention.self": "fused", ...}``: ``eager``, ``sdpa``, ``flex``, ``tiles``,
        ``fused``, ``sparsefinder`` (predicted pairs, gathered) or ``fused (predicted blocks)`` (predicted pairs on
        the fused kernel). Recorded as plain strings while dispatching, so asking costs no device sync;
        ``config.attention_backend`` says how the choice is made."""
        return attention_backends_used(self)

    def sparsefinder_modules(self) -> dict[int, nn.Module]:
        """Self-attention modules that carry a Sparsefinder predictor (what ``hf_sparse.sparsefinder_fit.fit`` fits)."""
        layers = self.base_model.encoder.layer
        return {
            i: layer.attention.self for i, layer in enumerate(layers) if hasattr(layer.attention.self, "sparsefinder")
        }

    def freeze_dam(self) -> str:
        """End the DAM search: store the binary mask (keep iff P(keep) > 0.5) and switch to the ``learned`` pattern.

        The fixed pattern the search ran inside is kept: ``window:64`` becomes ``window:64&learned``.
        Returns the new ``attention_pattern``; from now on the sparse kernels run the stored mask.
        """
        base = self.base_model
        if base.dam is None:
            raise ValueError("freeze_dam() needs a model built with a `dam` config; this one has dam=None")
        if self.config.dam.get("frozen"):
            raise ValueError("the DAM mask is already frozen (config.dam['frozen'] is True)")
        base.dam.freeze()
        pattern = parse(self.config.attention_pattern)
        if pattern.is_dense:
            spec = "learned"
        else:  # (A + B) & learned = A&learned + B&learned: the grammar has no parentheses
            parts = pattern.parts if type(pattern) is Union else (pattern,)
            spec = "+".join(f"{part}&learned" for part in parts)
        self.config.dam = {**self.config.dam, "frozen": True}
        self.config.attention_pattern = spec
        return spec

    def _add_dam_penalty(self, loss: torch.Tensor | None, outputs) -> torch.Tensor | None:
        """Training with a DAM search: task loss + λ·penalty (λ is scheduled by DAMCallback)."""
        base = self.base_model
        if loss is None or outputs.dam_penalty is None or not (self.training and base.dam_searching()):
            return loss
        return loss + base.dam.penalty_weight * outputs.dam_penalty


def _finish(output, return_dict: bool | None, config: SparseBertConfig):
    """The output as asked: ``return_dict`` if given, else the config's ``return_dict`` (as BERT does)."""
    wanted = getattr(config, "return_dict", True) if return_dict is None else return_dict
    return output if wanted else output.to_tuple()


class SparseBertModel(SparseBertPreTrainedModel):
    """The encoder. ``config.attention_pattern`` is read at every forward, so it can be changed on a loaded model."""

    def __init__(self, config: SparseBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        config = self.config  # (a stock BertConfig arrives converted)
        config.check_sparse_attention()  # from_pretrained(..., attention_pattern=...) sets fields after validation
        self.embeddings = SparseBertEmbeddings(config)
        self.encoder = SparseBertEncoder(config)
        self.pooler = SparseBertPooler(config) if add_pooling_layer else None
        self.dam = (
            DAMGates(config.dam, config.num_attention_heads, config.num_hidden_layers, config.max_position_embeddings)
            if config.dam is not None
            else None
        )
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def dam_searching(self) -> bool:
        """True while DAM gates exist and have not been frozen."""
        return self.dam is not None and not self.config.dam.get("frozen", False)

    def layer_patterns(self, n: int, device: torch.device) -> list[Pattern]:
        """The pattern of each layer at length ``n`` (the same object for layers that share it).

        No DAM: the config's pattern. Frozen DAM: ``learned`` bound to the stored mask (unpacked once; its masks
        are cached). DAM search in eval mode: the config's pattern ∩ the deterministic DAM mask (keep iff
        P(keep) > 0.5), which changes every step and is not cached.
        """
        base = _parsed(self.config.attention_pattern)
        layers = self.config.num_hidden_layers
        if self.dam is None:
            return [bind_learned(base, None) if base.needs_learned_mask else base] * layers
        if self.dam_searching():
            masks = self.dam.deterministic_mask(n).to(device)
            per_group = [Intersection((base, Learned(m, cache=False))) for m in masks]
        else:
            if n > self.dam.max_length:
                raise ValueError(
                    f"sequence length {n} is longer than the DAM gates cover (dam max_length={self.dam.max_length})"
                )
            masks = self.dam.frozen_masks().to(device)  # (G, H, max_length, max_length), the same tensor each call
            per_group = [bind_learned(base, m) for m in masks]
        return [per_group[self.dam.group_of_layer(i)] for i in range(layers)]

    def dam_penalty_and_density(
        self, gates: torch.Tensor, key_valid: torch.Tensor | None, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Penalty and density of a ``(G, H, n, n)`` mask within the config's pattern, over this batch.

        Density: the kept fraction of the valid (non-padding) pairs, pattern ∩ mask, as :meth:`dam_density`
        defines it. Penalty ``mean``: the mask's mean over the valid pairs inside the pattern (what the gates
        decide; comparable across lengths and batches); ``sum``: the reference's unnormalised L1 over the whole
        ``(H, n, n)`` mask of every gate group (inside the pattern, padding included).
        """
        inside = cached_dense_mask(_parsed(self.config.attention_pattern), n, gates.device).float()  # (1, n, n)
        valid_pairs = torch.ones((), device=gates.device) * n * n
        allowed = inside
        if key_valid is not None:
            valid = key_valid.float()
            pairs = torch.einsum("bi,bj->ij", valid, valid)  # pairs counted over the batch
            allowed, valid_pairs = inside * pairs, pairs.sum()
        kept = (gates * allowed).sum()
        groups_heads = gates.shape[0] * gates.shape[1]
        mean = kept / (allowed.sum() * groups_heads).clamp_min(1.0)
        penalty = mean if self.dam.settings["penalty_reduction"] == "mean" else (gates * inside).sum()
        return penalty, (kept / (valid_pairs * groups_heads).clamp_min(1.0)).detach()

    @torch.no_grad()
    def dam_density(self, n: int | None = None, inside_pattern: bool = False) -> torch.Tensor:
        """What the model keeps under DAM, per (gate group, head): the kept fraction of all ``n x n`` pairs under
        the config's pattern ∩ the DAM mask (the deterministic mask while searching, the stored one once frozen).

        DAM sparsity is ``1 - dam_density()`` wherever it is reported or targeted (``DAMCallback``'s logs and
        ``target_sparsity``, ``hf-sparse dam``, model cards); it counts the pairs the pattern drops as well.
        ``inside_pattern=True``: the kept fraction of the pattern's own pairs instead, what the gates decide.
        """
        if self.dam is None:
            raise ValueError("dam_density() needs a model built with a `dam` config; this one has dam=None")
        n = n or self.dam.max_length
        mask = self.dam.deterministic_mask(n) if self.dam_searching() else self.dam.frozen(n)
        pattern = without_learned(_parsed(self.config.attention_pattern))
        inside = cached_dense_mask(pattern, n, mask.device)
        kept = (mask & inside).sum(dim=(-1, -2)).double()
        total = inside.sum(dim=(-1, -2)).double().clamp_min(1.0) if inside_pattern else torch.tensor(n * n)
        return (kept / total).float()

    @torch.compiler.disable  # cache lookups and mask building: plain Python, kept out of compiled graphs
    def attention_masks_for(
        self,
        attention_mask: torch.Tensor | None,
        batch: int,
        n: int,
        device: torch.device,
        output_attentions: bool,
        needs_grad: bool,
    ) -> tuple[list[AttentionMask], torch.Tensor | None, torch.Tensor | None]:
        """Pattern ∩ padding (∩ DAM) per layer, in the form the chosen kernel needs, plus the DAM penalty/density.

        Built once per forward; layers that share a pattern share the mask object.
        """
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask must have shape (batch, sequence) with 1 for tokens and 0 for padding; got shape "
                f"{tuple(attention_mask.shape)}. Attention patterns are set with config.attention_pattern."
            )
        check_batch("input", (batch, n), attention_mask)
        # set on a live config after construction, like the pattern and backend, which are checked where used
        check_entmax_alpha(self.config.entmax_alpha, used=self.config.attention_fn == "entmax_bisect")
        attentions = [layer.attention.self for layer in self.encoder.layer]
        check_predictors_built(self.config.sparsefinder, attentions, "layers", "SparseBertForMaskedLM")
        key_valid = attention_mask.bool() if attention_mask is not None else None
        collecting = any(layer.attention.self.sparsefinder_collector is not None for layer in self.encoder.layer)
        choose = dict(
            n=n,
            device=device,
            attention_fn=self.config.attention_fn,
            output_attentions=output_attentions or collecting,  # Sparsefinder's collector reads the probabilities
            needs_grad=needs_grad,
            dropout=self.config.attention_probs_dropout_prob if self.training else 0.0,
            dtype=compute_dtype(device, self.dtype),
            pairs=batch * self.config.num_attention_heads * n * n,
            predicted=any(runs_predicted(layer.attention.self) for layer in self.encoder.layer),
        )
        if self.dam_searching() and self.training:
            # The search: a fresh straight-through sample, entering the scores as -c·(1-M) next to the padding.
            base = _parsed(self.config.attention_pattern)
            backend = choose_backend(self.config.attention_backend, pattern=base, soft_mask=True, **choose)
            keep = build_mask(base, key_valid, n, device, backend).keep
            gates = self.dam.sample(n)
            c = self.dam.settings["mask_value"]
            per_group = [AttentionMask(backend, keep=keep, bias=(-c * (1.0 - g))[None]) for g in gates]
            masks = [per_group[self.dam.group_of_layer(i)] for i in range(self.config.num_hidden_layers)]
            return masks, *self.dam_penalty_and_density(gates, key_valid, n)

        built: dict[int, AttentionMask] = {}
        masks = []
        for pattern in self.layer_patterns(n, device):
            if id(pattern) not in built:
                per_row = key_valid is not None and pattern.has_random
                backend = choose_backend(self.config.attention_backend, pattern=pattern, per_row=per_row, **choose)
                built[id(pattern)] = build_mask(pattern, key_valid, n, device, backend)
            masks.append(built[id(pattern)])
        if self.dam_searching():  # evaluation during the search: report the deterministic mask
            with torch.no_grad():
                return masks, *self.dam_penalty_and_density(self.dam.deterministic_mask(n).float(), key_valid, n)
        return masks, None, None

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SparseBertModelOutput | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        check_batch(name, tuple((input_ids if input_ids is not None else inputs_embeds).shape), None)
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        embedding_output = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        needs_grad = torch.is_grad_enabled() and (self.training or embedding_output.requires_grad)
        masks, dam_penalty, dam_density = self.attention_masks_for(
            attention_mask, *embedding_output.shape[:2], embedding_output.device, output_attentions, needs_grad
        )
        sequence_output, hidden_states, attentions = self.encoder(
            embedding_output, masks, output_attentions, output_hidden_states
        )
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        output = SparseBertModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=hidden_states,
            attentions=attentions,
            dam_penalty=dam_penalty,
            dam_density=dam_density,
        )
        return _finish(output, return_dict, self.config)


class SparseBertForMaskedLM(SparseBertPreTrainedModel):
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: SparseBertConfig):
        super().__init__(config)
        config = self.config  # (a stock BertConfig arrives converted)
        self.bert = SparseBertModel(config, add_pooling_layer=False)
        self.cls = SparseBertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ) -> SparseBertMaskedLMOutput | tuple:
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.cls(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, self.config.vocab_size), labels.view(-1))
        output = SparseBertMaskedLMOutput(
            loss=self._add_dam_penalty(loss, outputs),
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            dam_penalty=outputs.dam_penalty,
            dam_density=outputs.dam_density,
        )
        return _finish(output, return_dict, self.config)


def _classification_loss(config, logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """BERT's rule: regression for one label, single-label for integer labels, multi-label otherwise."""
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return MSELoss()(logits.squeeze(), labels.squeeze()) if num_labels == 1 else MSELoss()(logits, labels)
    if config.problem_type == "single_label_classification":
        return CrossEntropyLoss()(logits.view(-1, num_labels), labels.view(-1))
    return BCEWithLogitsLoss()(logits, labels)


def _dropout_p(config: SparseBertConfig) -> float:
    return config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob


class SparseBertForSequenceClassification(SparseBertPreTrainedModel):
    def __init__(self, config: SparseBertConfig):
        super().__init__(config)
        config = self.config  # (a stock BertConfig arrives converted)
        self.num_labels = config.num_labels
        self.bert = SparseBertModel(config)
        self.dropout = nn.Dropout(_dropout_p(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ) -> SparseBertSequenceClassifierOutput | tuple:
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output))
        loss = _classification_loss(self.config, logits, labels, self.num_labels) if labels is not None else None
        output = SparseBertSequenceClassifierOutput(
            loss=self._add_dam_penalty(loss, outputs),
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            dam_penalty=outputs.dam_penalty,
            dam_density=outputs.dam_density,
        )
        return _finish(output, return_dict, self.config)


class SparseBertForMultipleChoice(SparseBertPreTrainedModel):
    def __init__(self, config: SparseBertConfig):
        super().__init__(config)
        config = self.config  # (a stock BertConfig arrives converted)
        self.bert = SparseBertModel(config)
        self.dropout = nn.Dropout(_dropout_p(config))
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ) -> SparseBertMultipleChoiceModelOutput | tuple:
        num_choices = input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1]

        def flat(x):
            return None if x is None else x.reshape(-1, *x.shape[2:])

        outputs = self.bert(
            flat(input_ids),
            attention_mask=flat(attention_mask),
            token_type_ids=flat(token_type_ids),
            position_ids=flat(position_ids),
            inputs_embeds=flat(inputs_embeds),
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.pooler_output)).view(-1, num_choices)
        loss = CrossEntropyLoss()(logits, labels) if labels is not None else None
        output = SparseBertMultipleChoiceModelOutput(
            loss=self._add_dam_penalty(loss, outputs),
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            dam_penalty=outputs.dam_penalty,
            dam_density=outputs.dam_density,
        )
        return _finish(output, return_dict, self.config)


class SparseBertForTokenClassification(SparseBertPreTrainedModel):
    def __init__(self, config: SparseBertConfig):
        super().__init__(config)
        config = self.config  # (a stock BertConfig arrives converted)
        self.num_labels = config.num_labels
        self.bert = SparseBertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(_dropout_p(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ) -> SparseBertTokenClassifierOutput | tuple:
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
        output = SparseBertTokenClassifierOutput(
            loss=self._add_dam_penalty(loss, outputs),
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            dam_penalty=outputs.dam_penalty,
            dam_density=outputs.dam_density,
        )
        return _finish(output, return_dict, self.config)


class SparseBertForQuestionAnswering(SparseBertPreTrainedModel):
    def __init__(self, config: SparseBertConfig):
        super().__init__(config)
        config = self.config  # (a stock BertConfig arrives converted)
        self.num_labels = config.num_labels
        self.bert = SparseBertModel(config, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ) -> SparseBertQuestionAnsweringModelOutput | tuple:
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).split(1, dim=-1)
        start_logits = start_logits.squeeze(-1).contiguous()
        end_logits = end_logits.squeeze(-1).contiguous()
        total_loss = None
        if start_positions is not None and end_positions is not None:
            # positions outside the sequence are ignored, as in BERT
            ignored_index = start_logits.size(1)
            start_positions = start_positions.view(-1).clamp(0, ignored_index)
            end_positions = end_positions.view(-1).clamp(0, ignored_index)
            loss_fct = CrossEntropyLoss(ignore_index=ignored_index)
            total_loss = (loss_fct(start_logits, start_positions) + loss_fct(end_logits, end_positions)) / 2
        output = SparseBertQuestionAnsweringModelOutput(
            loss=self._add_dam_penalty(total_loss, outputs),
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            dam_penalty=outputs.dam_penalty,
            dam_density=outputs.dam_density,
        )
        return _finish(output, return_dict, self.config)


register_family(
    SparseBertPreTrainedModel,
    __name__,
    {
        SparseBertModel: "AutoModel",
        SparseBertForMaskedLM: "AutoModelForMaskedLM",
        SparseBertForSequenceClassification: "AutoModelForSequenceClassification",
        SparseBertForTokenClassification: "AutoModelForTokenClassification",
        SparseBertForQuestionAnswering: "AutoModelForQuestionAnswering",
        SparseBertForMultipleChoice: "AutoModelForMultipleChoice",
    },
)

__all__ = [
    "SparseBertModel",
    "SparseBertForMaskedLM",
    "SparseBertForSequenceClassification",
    "SparseBertForTokenClassification",
    "SparseBertForQuestionAnswering",
    "SparseBertForMultipleChoice",
    "SparseBertPreTrainedModel",
]
