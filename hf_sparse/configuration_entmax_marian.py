"""``EntmaxSparsefinderMarianConfig``: every ``MarianConfig`` field plus the normaliser of each attention type
and the Sparsefinder settings of the decoder self-attention.

A stock Marian ``config.json`` loads into it unchanged; the defaults give α-entmax (α = 1.5) decoder
self-attention and softmax elsewhere, the setting of Sparsefinder's MT experiments.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import MarianConfig

from .attention import ATTENTION_FUNCTIONS, ReturnsAttentionsAnyway, check_choice, check_entmax_alpha
from .sparsefinder import check_model_settings

FUNCTION_FIELDS = ("encoder_attention_fn", "decoder_attention_fn", "cross_attention_fn")
# Kernels the Marian attention function runs: one dense mask per call from Transformers (padding, causality,
# KV cache), no pattern, so no block-sparse kernel ('flex', 'tiles') applies.
BACKENDS = ("auto", "eager", "sdpa", "fused")


@strict
class EntmaxSparsefinderMarianConfig(ReturnsAttentionsAnyway, MarianConfig):
    r"""
    decoder_attention_fn (`str`, defaults to `"entmax15"`):
        Normaliser of the decoder self-attention: `softmax`, `entmax15`, `entmax_bisect` (uses `entmax_alpha`),
        `sparsemax`.
    encoder_attention_fn (`str`, defaults to `"softmax"`):
        Normaliser of the encoder self-attention.
    cross_attention_fn (`str`, defaults to `"softmax"`):
        Normaliser of the decoder's attention over the encoder.
    entmax_alpha (`float`, defaults to 1.5):
        α of `entmax_bisect`.
    attention_backend (`str`, defaults to `"auto"`):
        Kernel of every attention type: `auto` (on CUDA the fused Triton kernel for the entmax family, or eager in
        full-precision float32 from 2048 keys while it fits, and SDPA for softmax; on the CPU eager entmax (exact
        top-k) and SDPA; eager wherever probabilities are asked for),
        `eager` (reference, returns probabilities), `fused` (every normaliser must be of the entmax family) or
        `sdpa` (every normaliser must be `softmax`). Predicted-sparse Sparsefinder decoding runs its own kernel.
        This replaces Transformers' `attn_implementation`, which has no notion of entmax.
    sparsefinder (`dict`, *optional*):
        Sparsefinder predictor settings for the decoder self-attention (see `hf_sparse.sparsefinder`).
    """

    model_type = "entmax_sparsefinder_marian"

    decoder_attention_fn: str = "entmax15"
    encoder_attention_fn: str = "softmax"
    cross_attention_fn: str = "softmax"
    entmax_alpha: float | int = 1.5
    attention_backend: str = "auto"
    sparsefinder: dict | None = None

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        """A stock ``marian`` config.json is ours to read (same fields): said so here, so that Transformers does not
        warn that its model type is "not supported"."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == "marian":
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    def __post_init__(self, **kwargs):
        source = kwargs.pop("model_type", None)  # a stock Marian config.json says "marian"
        if source not in (None, "marian", self.model_type):
            raise ValueError(
                f"this config is of model_type {source!r}: the entmax Marian loads Marian checkpoints (model_type "
                f"'marian' or {self.model_type!r}), whose weight names it shares"
            )
        super().__post_init__(**kwargs)
        self.check_attention()

    def check_attention(self) -> None:
        """Fail at configuration time with a ``ValueError`` that names the bad value."""
        for name in FUNCTION_FIELDS:
            check_choice(name, getattr(self, name), ATTENTION_FUNCTIONS)
        functions = {name: getattr(self, name) for name in FUNCTION_FIELDS}
        check_entmax_alpha(self.entmax_alpha, used="entmax_bisect" in functions.values())
        check_choice("attention_backend", self.attention_backend, BACKENDS)
        # An explicit kernel serves every attention type, so it must fit every normaliser (never substituted)
        misfits = {
            "fused": {name: fn for name, fn in functions.items() if fn == "softmax"},
            "sdpa": {name: fn for name, fn in functions.items() if fn != "softmax"},
        }.get(self.attention_backend)
        if misfits:
            runs = "the entmax family" if self.attention_backend == "fused" else "softmax"
            raise ValueError(
                f"attention_backend={self.attention_backend!r} runs {runs} only, but "
                + ", ".join(f"{name}={fn!r}" for name, fn in misfits.items())
                + ": use 'auto' (per attention type: fused entmax on CUDA, SDPA for softmax) or 'eager'"
            )
        if self.sparsefinder is not None:
            check_model_settings(
                self.sparsefinder, self.decoder_layers, self.decoder_attention_fn, "decoder_attention_fn"
            )

    def validate_entmax_attention(self):
        """Part of `@strict` validation (run again by ``save_pretrained`` after attribute changes)."""
        self.check_attention()


EntmaxSparsefinderMarianConfig.register_for_auto_class()

__all__ = ["EntmaxSparsefinderMarianConfig"]
