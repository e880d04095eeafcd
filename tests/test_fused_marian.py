"""The entmax Marian on the fused Triton kernel (attention_backend="fused") against its eager reference.

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is first used, as
in tests/test_entmax_triton.py). The interpreter is slow: one layer each, two heads of 16, float64, and lengths
just past the interpreter's 16-key tiles so that padding, causality and the cache offset cross tile borders.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="the fused kernel needs triton (a dev dependency)")

from transformers import DynamicCache, EncoderDecoderCache  # noqa: E402

from hf_sparse import EntmaxSparsefinderMarianConfig, EntmaxSparsefinderMarianMTModel, entmax_triton  # noqa: E402
from test_modeling_entmax_marian import MARIAN, PAD  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# test_modeling_entmax_marian's tiny Marian, one layer and two heads each side (the interpreter is slow)
TINY = {**MARIAN, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2}
# Every attention type on an entmax-family normaliser, one of each kind of solver (closed forms, bisection)
ENTMAX = dict(encoder_attention_fn="entmax15", decoder_attention_fn="entmax_bisect", cross_attention_fn="sparsemax")
ATTENTION_MODULES = (
    "model.encoder.layers.0.self_attn",
    "model.decoder.layers.0.self_attn",
    "model.decoder.layers.0.encoder_attn",
)


def tiny_marian(**overrides) -> EntmaxSparsefinderMarianMTModel:
    torch.manual_seed(0)
    config = EntmaxSparsefinderMarianConfig(**{**TINY, **ENTMAX, "entmax_alpha": 1.3, **overrides})
    model = EntmaxSparsefinderMarianMTModel(config).double().to(DEVICE)
    with torch.no_grad():  # sharper scores: clearly sparse rows at random initialisation
        for name, param in model.named_parameters():
            if name.endswith("q_proj.weight"):
                param.mul_(6.0)
    return model


def ragged(batch: int, length: int, seed: int, pad_from: tuple[int, ...]):
    """Random ids, row r padded from position pad_from[r] on."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, MARIAN["vocab_size"], (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, start in enumerate(pad_from):
        mask[row, start:] = 0
    ids[mask == 0] = PAD
    return ids.to(DEVICE), mask.to(DEVICE)


def run_both(model, fn):
    """``fn(model)`` with the eager reference, then with the fused kernel."""
    results = {}
    for backend in ("eager", "fused"):
        model.config.attention_backend = backend
        results[backend] = fn(model)
    return results["eager"], results["fused"]


def test_fused_marian_equals_eager_logits_and_gradients_with_padding(monkeypatch):
    """Padding reaches the kernel as Marian's masks, element masks (a decoder's causal): each sequence's real keys
    up to its first padded one are read without the mask (the bounds taken at this tiny size too)."""
    monkeypatch.setattr(entmax_triton, "ELEMENT_MASK_KEYS_FROM_PAIRS", 0)
    model = tiny_marian().train()
    src, src_mask = ragged(2, 21, seed=0, pad_from=(21, 13))
    tgt, tgt_mask = ragged(2, 19, seed=1, pad_from=(19, 15))

    def forward_backward(model):
        model.zero_grad()
        out = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
        weights = torch.linspace(-1, 1, MARIAN["vocab_size"], dtype=out.logits.dtype, device=DEVICE)
        (out.logits * weights).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if "_proj" in name}
        return out.logits.detach(), grads, model.attention_backends_used()

    (eager, eager_grads, eager_used), (fused, fused_grads, fused_used) = run_both(model, forward_backward)
    assert eager_used == dict.fromkeys(ATTENTION_MODULES, "eager")
    assert fused_used == dict.fromkeys(ATTENTION_MODULES, "fused")
    torch.testing.assert_close(fused, eager, atol=1e-10, rtol=0)
    assert len(eager_grads) == 24 and all(g.abs().sum() > 0 for g in eager_grads.values())
    for name, grad in eager_grads.items():  # q, k, v, out of encoder, decoder and cross attention
        torch.testing.assert_close(fused_grads[name], grad, atol=1e-9, rtol=0, msg=name)


