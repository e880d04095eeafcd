"""Sparsefinder on the entmax Marian decoder: fit from the model's own attention, then attend only where predicted."""

import pytest
import torch
from test_modeling_entmax_marian import MARIAN, _sharpen, batch

from hf_sparse import EntmaxSparsefinderMarianConfig, EntmaxSparsefinderMarianMTModel
from hf_sparse.sparsefinder import fit


def model_with(**sparsefinder):
    torch.manual_seed(0)
    config = EntmaxSparsefinderMarianConfig(**MARIAN, sparsefinder={"method": "distance", "window": 1, **sparsefinder})
    return _sharpen(EntmaxSparsefinderMarianMTModel(config)).eval()


def loader(n=4):
    return [dict(zip(("input_ids", "attention_mask", "decoder_input_ids"), batch(seed))) for seed in range(n)]


def test_fit_trains_only_the_predictors_and_marks_them_fitted():
    model = model_with()
    before = {k: v.clone() for k, v in model.state_dict().items() if "sparsefinder" not in k}
    losses = fit(model, loader(), epochs=5, progress=False)
    assert set(losses) == {0, 1}
    for layer_losses in losses.values():
        assert sum(layer_losses[-4:]) < sum(layer_losses[:4])
    assert all(bool(m.sparsefinder.fitted) for m in model.sparsefinder_modules().values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_predicted_sparse_decoding_with_everything_predicted_equals_full_entmax():
    model = model_with(threshold=1e9)
    fit(model, loader(2), epochs=1, progress=False)
    ids, mask, decoder = batch(9)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        model.config.sparsefinder["enabled"] = True
        sparse = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    assert torch.allclose(full, sparse, atol=1e-5)


def test_restrictive_prediction_changes_outputs_and_cached_decoding_matches_uncached():
    model = model_with(threshold=0.5)
    fit(model, loader(), epochs=3, progress=False)
    ids, mask, decoder = batch(9)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        model.config.sparsefinder["enabled"] = True
        sparse = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    assert (full - sparse).abs().max() > 1e-4
    kw = dict(attention_mask=mask, max_new_tokens=7, num_beams=2, do_sample=False)
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


def test_enabled_sparse_execution_refuses_unfitted_predictors():
    model = model_with(enabled=True)
    ids, mask, decoder = batch()
    with pytest.raises(ValueError, match="predictor of decoder layer 0 is not fitted.*sparsefinder.fit"):
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)


def test_fit_needs_predictors():
    model = EntmaxSparsefinderMarianMTModel(EntmaxSparsefinderMarianConfig(**MARIAN))
    with pytest.raises(ValueError, match="no Sparsefinder predictors"):
        fit(model, loader(1), progress=False)


def test_unknown_method_is_refused_at_configuration():
    with pytest.raises(ValueError, match="unknown sparsefinder method 'magic'"):
        EntmaxSparsefinderMarianConfig(**MARIAN, sparsefinder={"method": "magic"})
