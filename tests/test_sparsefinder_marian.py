"""Sparsefinder on the entmax Marian decoder: fit from the model's own attention, then attend only where predicted."""

import pytest
import torch

from hf_sparse import EntmaxSparsefinderMarianConfig, EntmaxSparsefinderMarianMTModel
from hf_sparse.sparsefinder_fit import fit
from test_modeling_entmax_marian import MARIAN, _sharpen, batch


def model_with(**sparsefinder):
    torch.manual_seed(0)
    config = EntmaxSparsefinderMarianConfig(**MARIAN, sparsefinder={"method": "distance", "window": 1, **sparsefinder})
    return _sharpen(EntmaxSparsefinderMarianMTModel(config), factor=60.0).eval()


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


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "distance", "top_k": 2},
        {"method": "clustering", "num_clusters": 3},
        {"method": "window", "window": 2},
        {"method": "lsh", "num_buckets": 4},
        {"method": "routing", "num_clusters": 3},
        {"method": "bigbird", "random_keys": 1, "window": 1},
    ],
    ids=lambda s: s["method"],
)
def test_every_method_decodes_the_same_with_and_without_cache(settings):
    """Incremental decoding scores each new query only against the cached keys its predictor selects; that must
    equal predicting on the whole prefix. (Quantization is excluded by design: its buckets are quantiles of the
    keys present, which grow with the cache.)"""
    model = model_with(**settings)
    fit(model, loader(2), epochs=1, progress=False)
    model.config.sparsefinder["enabled"] = True
    ids, mask, _ = batch(4)
    kw = dict(attention_mask=mask, max_new_tokens=7, num_beams=1, do_sample=False)
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("settings", [{"method": "window"}, {"method": "distance", "threshold": 0.5}], ids=str)
@pytest.mark.parametrize("beams", [1, 2])
def test_a_static_cache_decodes_exactly_as_the_dynamic_cache(settings, beams):
    """A static cache (``cache_implementation="static"``) holds ``max_cache_len`` keys, mostly empty slots: the
    queries' positions come from the cache's length, not from the key count, which once put the window (and
    causality) on empty slots and zeroed the first steps' attention."""
    model = model_with(**settings)
    fit(model, loader(2), epochs=1, progress=False)
    model.config.sparsefinder["enabled"] = True
    ids, mask, _ = batch(4)
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=beams, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        dynamic = model.generate(ids, **kw)
        static = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(static.sequences, dynamic.sequences)
    for got, want in zip(static.scores, dynamic.scores, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["quantization", "distance"])
def test_a_padded_decoder_row_attends_as_the_row_alone(method):
    """Padded target positions are no keys: quantization's buckets are quantiles of the real keys only (they once
    took the padding in, so a row's logits depended on how much padding its batch gave it)."""
    model = model_with(method=method, threshold=0.5)
    fit(model, loader(2), epochs=1, progress=False)
    model.config.sparsefinder["enabled"] = True
    ids, mask, decoder = batch(9)
    decoder_mask = torch.ones_like(decoder)
    decoder_mask[0, 5:] = 0
    decoder_mask[1, 3:] = 0
    with torch.no_grad():
        padded = model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, decoder_attention_mask=decoder_mask
        ).logits
        for row, length in enumerate((5, 3, decoder.shape[1])):
            one = slice(row, row + 1)
            alone = model(input_ids=ids[one], attention_mask=mask[one], decoder_input_ids=decoder[one, :length]).logits
            torch.testing.assert_close(padded[row, :length], alone[0], rtol=0, atol=1e-5)


def test_enabled_sparse_execution_refuses_unfitted_predictors():
    model = model_with(enabled=True)
    ids, mask, decoder = batch()
    with pytest.raises(ValueError, match="predictor of decoder layer 0 is not fitted.*sparsefinder.fit"):
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)


def test_sparsefinder_settings_given_to_a_built_model_are_refused_not_ignored():
    """Predictors are made at construction: settings set afterwards once ran dense attention without a word."""
    model = EntmaxSparsefinderMarianMTModel(EntmaxSparsefinderMarianConfig(**MARIAN)).eval()
    ids, mask, decoder = batch()
    model.config.sparsefinder = {"method": "window", "enabled": True}
    words = r"decoder layers \[0, 1\] have no predictor.*from_pretrained\(path, sparsefinder="
    with pytest.raises(ValueError, match=words):
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)
    model.config.sparsefinder = {"method": "window", "enabled": True, "layers": []}  # predicts nowhere: nothing lacks
    model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)
    built = model_with(method="window", layers=[0], enabled=True)
    built(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)
    assert built.attention_backends_used()["model.decoder.layers.0.self_attn"] == "sparsefinder"
    built.config.sparsefinder["layers"] = None
    with pytest.raises(ValueError, match=r"decoder layers \[1\] have no predictor"):
        built(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)