def test_fused_decoding_with_a_kv_cache_equals_eager(monkeypatch):
    """Queries that are the last Lq of Lk positions: a prefix of 14 decoder tokens cached, then 6 more at once
    (crossing the 16-key tile), then greedy generation one token at a time (the element masks' key bounds taken at
    this tiny size too)."""
    monkeypatch.setattr(entmax_triton, "ELEMENT_MASK_KEYS_FROM_PAIRS", 0)
    model = tiny_marian().eval()
    src, src_mask = ragged(2, 18, seed=2, pad_from=(18, 11))
    tgt, _ = ragged(2, 20, seed=3, pad_from=())

    def continued(model):
        with torch.no_grad():
            encoder = model.get_encoder()(input_ids=src, attention_mask=src_mask)
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            kw = dict(encoder_outputs=encoder, attention_mask=src_mask, cache=cache, use_cache=True)
            model(decoder_input_ids=tgt[:, :14], **kw)
            logits = model(decoder_input_ids=tgt[:, 14:], **kw).logits
            assert cache.get_seq_length() == 20
            return logits

    eager, fused = run_both(model, continued)
    torch.testing.assert_close(fused, eager, atol=1e-10, rtol=0)

    def greedy(model):
        out = model.generate(
            src,
            attention_mask=src_mask,
            max_new_tokens=5,
            do_sample=False,
            num_beams=1,
            output_scores=True,
            return_dict_in_generate=True,
        )
        return out.sequences, torch.stack(out.scores), model.attention_backends_used()

    (eager_tokens, eager_scores, eager_used), (fused_tokens, fused_scores, fused_used) = run_both(model, greedy)
    assert eager_tokens.shape[1] == 6 and torch.equal(fused_tokens, eager_tokens)
    torch.testing.assert_close(fused_scores, eager_scores, atol=1e-10, rtol=0)
    assert fused_used == dict.fromkeys(ATTENTION_MODULES, "fused")  # the last step, one query over the cache
    assert eager_used == dict.fromkeys(ATTENTION_MODULES, "eager")


def test_fused_request_returns_probabilities_only_through_eager_and_auto_keeps_the_cpu_paths():
    model = tiny_marian(
        decoder_attention_fn="entmax15", encoder_attention_fn="softmax", cross_attention_fn="softmax"
    ).eval()
    src, src_mask = ragged(2, 9, seed=4, pad_from=(9, 6))
    tgt, _ = ragged(2, 5, seed=5, pad_from=())
    with torch.no_grad():
        plain = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt)
        if DEVICE == "cpu":  # auto: exact eager entmax (top-k) on the CPU, SDPA for softmax
            assert model.attention_backends_used() == dict(zip(ATTENTION_MODULES, ("sdpa", "eager", "sdpa")))
        else:
            assert model.attention_backends_used() == dict(zip(ATTENTION_MODULES, ("sdpa", "fused", "sdpa")))
        probed = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, output_attentions=True)
    assert plain.decoder_attentions is None and plain.cross_attentions is None
    assert model.attention_backends_used() == dict.fromkeys(ATTENTION_MODULES, "eager")
    torch.testing.assert_close(probed.logits, plain.logits, atol=1e-10, rtol=0)
    (decoder_probs,) = probed.decoder_attentions
    assert decoder_probs.shape == (2, 2, 5, 5) and (decoder_probs == 0).any()  # entmax: exact zeros
    torch.testing.assert_close(decoder_probs.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64, device=DEVICE))
    assert not decoder_probs.triu(1).any()  # causal


