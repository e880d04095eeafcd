"""Sparsefinder's predicted attention on the fused Triton kernel (attend_predicted_fused) against the gathering
execution (attend_predicted) and a float64 dense masked entmax from the ``entmax`` package.

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is first used, as
in tests/test_entmax_triton.py). The interpreter is slow: lengths up to 40 in tiles of 16 (so predictions leave
whole tiles empty and padding, causality and chunks cross tile borders), one layer, float64.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="the fused kernel needs triton (a dev dependency)")
entmax = pytest.importorskip("entmax", reason="the float64 reference is the entmax package")

from test_fused_marian import TINY, ragged  # noqa: E402
from transformers import DynamicCache, EncoderDecoderCache  # noqa: E402

from conftest import random_batch, tiny_kwargs  # noqa: E402
from hf_sparse import (  # noqa: E402
    EntmaxSparsefinderMarianConfig,
    EntmaxSparsefinderMarianMTModel,
    SparseBertConfig,
    SparseBertForMaskedLM,
    modeling_entmax_marian,
    sparsefinder,
)
from hf_sparse.pair_codes import PairCodes  # noqa: E402
from hf_sparse.patterns import dense_mask, parse  # noqa: E402
from hf_sparse.sparsefinder import (  # noqa: E402
    PREDICTED_FUSED,
    SparsefinderLayer,
    attend_predicted,
    attend_predicted_fused,
    predict_pairs,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TILE = 16
REFERENCE = {
    "entmax15": lambda x, alpha: entmax.entmax15(x, dim=-1),
    "sparsemax": lambda x, alpha: entmax.sparsemax(x, dim=-1),
    "entmax_bisect": lambda x, alpha: entmax.entmax_bisect(x, alpha=alpha, dim=-1, n_iter=100),
}


@pytest.fixture
def small_tiles(monkeypatch):
    """Models use tiles of 16 here, so that a 40-token input has 3 x 3 tiles to skip or read."""
    monkeypatch.setattr(sparsefinder, "FUSED_MASK_BLOCK", TILE)


def fitted_layer(heads: int, dim: int, **settings) -> tuple[SparsefinderLayer, dict]:
    """A predictor with random projections, marked fitted (what it predicts does not matter, only that both
    executions attend to the same pairs)."""
    settings = {"method": "distance", "window": 1, "enabled": True, **settings}
    layer = SparsefinderLayer(settings, heads, dim, generator=torch.Generator().manual_seed(1)).double().to(DEVICE)
    layer.fitted.fill_(True)
    return layer, settings


def qkv(b, h, lq, lk, d, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * s for n, s in ((lq, 2), (lk, 2), (lk, 1)))
    return [t.to(DEVICE).requires_grad_(grad) for t in (q, k, v)]


def reference(q, k, v, pairs, scaling, attention_fn, alpha):
    """Dense float64 entmax per query row over its kept keys only (the ``entmax`` package); zeros without any."""
    scores = (q @ k.transpose(-1, -2) * scaling).detach().cpu()
    pairs, v = pairs.cpu(), v.detach().cpu()
    out = torch.zeros(*scores.shape[:-1], v.shape[-1], dtype=torch.float64)
    for b, h, i in pairs.any(-1).nonzero().tolist():
        kept = pairs[b, h, i]
        p = REFERENCE[attention_fn](scores[b, h, i, kept][None], alpha)[0]
        out[b, h, i] = p @ v[b, h, kept]
    return out.transpose(1, 2)


def spy_on_the_kernel(monkeypatch) -> list[dict]:
    """The keyword arguments of every call predicted attention makes to the fused kernel, in order."""
    calls = []
    real = sparsefinder.entmax_attention
    monkeypatch.setattr(sparsefinder, "entmax_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    return calls


def tiles_of(pairs: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """The ``tile x tile`` tiles of ``(B, H, Lq, Lk)`` pairs holding any pair."""
    b, h, lq, lk = pairs.shape
    nq, nk = -(-lq // tile), -(-lk // tile)
    padded = torch.nn.functional.pad(pairs, (0, nk * tile - lk, 0, nq * tile - lq))
    return padded.view(b, h, nq, tile, nk, tile).any(5).any(3)


CASES = {
    # encoder-like: padded keys and queries (row 1's padded queries have no key at all)
    "entmax15-padding": dict(attention_fn="entmax15", causal=False, lq=40),
    # decoder with a cache: 24 queries after 16 cached keys, causal, Transformers-style allowed mask with padding
    "sparsemax-causal-cache": dict(attention_fn="sparsemax", causal=True, lq=24),
    # a fixed pattern united with the prediction, general alpha
    "bisect-union-pattern": dict(attention_fn="entmax_bisect", causal=False, lq=40, combine="union"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_fused_predicted_attention_equals_gathered_and_float64_masked_entmax(case):
    spec = dict(CASES[case])
    attention_fn, causal, lq = spec.pop("attention_fn"), spec.pop("causal"), spec.pop("lq")
    b, h, lk, d, alpha, scaling = 2, 2, 40, 16, 1.3, 0.25
    layer, settings = fitted_layer(h, d, threshold=2.0, **spec)
    q, k, v = qkv(b, h, lq, lk, d, seed=len(case))
    valid_keys = torch.ones(b, lk, dtype=torch.bool, device=DEVICE)
    valid_keys[1, 27:] = False
    offset = lk - lq
    kw = dict(where="test", scaling=scaling, attention_fn=attention_fn, alpha=alpha, causal=causal)
    kw["query_offset"] = offset
    allowed = pattern_rows = valid_queries = None
    if causal:  # Marian's way: no valid_keys, the model's boolean mask as `allowed`
        causal_pairs = torch.ones(lq, lk, dtype=torch.bool, device=DEVICE).tril(offset)
        kw["allowed"] = allowed = causal_pairs[None, None] & valid_keys[:, None, None]
    else:  # SparseBERT's way
        valid_queries = valid_keys[:, offset:]
        kw.update(valid_keys=valid_keys, valid_queries=valid_queries)
    if spec.get("combine"):
        pattern = dense_mask(parse("global:1+strided:8"), lk).to(DEVICE)
        pattern_rows = lambda start, stop: pattern[start:stop]  # noqa: E731
        kw["pattern_rows"] = pattern_rows

    fused = attend_predicted_fused(layer, q, k, v, settings, **kw, mask_block=TILE)
    gathered, _ = attend_predicted(layer, q, k, v, settings, **kw)
    torch.testing.assert_close(fused, gathered, atol=1e-12, rtol=0)

    # the pairs built the plain way: the whole prediction, then pattern, then the allowed mask
    pairs = predict_pairs(layer, q, k, settings, None if causal else valid_keys, causal, offset, valid_queries)
    if pattern_rows is not None:
        pred_only = predict_pairs(layer, q, k, settings, None, False, offset)
        pairs = (pred_only | pattern_rows(0, lq)) & valid_keys[:, None, None, :] & valid_queries[:, None, :, None]
    if allowed is not None:
        pairs = pairs & allowed
    assert not tiles_of(pairs).all(), "the prediction should leave whole tiles empty"
    torch.testing.assert_close(fused.cpu(), reference(q, k, v, pairs, scaling, attention_fn, alpha), atol=1e-9, rtol=0)
    empty = ~pairs.any(-1).transpose(1, 2)  # (B, Lq, H): rows without a key
    if not causal:
        assert empty.any()
    assert torch.equal(fused[empty], torch.zeros_like(fused[empty]))


def test_fused_predicted_gradients_equal_the_gathered_execution_and_are_zero_on_empty_rows():
    b, h, lk, d = 2, 2, 40, 16
    layer, settings = fitted_layer(h, d, threshold=2.0)
    valid = torch.ones(b, lk, dtype=torch.bool, device=DEVICE)
    valid[1, 30:] = False
    weights = torch.randn(b, lk, h, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    grads = {}
    for name, fn in (("fused", attend_predicted_fused), ("gathered", attend_predicted)):
        q, k, v = qkv(b, h, lk, lk, d, seed=5, grad=True)
        out = fn(
            layer,
            q,
            k,
            v,
            settings,
            where="test",
            scaling=0.25,
            attention_fn="entmax15",
            alpha=1.5,
            valid_keys=valid,
            valid_queries=valid,
            **({"mask_block": TILE} if name == "fused" else {}),
        )
        out = out[0] if isinstance(out, tuple) else out
        (out * weights).sum().backward()
        grads[name] = (q.grad, k.grad, v.grad)
    for got, want, name in zip(grads["fused"], grads["gathered"], "qkv"):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0, msg=f"d{name}")
    assert torch.equal(grads["fused"][0][1, :, 30:], torch.zeros_like(grads["fused"][0][1, :, 30:]))


def test_chunked_causal_calls_equal_one_call(monkeypatch):
    """Long inputs are split into query chunks (bounded element mask), each with only the keys up to its last
    query: the result must not depend on where the chunks fall."""
    b, h, lk, lq, d = 1, 2, 40, 36, 16
    layer, settings = fitted_layer(h, d, top_k=6)  # each query's nearest keys: an element mask
    q, k, v = qkv(b, h, lq, lk, d, seed=7)
    kw = dict(where="test", scaling=0.3, attention_fn="entmax15", alpha=1.5, causal=True, query_offset=lk - lq)
    whole = attend_predicted_fused(layer, q, k, v, settings, **kw, mask_block=TILE)
    calls = []
    real = sparsefinder.entmax_attention
    monkeypatch.setattr(sparsefinder, "entmax_attention", lambda *a, **k: calls.append(a[1].shape[2]) or real(*a, **k))
    monkeypatch.setattr(sparsefinder, "FUSED_PAIRS_PER_CALL", b * h * lk * TILE)  # one tile row of queries a call
    chunked = attend_predicted_fused(layer, q, k, v, settings, **kw, mask_block=TILE)
    assert calls == [lk - lq + 16, lk - lq + 32, lk]  # keys up to each chunk's last query
    torch.testing.assert_close(chunked, whole, atol=1e-13, rtol=0)


@pytest.mark.parametrize("method", ["distance", "top_k", "quantization", "bigbird", "lsh"])
def test_building_the_kernel_masks_reads_nothing_back_from_the_device(monkeypatch, method):
    """What the fused execution does besides the kernel (prediction, tiles, element mask or codes, their packing
    for the kernel) never asks the device for a value, so on CUDA it queues without a sync. Here every way a tensor
    reaches Python raises."""
    b, h, lk, d = 2, 2, 40, 16
    settings = dict(method="distance", top_k=5) if method == "top_k" else dict(method=method, threshold=2.0)
    layer, settings = fitted_layer(h, d, **settings, num_buckets=4 if method == "lsh" else 3, random_keys=2)
    layer.is_fitted()  # read once per value of the buffer (on loading), not per forward
    q, k, v = qkv(b, h, lk, lk, d)
    valid = torch.ones(b, lk, dtype=torch.bool, device=DEVICE)
    valid[0, 33:] = False
    seen = []
    monkeypatch.setattr(sparsefinder, "entmax_attention", lambda q, k, v, **kw: seen.append(kw) or torch.zeros_like(q))

    def refuse(*args, **kwargs):
        raise AssertionError("a device value was read on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    monkeypatch.setattr(torch, "nonzero", refuse)
    attend_predicted_fused(
        layer,
        q,
        k,
        v,
        settings,
        where="test",
        scaling=0.25,
        attention_fn="entmax15",
        alpha=1.5,
        valid_keys=valid,
        valid_queries=valid,
        mask_block=TILE,
    )
    (kw,) = seen
    keep = kw["keep"]
    if isinstance(keep, PairCodes):  # what entmax_attention makes of the codes
        tiles, _ = keep.tiles(TILE), keep.packed()
    monkeypatch.undo()
    want = predict_pairs(layer, q, k, settings, valid, False, 0, valid)
    if method in ("distance", "quantization", "lsh"):  # decided per token: codes, tested inside the kernel
        assert isinstance(keep, PairCodes) and "block_mask" not in kw
        assert torch.equal(keep.pairs().expand_as(want), want)
        if method == "distance":  # tiles from boxes (test_pair_codes): every tile holding a pair
            assert not (tiles_of(want) & ~tiles.expand_as(tiles_of(want))).any()
        else:
            assert torch.equal(tiles.expand_as(tiles_of(want)), tiles_of(want))
    else:
        assert torch.equal(keep, want)
        assert torch.equal(kw["block_mask"], tiles_of(want))


@pytest.mark.parametrize("method", ["top_k", "distance", "quantization"])  # an element mask; per-token codes
def test_cuda_predicted_attention_runs_without_a_host_sync(method):
    if DEVICE != "cuda":
        pytest.skip("CUDA only: the sync check is CUDA's")
    b, h, lk, d = 1, 4, 1024, 64
    settings = dict(method="distance", top_k=32) if method == "top_k" else dict(method=method)
    layer, settings = fitted_layer(h, d, threshold=1.0, num_buckets=8, **settings)
    q, k, v = (t.float() for t in qkv(b, h, lk, lk, d))
    layer.float()
    layer.is_fitted()
    kw = dict(where="test", scaling=d**-0.5, attention_fn="entmax15", alpha=1.5)
    attend_predicted_fused(layer, q, k, v, settings, **kw)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        attend_predicted_fused(layer, q, k, v, settings, **kw, causal=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def bert(pattern: str, **settings) -> SparseBertForMaskedLM:
    torch.manual_seed(0)
    config = SparseBertConfig(
        **tiny_kwargs(
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=48,
            attention_fn="entmax15",
            attention_pattern=pattern,
            sparsefinder={"method": "distance", "window": 1, "threshold": 0.6, "enabled": True, **settings},
        )
    )
    model = SparseBertForMaskedLM(config).double().to(DEVICE).eval()
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.mul_(8.0)
    model.bert.encoder.layer[0].attention.self.sparsefinder.fitted.fill_(True)
    return model


@pytest.mark.parametrize(
    "pattern, combine, method",
    [("dense", "intersection", "distance"), ("window:6+global:1", "union", "distance"),
     ("dense", "intersection", "quantization")],  # without a pattern on per-token codes (test_pair_codes)
)
def test_sparse_bert_predicted_attention_runs_fused_and_equals_the_gathered_execution(small_tiles, pattern, combine,
                                                                                      method, monkeypatch):
    model = bert(pattern, combine=combine, method=method, num_buckets=3)
    ids, mask = (t.to(DEVICE) for t in random_batch(batch=2, length=40, seed=4))
    logits = {}
    calls = spy_on_the_kernel(monkeypatch)
    for backend in ("eager", "fused"):
        model.config.attention_backend = backend
        with torch.no_grad():
            logits[backend] = model(input_ids=ids, attention_mask=mask).logits
        used = model.attention_backends_used()["bert.encoder.layer.0.attention.self"]
        assert used == (PREDICTED_FUSED if backend == "fused" else "sparsefinder")
    assert isinstance(calls[-1]["keep"], PairCodes) == (pattern == "dense")
    torch.testing.assert_close(logits["fused"], logits["eager"], atol=1e-10, rtol=0)
    model.config.sparsefinder["enabled"] = False
    model.config.attention_backend = "eager"
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    assert (full - logits["eager"]).abs().max() > 1e-4  # the prediction leaves out pairs entmax keeps
    model.config.sparsefinder["enabled"] = True
    model.config.attention_backend = "fused"
    # the fused backend returns no probabilities: asked for them, it is refused, as without predictors
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=ids, attention_mask=mask, output_attentions=True)


@pytest.mark.parametrize("method", ["top_k", "distance"])  # an element mask; distance codes, prefill and step
def test_marian_decoder_predicted_attention_runs_fused_with_padding_and_kv_cache(small_tiles, method, monkeypatch):
    torch.manual_seed(0)
    chosen = {"method": "distance", "top_k": 3} if method == "top_k" else {"method": method, "threshold": 0.3}
    settings = {**chosen, "window": 1, "enabled": True}
    # closed forms only (bisection is slow under the interpreter; test_fused_marian covers it)
    fns = dict(encoder_attention_fn="sparsemax", decoder_attention_fn="entmax15", cross_attention_fn="sparsemax")
    config = EntmaxSparsefinderMarianConfig(**{**TINY, **fns, "sparsefinder": settings})
    model = EntmaxSparsefinderMarianMTModel(config).double().to(DEVICE).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("q_proj.weight"):
                param.mul_(6.0)
    model.model.decoder.layers[0].self_attn.sparsefinder.fitted.fill_(True)
    src, src_mask = ragged(2, 12, seed=0, pad_from=(12, 9))
    tgt, tgt_mask = ragged(2, 18, seed=1, pad_from=(18, 15))
    decoder_self = "model.decoder.layers.0.self_attn"
    with torch.no_grad():
        model.config.attention_backend = "eager"  # the encoder's fused run is test_fused_marian's
        encoder = model.get_encoder()(input_ids=src, attention_mask=src_mask)
        kw = dict(encoder_outputs=encoder, attention_mask=src_mask)
        eager = model(decoder_input_ids=tgt, decoder_attention_mask=tgt_mask, **kw).logits
        assert model.attention_backends_used()[decoder_self] == "sparsefinder"
        # Transformers' decoder mask is causality and padded keys only: rebuilding it from them (what lets the
        # fused kernel take codes) gives what reading it gives (a mask not built by the model is read)
        with monkeypatch.context() as patch:
            patch.setattr(modeling_entmax_marian, "_MASKS_BUILT", {})
            read = model(decoder_input_ids=tgt, decoder_attention_mask=tgt_mask, **kw).logits
        torch.testing.assert_close(read, eager, atol=1e-12, rtol=0)
        model.config.sparsefinder["enabled"] = False
        full = model(decoder_input_ids=tgt, decoder_attention_mask=tgt_mask, **kw).logits
        model.config.sparsefinder["enabled"] = True
        assert (full - eager).abs().max() > 1e-4  # the prediction leaves out pairs entmax keeps
        # the fused kernel: a prefill of 17 decoder tokens (two tiles, padding), then one query against the cache
        model.config.attention_backend = "fused"
        kw.update(cache=EncoderDecoderCache(DynamicCache(), DynamicCache()), use_cache=True)
        calls = spy_on_the_kernel(monkeypatch)
        prefill = model(decoder_input_ids=tgt[:, :17], decoder_attention_mask=tgt_mask[:, :17], **kw).logits
        assert model.attention_backends_used()[decoder_self] == PREDICTED_FUSED
        step = model(decoder_input_ids=tgt[:, 17:], decoder_attention_mask=tgt_mask, **kw).logits
        assert model.attention_backends_used()[decoder_self] == PREDICTED_FUSED
        # the distance threshold's pairs go to the kernel as codes, prefill and step alike (the decoder has one
        # predicting layer: one kernel call each)
        assert [isinstance(c["keep"], PairCodes) for c in calls] == [method == "distance"] * 2
    real = tgt_mask.bool()  # logits at padded positions attend to nothing real: compare the real ones
    torch.testing.assert_close(torch.cat([prefill, step], 1)[real], eager[real], atol=1e-10, rtol=0)


def test_models_tell_auto_which_layers_run_predicted_attention(monkeypatch):
    """auto's full-precision rule (eager from L = 2048 on CUDA) is for dense work; a model whose layers run
    Sparsefinder's predicted attention says so, and auto keeps the fused kernel for it (not the gathering)."""
    from hf_sparse import attention, modeling_entmax_marian, modeling_sparse_bert

    seen = []

    def spy(requested, **kw):
        seen.append(kw["predicted"])
        return attention.choose_backend(requested, **kw)

    monkeypatch.setattr(modeling_sparse_bert, "choose_backend", spy)
    monkeypatch.setattr(modeling_entmax_marian, "choose_backend", spy)
    model = bert("dense").cpu()
    ids = torch.randint(5, model.config.vocab_size, (2, 12))
    model.config.attention_backend = "eager"  # what the kernel is does not matter here, what auto is told does
    with torch.no_grad():
        model(input_ids=ids)
        assert seen == [True]
        model.config.sparsefinder["enabled"] = False
        model(input_ids=ids)
        model.config.sparsefinder["enabled"] = True
        model.train()
        model(input_ids=ids)
    assert seen == [True, False, False]

    seen.clear()
    settings = {"method": "distance", "window": 1, "enabled": True}
    config = EntmaxSparsefinderMarianConfig(**{**TINY, "sparsefinder": settings, "attention_backend": "eager"})
    marian = EntmaxSparsefinderMarianMTModel(config).eval()
    for layer in marian.model.decoder.layers:
        layer.self_attn.sparsefinder.fitted.fill_(True)
    src, tgt = torch.randint(5, TINY["vocab_size"], (2, 9)), torch.randint(5, TINY["vocab_size"], (2, 6))
    with torch.no_grad():
        marian(input_ids=src, decoder_input_ids=tgt)
    # per attention call: the encoder's and the cross attention run dense, the decoder's self-attention predicts
    layers = config.decoder_layers
    assert seen.count(True) == layers and seen.count(False) == config.encoder_layers + layers