def test_fit_needs_predictors():
    model = EntmaxSparsefinderMarianMTModel(EntmaxSparsefinderMarianConfig(**MARIAN))
    with pytest.raises(ValueError, match="no Sparsefinder predictors"):
        fit(model, loader(1), progress=False)


def test_unknown_method_is_refused_at_configuration():
    with pytest.raises(ValueError, match="unknown sparsefinder method 'magic'"):
        EntmaxSparsefinderMarianConfig(**MARIAN, sparsefinder={"method": "magic"})


def test_sparsity_recall_admitting_everything_has_recall_one_and_matches_a_brute_force_count():
    from hf_sparse.evaluation import sparsity_recall
    from hf_sparse.sparsefinder_fit import collect_attention

    model = model_with(threshold=1e9)
    fit(model, loader(2), epochs=1, progress=False)
    result = sparsity_recall(model, loader(2), progress=False)
    assert result["average"]["recall"] == 1.0 and result["average"]["graph_sparsity"] == 0.0
    # gold sparsity by counting, sentence by sentence, head by head
    collected = collect_attention(model, loader(2), progress=False)
    dropped = []
    for layer, batches in collected.items():
        per_head = []
        for _, _, gold, valid in batches:
            for b in range(gold.shape[0]):
                row = []
                for h in range(gold.shape[1]):
                    n_valid = int(valid[b, 0].sum())
                    row.append(1 - int(gold[b, h].sum()) / n_valid)
                per_head.append(row)
        want = torch.tensor(per_head, dtype=torch.float64).mean(0)
        assert torch.allclose(result["per_layer"][layer]["gold_sparsity"], want)
        dropped.append(want.max())
    assert max(dropped) > 0.05  # entmax did drop pairs somewhere


def test_gold_graphs_leave_out_padded_decoder_queries_and_keys():
    """decoder_attention_mask pads the targets: their rows and columns are not pairs (as for SparseBERT's padding)."""
    from hf_sparse.evaluation import sparsity_recall
    from hf_sparse.sparsefinder_fit import collect_attention

    model = model_with(threshold=1e9)
    batches = loader(2)
    for b in batches:
        real = torch.ones_like(b["decoder_input_ids"])
        real[1, 6:] = 0
        real[2, 3:] = 0
        b["decoder_attention_mask"] = real
    fit(model, batches, epochs=1, progress=False)
    collected = collect_attention(model, batches, progress=False)
    for layer_batches in collected.values():
        for (_, _, gold, valid), b in zip(layer_batches, batches):
            real = b["decoder_attention_mask"].bool()
            length = real.shape[1]
            want = torch.ones(length, length, dtype=torch.bool).tril() & real[:, None, :, None] & real[:, None, None]
            assert torch.equal(valid, want)
            assert not (gold & ~valid).any()
    # the metrics count real pairs only: admitting everything still has recall 1 and graph sparsity 0
    result = sparsity_recall(model, batches, progress=False)
    assert result["average"]["recall"] == 1.0 and result["average"]["graph_sparsity"] == 0.0


def test_pareto_sweeps_every_method_and_writes_csv_and_plot(tmp_path):
    from hf_sparse.evaluation import pareto

    model = model_with()
    fit(model, loader(), epochs=2, progress=False)
    sweep = {
        "distance": [{"threshold": t} for t in (0.1, 1.0, 1e9)],
        "quantization": [{"num_buckets": 2}],
        "clustering": [{"num_clusters": 2}],
        "window": [{"window": 0}, {"window": 64}],
        "lsh": [{"num_buckets": 2}],
        "routing": [{"num_clusters": 2}],
        "bigbird": [{"random_keys": 1}],
    }
    rows = pareto(model, loader(), sweep, tmp_path / "p.csv", tmp_path / "p.png", progress=False)
    assert [r["method"] for r in rows].count("distance") == 3 and len(rows) == 10
    by = {(r["method"], r["setting"]): r for r in rows}
    assert by[("window", "window=64")]["recall"] == 1.0 and by[("distance", "threshold=1000000000.0")]["recall"] == 1.0
    assert by[("window", "window=0")]["graph_sparsity"] > by[("window", "window=64")]["graph_sparsity"]
    sparsities = [by[("distance", f"threshold={t}")]["graph_sparsity"] for t in (0.1, 1.0, 1000000000.0)]
    assert sparsities == sorted(sparsities, reverse=True)
    assert (tmp_path / "p.csv").read_text().startswith("method,setting,")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_sparsefinder_callback_fits_at_the_end_of_a_trainer_run_without_touching_mt_weights(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_sparse.callbacks import SparsefinderCallback

    model = model_with()
    ids, mask, decoder = batch(5)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": decoder.tolist()})
    callback = SparsefinderCallback(loader(2), epochs=2)
    snapshot = {}

    class Snapshot(TrainerCallback):  # runs first: records the trained weights just before fitting
        def on_train_end(self, args, state, control, model=None, **kwargs):
            snapshot.update({k: v.clone() for k, v in model.state_dict().items() if "sparsefinder" not in k})

    args = TrainingArguments(
        str(tmp_path), max_steps=3, per_device_train_batch_size=3, report_to=[], use_cpu=True, save_strategy="no"
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Snapshot(), callback]).train()
    assert all(bool(m.sparsefinder.fitted) for m in model.sparsefinder_modules().values())
    assert set(callback.losses) == {0, 1} and all(callback.losses.values())
    after = model.state_dict()
    assert snapshot and all(torch.equal(v, after[k]) for k, v in snapshot.items())


