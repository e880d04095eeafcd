import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, MarianConfig, MarianModel, MarianMTModel

from hf_sparse import EntmaxSparsefinderMarianConfig, EntmaxSparsefinderMarianModel, EntmaxSparsefinderMarianMTModel

PAD = 0
MARIAN = dict(
    vocab_size=25,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=37,
    decoder_ffn_dim=37,
    max_position_embeddings=64,
    pad_token_id=PAD,
    decoder_start_token_id=PAD,
    eos_token_id=3,
    forced_eos_token_id=None,
    dropout=0.0,
    attention_dropout=0.0,
)
SOFTMAX = dict(decoder_attention_fn="softmax", encoder_attention_fn="softmax", cross_attention_fn="softmax")


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 25, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = PAD
    decoder = torch.randint(5, 25, (3, 9), generator=g)
    return ids, mask, decoder


def _sharpen(model, factor=6.0):
    """Scale the query projections so entmax has clearly sparse rows (random init is near uniform)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("q_proj.weight"):
                param.mul_(factor)
    return model


@pytest.mark.parametrize(
    "stock_cls, ours_cls",
    [(MarianMTModel, EntmaxSparsefinderMarianMTModel), (MarianModel, EntmaxSparsefinderMarianModel)],
)
def test_all_softmax_equals_stock_marian_with_padding(stock_cls, ours_cls):
    stock = stock_cls(MarianConfig(**MARIAN)).eval()
    ours = ours_cls(EntmaxSparsefinderMarianConfig(**MARIAN, **SOFTMAX)).eval()
    info = ours.load_state_dict(stock.state_dict(), strict=True)
    assert not info.missing_keys and not info.unexpected_keys
    ids, mask, decoder = batch()
    with torch.no_grad():
        want = stock(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)
        got = ours(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)
    key = "logits" if "logits" in want else "last_hidden_state"
    assert torch.allclose(want[key], got[key], atol=1e-5)
    assert torch.allclose(want.encoder_last_hidden_state, got.encoder_last_hidden_state, atol=1e-5)


def test_all_softmax_generates_the_same_tokens_as_stock_marian():
    stock = MarianMTModel(MarianConfig(**MARIAN)).eval()
    ours = EntmaxSparsefinderMarianMTModel(EntmaxSparsefinderMarianConfig(**MARIAN, **SOFTMAX)).eval()
    ours.load_state_dict(stock.state_dict())
    ids, mask, _ = batch()
    for beams in (1, 3):
        a = stock.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=beams, do_sample=False)
        b = ours.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=beams, do_sample=False)
        assert torch.equal(a, b)


def test_stock_marian_checkpoint_loads_with_no_missing_or_unexpected_keys(tmp_path):
    MarianMTModel(MarianConfig(**MARIAN)).save_pretrained(tmp_path)
    model, info = EntmaxSparsefinderMarianMTModel.from_pretrained(tmp_path, output_loading_info=True)
    assert model.config.model_type == "entmax_sparsefinder_marian"
    assert model.config.decoder_attention_fn == "entmax15"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)  # the stock checkpoint stays a MarianMTModel
    assert type(again) is MarianMTModel


def test_entmax_decoder_attention_is_sparse_normalised_causal_and_ignores_padding():
    model = _sharpen(EntmaxSparsefinderMarianMTModel(EntmaxSparsefinderMarianConfig(**MARIAN))).eval()
    ids, mask, decoder = batch()
    decoder_mask = torch.ones_like(decoder)
    decoder_mask[2, 6:] = 0
    out = model(
        input_ids=ids,
        attention_mask=mask,
        decoder_input_ids=decoder,
        decoder_attention_mask=decoder_mask,
        output_attentions=True,
    )
    for probs in out.decoder_attentions:
        rows = probs.sum(-1)
        valid_rows = decoder_mask.bool()[:, None, :].expand_as(rows)
        assert torch.allclose(rows[valid_rows], torch.tensor(1.0), atol=1e-5)
        future = torch.triu(torch.ones(9, 9, dtype=torch.bool), diagonal=1)
        assert (probs[..., future] == 0).all()
        assert (probs[2, :, :, 6:] == 0).all()  # padded decoder keys
        assert (probs[..., ~future] == 0).any()  # entmax: exact zeros among allowed pairs
    for probs in out.cross_attentions:  # softmax by default: dense over real source tokens, zero on padding
        assert (probs[1, :, :, 8:] == 0).all() and (probs[1, :, :, :8] > 0).all()


def test_gradients_flow_through_entmax_attention():
    model = _sharpen(EntmaxSparsefinderMarianMTModel(EntmaxSparsefinderMarianConfig(**MARIAN))).train()
    ids, mask, decoder = batch()
    model(input_ids=ids, attention_mask=mask, labels=decoder).loss.backward()
    grad = model.model.decoder.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("beams", [1, 3])
def test_cached_generation_equals_generation_without_cache(beams):
    model = _sharpen(EntmaxSparsefinderMarianMTModel(EntmaxSparsefinderMarianConfig(**MARIAN))).eval()
    ids, mask, _ = batch()
    kw = dict(attention_mask=mask, max_new_tokens=7, num_beams=beams, do_sample=False)
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


def test_inputs_beyond_the_position_table_are_refused_naming_their_length_and_the_limit():
    """Marian's sinusoidal table has max_position_embeddings rows: longer inputs once failed in the embedding
    lookup with a bare IndexError (stock Marian still does)."""
    limit = 12
    config = EntmaxSparsefinderMarianConfig(**{**MARIAN, "max_position_embeddings": limit})
    model = EntmaxSparsefinderMarianMTModel(config).eval()
    ids, mask, decoder = batch()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        longest = torch.randint(5, 25, (1, limit), generator=g)
        model(input_ids=longest, decoder_input_ids=longest)  # the whole table is usable
        too_long = torch.randint(5, 25, (1, limit + 1), generator=g)
        with pytest.raises(ValueError, match=rf"encoder input spans {limit + 1} positions.*embeddings={limit}"):
            model(input_ids=too_long, decoder_input_ids=decoder[:1])
        with pytest.raises(ValueError, match=rf"decoder input spans {limit + 1} positions, .*embeddings={limit}"):
            model(input_ids=ids[:1], decoder_input_ids=too_long)
        for cache in (None, "static"):  # incremental decoding counts the cached positions too
            with pytest.raises(ValueError, match=rf"decoder input spans {limit + 1} positions \({limit} cached \+ 1"):
                kw = dict(max_new_tokens=limit + 1, min_new_tokens=limit + 1, cache_implementation=cache)
                model.generate(ids, attention_mask=mask, **kw)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(decoder_attention_fn="relu"), "unknown decoder_attention_fn 'relu'"),
        (dict(cross_attention_fn="max"), "unknown cross_attention_fn 'max'"),
        (dict(decoder_attention_fn="softmax", sparsefinder={"method": "distance"}), "nothing to predict"),
        (dict(decoder_attention_fn="entmax_bisect", entmax_alpha=1.0), "entmax_alpha must be a finite number >= 1.001"),
    ],
)
def test_bad_attention_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        EntmaxSparsefinderMarianConfig(**{**MARIAN, **kwargs})


def test_a_stock_marian_checkpoint_loads_without_the_model_type_warning(tmp_path):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    MarianMTModel(MarianConfig(**MARIAN)).save_pretrained(tmp_path)
    with CaptureLogger(logging.get_logger("transformers.configuration_utils")) as captured:
        model = EntmaxSparsefinderMarianMTModel.from_pretrained(tmp_path)
    assert model.config.model_type == "entmax_sparsefinder_marian"
    assert "to instantiate a model of type" not in captured.out


def test_a_stock_marian_with_new_predictors_says_so_once_in_plain_words_and_no_missing_table(tmp_path, caplog):
    import logging

    MarianMTModel(MarianConfig(**MARIAN)).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        MarianMTModel.from_pretrained(tmp_path, decoder_layers=3)  # a stock class with a missing layer: its table
    assert "MISSING" in caplog.text  # the capture sees Transformers' report (so its absence below means something)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model, info = EntmaxSparsefinderMarianMTModel.from_pretrained(
            tmp_path, sparsefinder={"method": "distance", "projection_dim": 2}, output_loading_info=True
        )
    ours = [r.getMessage() for r in caplog.records if r.name == "hf_sparse.loading"]
    assert "MISSING" not in caplog.text and "LOAD REPORT" not in caplog.text
    layers = ", ".join(str(i) for i in model.sparsefinder_modules())
    assert ours == [
        "EntmaxSparsefinderMarianMTModel: new weights, not in the checkpoint (expected): Sparsefinder predictors of "
        f"layers {layers} ({5 * len(model.sparsefinder_modules())} tensors): not fitted yet (fit them, e.g. "
        "SparsefinderCallback)"
    ]
    assert {k for k in info["missing_keys"] if ".sparsefinder." in k}  # still listed when asked
