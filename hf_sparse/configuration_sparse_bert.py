"""``SparseBertConfig``: every ``BertConfig`` field plus where attention may look and how it normalises.

A stock BERT ``config.json`` loads into it unchanged (the new fields take their dense defaults), so any BERT
checkpoint becomes a SparseBERT checkpoint by choosing ``attention_pattern`` at load time.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import BertConfig

from .attention import ATTENTION_FUNCTIONS, BACKENDS, ReturnsAttentionsAnyway, check_choice, check_entmax_alpha
from .dam import resolve_config
from .patterns import parse
from .sparsefinder import check_model_settings


@strict
class SparseBertConfig(ReturnsAttentionsAnyway, BertConfig):
    r"""
    attention_pattern (`str`, defaults to `"dense"`):
        Pattern spec applied in every self-attention layer together with the padding mask, e.g.
        `"window:64+global:1"`, `"bigbird:3,1,2"`, `"no_diagonal"`, `"learned"`; see `hf_sparse.patterns.describe()`.
    attention_fn (`str`, defaults to `"softmax"`):
        Normaliser of the attention scores: `softmax`, `entmax15`, `entmax_bisect` (uses `entmax_alpha`), `sparsemax`.
    entmax_alpha (`float`, defaults to 1.5):
        α of `entmax_bisect`.
    attention_backend (`str`, defaults to `"auto"`):
        Kernel: `eager` (reference, returns probabilities), `sdpa` (dense softmax), `flex` (block-sparse
        FlexAttention, softmax), `tiles` (block-sparse by gathering the pattern's tiles, every normaliser, no
        compiler), `fused` (the entmax family in fused Triton kernels: exact, skips empty tiles; CUDA), or `auto`
        (fused for the entmax family on CUDA, eager instead in full-precision float32 from 2048 tokens while it
        fits and the pattern is dense enough, where cuBLAS is faster; otherwise by length and block density, the
        crossover measured in `benchmarks/attention_backends.md`; eager when probabilities are asked for). After a
        forward, `model.attention_backends_used()` says which kernel each layer ran.
        This replaces Transformers' `attn_implementation`, which has no notion of a sparsity pattern.
    dam (`dict`, *optional*):
        Differentiable Attention Mask settings (SparseBERT's DAM), see `hf_sparse.dam.DAM_DEFAULTS`: `structure`
        (`offset` | `element` | `block`), `block_size`, `max_length`, `share_across_layers`, `symmetric`,
        `init_logit`, `temperature`, `penalty` (λ), `penalty_reduction` (`mean` | `sum`), `mask_value` (c), `frozen`.
        With a dam config, the mask is searched inside `attention_pattern`; `freeze_dam()` ends the search.
    sparsefinder (`dict`, *optional*):
        Sparsefinder predictor settings (see `hf_sparse.sparsefinder.SPARSEFINDER_DEFAULTS`); needs an entmax-family
        `attention_fn`. `combine` says how predictions meet `attention_pattern`: `intersection` or `union`.
    """

    model_type = "sparse_bert"
    # the DAM search's outputs are training signals, not predictions: Trainer.evaluate/predict leave them out, so
    # compute_metrics gets the logits alone, as with a model without DAM
    keys_to_ignore_at_inference = ["dam_penalty", "dam_density"]

    attention_pattern: str = "dense"
    attention_fn: str = "softmax"
    entmax_alpha: float | int = 1.5
    attention_backend: str = "auto"
    dam: dict | None = None
    sparsefinder: dict | None = None

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        """A stock ``bert`` config.json is ours to read (same fields): said so here, so that Transformers does not
        warn that its model type is "not supported"."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == "bert":
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    def __post_init__(self, **kwargs):
        # A stock BERT config.json carries "model_type": "bert"; keeping it would make AutoConfig map our
        # saved checkpoints back to BertConfig.
        source = kwargs.pop("model_type", None)
        if source not in (None, "bert", self.model_type):
            raise ValueError(
                f"this config is of model_type {source!r}: SparseBERT loads BERT checkpoints (model_type 'bert' or "
                f"{self.model_type!r}), whose weight names it shares"
            )
        super().__post_init__(**kwargs)
        self.check_sparse_attention()

    def check_sparse_attention(self) -> None:
        """Fail at configuration time with a ``ValueError`` that names the bad value."""
        pattern = parse(self.attention_pattern)
        if getattr(self, "is_decoder", False) or getattr(self, "add_cross_attention", False):
            raise ValueError(
                f"is_decoder={getattr(self, 'is_decoder', False)}, add_cross_attention="
                f"{getattr(self, 'add_cross_attention', False)}: SparseBERT is an encoder (no cross-attention); for "
                "causal self-attention set attention_pattern='causal' (it combines with the other patterns)"
            )
        if self.dam is not None:
            resolve_config(self.dam, self.num_hidden_layers, self.max_position_embeddings)
        if self.sparsefinder is not None:
            check_model_settings(self.sparsefinder, self.num_hidden_layers, self.attention_fn, "attention_fn")
        if pattern.needs_learned_mask and not (self.dam or {}).get("frozen"):
            raise ValueError(
                f"attention_pattern {self.attention_pattern!r} uses 'learned', which needs a frozen DAM mask, but "
                f"dam={self.dam!r}: search a mask with a `dam` config (and DAMCallback), call model.freeze_dam(), "
                "or load a checkpoint saved after freezing"
            )
        check_choice("attention_fn", self.attention_fn, ATTENTION_FUNCTIONS)
        check_choice("attention_backend", self.attention_backend, BACKENDS)
        check_entmax_alpha(self.entmax_alpha, used=self.attention_fn == "entmax_bisect")

    def validate_sparse_attention(self):
        """Part of `@strict` validation (run again by ``save_pretrained`` after attribute changes)."""
        self.check_sparse_attention()


SparseBertConfig.register_for_auto_class()

__all__ = ["SparseBertConfig"]