def test_explicit_fused_on_cpu_without_the_interpreter_is_refused_with_the_reason(monkeypatch):
    model = tiny_marian(attention_backend="fused").cpu().eval()
    src, src_mask = (t.cpu() for t in ragged(1, 6, seed=6, pad_from=()))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="attention_backend='fused' is not possible here: .*TRITON_INTERPRET=1"):
        model(input_ids=src, attention_mask=src_mask, decoder_input_ids=src[:, :3])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="'fused' is not possible here: output_attentions=True needs the probab"):
        model(input_ids=src, attention_mask=src_mask, decoder_input_ids=src[:, :3], output_attentions=True)


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            dict(attention_backend="fused", cross_attention_fn="softmax"),
            "'fused' runs the entmax family only, but cross_attention_fn='softmax'",
        ),
        (dict(attention_backend="sdpa"), "'sdpa' runs softmax only, but encoder_attention_fn='entmax15'"),
        (dict(attention_backend="tiles"), "unknown attention_backend 'tiles'; valid values: auto, eager, sdpa, fused"),
    ],
)
def test_config_refuses_a_backend_that_cannot_serve_every_attention_type(settings, message):
    with pytest.raises(ValueError, match=message):
        EntmaxSparsefinderMarianConfig(**{**TINY, **ENTMAX, **settings})


def test_stock_marian_config_loads_with_the_auto_backend():
    from transformers import MarianConfig

    config = EntmaxSparsefinderMarianConfig.from_dict(MarianConfig(**TINY).to_dict())
    assert config.attention_backend == "auto" and config.model_type == "entmax_sparsefinder_marian"


def test_sparse_bert_reports_the_kernel_each_layer_ran():
    from conftest import random_batch, tiny_kwargs
    from hf_sparse import SparseBertConfig, SparseBertModel

    config = SparseBertConfig(**tiny_kwargs(attention_fn="entmax15", num_attention_heads=2))
    model = SparseBertModel(config).double().to(DEVICE).eval()
    ids, mask = (t.to(DEVICE) for t in random_batch(batch=2, length=18))
    names = ("encoder.layer.0.attention.self", "encoder.layer.1.attention.self")
    assert model.attention_backends_used() == {}
    with torch.no_grad():
        outs = {}
        for backend in ("eager", "fused"):
            model.config.attention_backend = backend
            outs[backend] = model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert model.attention_backends_used() == dict.fromkeys(names, backend)
    torch.testing.assert_close(outs["fused"], outs["eager"], atol=1e-10, rtol=0)


def test_fused_marian_trains_with_attention_dropout_as_eager_dropping_the_same_pairs(monkeypatch):
    from test_entmax_triton import kernel_dropout_for_eager

    model = tiny_marian(attention_dropout=0.2).train()
    src, src_mask = ragged(2, 19, seed=4, pad_from=(19, 12))
    tgt, tgt_mask = ragged(2, 17, seed=5, pad_from=(17, 11))
    kernel_dropout_for_eager(monkeypatch)

    def forward_backward(model):
        model.zero_grad()
        torch.manual_seed(3)
        out = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
        out.logits.sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if "_proj" in name}
        return out.logits.detach(), grads, model.attention_backends_used()

    (eager, eager_grads, _), (fused, fused_grads, used) = run_both(model, forward_backward)
    assert used == dict.fromkeys(ATTENTION_MODULES, "fused")
    torch.testing.assert_close(fused, eager, atol=1e-10, rtol=0)
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-9, rtol=0, msg=name)
    model.eval()
    with torch.no_grad():
        plain = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt, decoder_attention_mask=tgt_mask)
    assert not torch.allclose(plain.logits, fused)  # the dropout did drop pairs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto picks the fused kernel on CUDA only")
def test_auto_runs_the_fused_kernel_in_every_entmax_attention_on_cuda():
    model = tiny_marian().eval()
    src, src_mask = ragged(2, 40, seed=8, pad_from=(40, 23))
    with torch.no_grad():
        model.generate(src, attention_mask=src_mask, max_new_tokens=4, do_sample=False)
    assert model.attention_backends_used() == dict.fromkeys(ATTENTION_MODULES, "fused")