@pytest.mark.parametrize("method", ["distance", "lsh"])
def test_a_stock_checkpoint_gets_fresh_predictors_as_the_constructor_makes_them(tmp_path, method):
    """Marian's decoder is a PreTrainedModel of its own: Transformers initialises its submodules with Marian's
    _init_weights, so predictors missing from a checkpoint were once left as uninitialised memory (NaN projections,
    a `fitted` flag reading True, garbage LSH rotations)."""
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    MarianMTModel(MarianConfig(**MARIAN)).save_pretrained(tmp_path)
    settings = {"method": method, "num_buckets": 4}
    loaded = EntmaxSparsefinderMarianMTModel.from_pretrained(tmp_path, sparsefinder=settings)
    fresh = EntmaxSparsefinderMarianMTModel(loaded.config)
    assert loaded.sparsefinder_modules().keys() == fresh.sparsefinder_modules().keys() == {0, 1}
    for i, module in loaded.sparsefinder_modules().items():
        got, want = module.sparsefinder, fresh.sparsefinder_modules()[i].sparsefinder
        assert bool(got.fitted) == (method == "lsh")  # lsh hashes need no fitting
        for name, tensor in got.state_dict().items():
            assert torch.isfinite(tensor.float()).all(), name
            if name in ("rotations", "fitted"):  # drawn from the settings' seed / constant: equal to the fresh ones
                assert torch.equal(tensor, want.state_dict()[name]), name
            else:  # random draws: the same bound as the constructor's
                bound = want.state_dict()[name].abs().max()
                assert 0 < tensor.abs().max() <= bound * 1.5, name
    if method == "distance":
        loaded.config.sparsefinder["enabled"] = True
        with pytest.raises(ValueError, match="not fitted"):
            loaded.generate(batch()[0], attention_mask=batch()[1], max_new_tokens=2)


def test_predictor_state_of_the_wrong_shape_is_refused_not_reinitialised(tmp_path):
    model = model_with()
    for module in model.sparsefinder_modules().values():
        module.sparsefinder.fitted.fill_(True)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lacks predictor state"):
        EntmaxSparsefinderMarianMTModel.from_pretrained(
            tmp_path,
            sparsefinder={"method": "distance", "window": 1, "projection_dim": 8},
            ignore_mismatched_sizes=True,
        )


def test_predicted_attention_rebuilds_the_decoder_masks_the_model_builds_and_reads_a_mask_passed_in(monkeypatch):
    """The decoder mask the model builds from its padding mask is causality and padded keys only, so predicted
    attention rebuilds it (no mask to read: its pairs can go to the fused kernel as codes); a 4D mask passed in may
    say more, and is read."""
    from hf_sparse import sparsefinder

    model = model_with(threshold=0.5)
    fit(model, loader(2), epochs=1, progress=False)
    model.config.sparsefinder["enabled"] = True
    ids, mask, decoder = batch(9)
    seen = []
    real = sparsefinder.attend_predicted
    monkeypatch.setattr(sparsefinder, "attend_predicted", lambda *a, **kw: seen.append(kw["allowed"]) or real(*a, **kw))
    length = decoder.shape[1]
    custom = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(decoder.shape[0], 1, -1, -1).clone()
    custom[..., 2] = False  # no query may see key 2: beyond causality and padding
    with torch.no_grad():
        built = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        assert seen and all(allowed is None for allowed in seen)
        seen.clear()
        passed = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, decoder_attention_mask=custom)
        assert seen and all(allowed is not None and not allowed[..., 2].any() for allowed in seen)
    assert (passed.logits - built).abs().max() > 1e-4  # key 2 left out
