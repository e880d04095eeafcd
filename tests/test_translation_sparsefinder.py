"""The translation Sparsefinder run (``hf_sparse.translation_sparsefinder``) end to end on real gettext pairs, tiny:
train, fit, sweep, operating point, test metrics, and a saved checkpoint that reloads through remote code."""

import csv
import json
import os

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import BertConfig, MarianConfig, MarianMTModel

from hf_sparse import EntmaxSparsefinderMarianConfig, EntmaxSparsefinderMarianMTModel
from hf_sparse.sparsefinder import predict_pairs
from hf_sparse.translation import ParallelCorpus, gettext_parallel_corpus, teacher_forced_batches
from hf_sparse.translation_sparsefinder import MT_SWEEP, load_pairs, run_translation_sparsefinder

# A few real steps at a high learning rate: enough for entmax to drop pairs (a fresh model's attention is uniform).
TINY = dict(steps=40, batch_size=16, learning_rate=5e-3, max_length=24, fit_sentences=32, fit_epochs=1)
NEW_MODEL = dict(vocab_size=300, d_model=32)


@pytest.fixture(scope="module")
def corpus():
    full = gettext_parallel_corpus("de", dev_size=16, test_size=16, seed=0)
    return ParallelCorpus(train=full.train[:256], dev=full.dev, test=full.test)


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("mt_sparsefinder")
    return run_translation_sparsefinder(pairs=corpus, target_recall=0.9, output_dir=str(out), **TINY, **NEW_MODEL)


def test_metrics_json_holds_every_measurement_in_range_and_the_operating_point_of_the_dev_sweep(run, corpus):
    with open(os.path.join(run.model_dir, "metrics.json")) as handle:
        metrics = json.load(handle)
    assert metrics == run.metrics
    fractions = [
        f"{split}_{name}" for split in ("dev", "test") for name in ("gold_sparsity", "graph_sparsity", "recall")
    ]
    scores = [f"test_{m}_{kind}" for m in ("bleu", "chrf") for kind in ("full_entmax", "predicted_sparse")]
    for key in fractions:
        assert 0.0 <= metrics[key] <= 1.0, key
    for key in scores:
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["dev_gold_sparsity"] > 0  # the trained model's entmax drops pairs: the sweep measures something
    counts = {"train_pairs": 256, "dev_pairs": 16, "test_pairs": 16, "fit_pairs": 32, "training_steps": 40}
    assert {k: metrics[k] for k in counts} == counts
    assert metrics["final_training_loss"] > 0 and metrics["method"] == "distance"

    # The operating point, recomputed from the CSV: the sparsest distance setting with dev recall >= 0.9.
    with open(os.path.join(os.path.dirname(run.model_dir), "pareto.csv")) as handle:
        rows = list(csv.DictReader(handle))
    assert {r["method"] for r in rows} == set(MT_SWEEP)  # every method swept, for the plot
    distance = [r for r in rows if r["method"] == "distance"]
    assert len(distance) == len(MT_SWEEP["distance"])
    good = [r for r in distance if float(r["recall"]) >= 0.9]
    best = max(good, key=lambda r: float(r["graph_sparsity"]))
    assert metrics["target_recall_reached"] is True and metrics["operating_point"] == best["setting"]
    assert metrics["dev_recall"] == pytest.approx(float(best["recall"]))
    assert metrics["dev_graph_sparsity"] == pytest.approx(float(best["graph_sparsity"]))
    threshold = float(best["setting"].removeprefix("threshold="))
    assert run.model.config.sparsefinder["threshold"] == threshold and run.model.config.sparsefinder["enabled"]


def test_card_names_the_operating_point_and_shows_the_pareto_plot(run):
    card = open(os.path.join(run.model_dir, "README.md")).read()
    setting = run.metrics["operating_point"]
    assert f"Operating point **distance {setting}**" in card
    assert f"threshold={run.model.config.sparsefinder['threshold']}" in card
    assert "![predicted-graph sparsity vs recall" in card and "(pareto.png)" in card
    assert "AutoModelForSeq2SeqLM" in card and "pipeline_tag: translation" in card
    assert "attends **only to the predicted pairs**" in card
    assert os.path.getsize(os.path.join(run.model_dir, "pareto.png")) > 10_000


def test_saved_checkpoint_reloads_without_hf_sparse_with_the_fitted_predictors(run, corpus, tmp_path):
    """In a process that cannot import hf_sparse: same predicted pairs, same predicted-sparse logits on a padded
    batch, same beam search as the model in memory; and predicted-sparse logits differ from full entmax ones, so
    the predictors are really in use."""
    from test_remote_code import run_without_hf_sparse

    model = run.model.eval()
    inputs = teacher_forced_batches(model, run.tokenizer, corpus.test[:6], max_length=24)[0]
    assert not inputs["attention_mask"].all() and not inputs["decoder_attention_mask"].all()  # padded both sides
    g = torch.Generator().manual_seed(0)
    heads, head_dim = model.config.decoder_attention_heads, model.config.d_model // model.config.decoder_attention_heads
    probe = (3 * torch.randn(2, heads, 12, head_dim, generator=g), 3 * torch.randn(2, heads, 12, head_dim, generator=g))
    got = run_without_hf_sparse(tmp_path, "AutoModelForSeq2SeqLM", {**inputs, "probe": probe}, run.model_dir)

    assert got["class"] == "EntmaxSparsefinderMarianMTModel" and got["config"]["sparsefinder"]["enabled"]
    settings = model.config.sparsefinder
    for layer, attn in model.sparsefinder_modules().items():
        want = predict_pairs(attn.sparsefinder, *probe, settings, None, causal=True)
        assert torch.equal(got["pairs"][layer], want)
        assert 0 < want.sum() < torch.ones(12, 12).tril().sum() * want.shape[0] * heads  # the projections decide
    with torch.no_grad():
        sparse = model(**inputs).logits
        model.config.sparsefinder = {**settings, "enabled": False}
        full = model(**inputs).logits
        model.config.sparsefinder = settings
        generated = model.generate(
            inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=6, num_beams=2
        )
    assert torch.allclose(got["logits"], sparse, atol=1e-5)
    assert (sparse - full).abs().max() > 1e-4
    assert torch.equal(got["generated"], generated)


def test_a_datasetdict_of_real_pairs_refits_a_saved_checkpoint_with_another_method(run, corpus, tmp_path):
    """Named columns, no test split (carved from validation), a checkpoint holding distance predictors refitted as
    clustering; steps=0 keeps the translation weights exactly."""

    def split(pairs):
        return Dataset.from_dict({"en": [s for s, _ in pairs], "de": [t for _, t in pairs]})

    data = DatasetDict(train=split(corpus.train[:64]), validation=split(corpus.dev + corpus.test))
    again = run_translation_sparsefinder(
        model=run.model_dir,
        pairs=data,
        source_column="en",
        target_column="de",
        steps=0,
        method="clustering",
        compare_methods=False,
        dev_size=20,
        test_size=12,
        max_length=24,
        fit_sentences=32,
        fit_epochs=1,
        output_dir=str(tmp_path),
    )
    assert again.corpus.dev == (corpus.dev + corpus.test)[:20] and again.corpus.test == (corpus.dev + corpus.test)[20:]
    assert (again.metrics["dev_pairs"], again.metrics["test_pairs"], again.metrics["train_pairs"]) == (20, 12, 64)
    assert {r["method"] for r in again.rows} == {"clustering"}
    source = run.model.state_dict()
    for name, value in again.model.state_dict().items():
        if ".sparsefinder." not in name:
            assert torch.equal(value, source[name]), name
    chosen = again.model.config.sparsefinder
    assert (
        chosen["method"] == "clustering"
        and again.metrics["operating_point"] == f"num_clusters={chosen['num_clusters']}"
    )
    reloaded = EntmaxSparsefinderMarianMTModel.from_pretrained(again.model_dir)
    for attn in reloaded.sparsefinder_modules().values():
        assert attn.sparsefinder.centroids.shape[1] == chosen["num_clusters"] and attn.sparsefinder.is_fitted()


def test_a_stock_softmax_marian_is_fine_tuned_as_entmax_at_the_fine_tuning_learning_rate(run, corpus, tmp_path):
    """A plain ``MarianMTModel`` checkpoint (model_type marian, softmax everywhere) with a tokenizer: its decoder
    self-attention becomes 1.5-entmax, it trains, gets fitted predictors, and is saved as ours."""
    ours = set(EntmaxSparsefinderMarianConfig().to_dict()) - set(MarianConfig().to_dict())
    stock = MarianMTModel(MarianConfig(**{k: v for k, v in run.model.config.to_dict().items() if k not in ours}))
    stock.load_state_dict({k: v for k, v in run.model.state_dict().items() if ".sparsefinder." not in k})
    stock.save_pretrained(tmp_path / "stock")
    run.tokenizer.save_pretrained(tmp_path / "stock")
    small = ParallelCorpus(train=corpus.train[:64], dev=corpus.dev[:8], test=corpus.test[:8])
    tuned = run_translation_sparsefinder(
        model=str(tmp_path / "stock"),
        pairs=small,
        steps=3,
        batch_size=16,
        max_length=24,
        fit_sentences=16,
        fit_epochs=1,
        compare_methods=False,
        enabled=False,
        output_dir=str(tmp_path / "out"),
    )
    assert tuned.settings["learning_rate"] == 5e-5 and len(tuned.train_losses) == 3
    source = stock.state_dict()
    trained = [n for n, v in tuned.model.state_dict().items() if n in source and not torch.equal(v, source[n])]
    assert trained
    saved = EntmaxSparsefinderMarianMTModel.from_pretrained(tuned.model_dir)
    assert saved.config.model_type == "entmax_sparsefinder_marian" and saved.config.decoder_attention_fn == "entmax15"
    assert saved.config.encoder_attention_fn == "softmax" and not saved.config.sparsefinder["enabled"]
    assert all(attn.sparsefinder.is_fitted() for attn in saved.sparsefinder_modules().values())


def test_load_pairs_takes_dev_and_test_from_their_splits_in_order(corpus):
    def split(pairs):
        return Dataset.from_dict({"source": [s for s, _ in pairs], "target": [t for _, t in pairs]})

    data = DatasetDict(train=split(corpus.train[:5]), validation=split(corpus.dev), test=split(corpus.test))
    got = load_pairs(data, dev_size=3, test_size=100)
    assert got.train == corpus.train[:5] and got.dev == corpus.dev[:3] and got.test == corpus.test


def test_load_pairs_reads_hugging_face_translation_rows_and_logs_where_the_test_pairs_come_from(corpus, caplog):
    """The ``translation`` column of {language: text} dicts (as wmt16 / opus_books hold it): the chosen languages
    become the pairs in either direction; the test pairs are the test split's when there is one, else validation
    pairs after the dev pairs, and the log says which."""
    from datasets import Features, Translation

    features = Features({"translation": Translation(languages=["de", "en"])})

    def split(pairs):
        return Dataset.from_dict({"translation": [{"en": s, "de": t} for s, t in pairs]}, features=features)

    with_test = DatasetDict(train=split(corpus.train[:6]), validation=split(corpus.dev), test=split(corpus.test))
    with caplog.at_level("INFO", logger="hf_sparse"):
        got = load_pairs(with_test, source_lang="en", target_lang="de", dev_size=4, test_size=10)
    assert got.train == corpus.train[:6] and got.dev == corpus.dev[:4] and got.test == corpus.test[:10]
    assert "test pairs: the first 10 of the dataset's test split" in caplog.text
    flipped = load_pairs(with_test, source_lang="de", target_lang="en", dev_size=4, test_size=10)
    assert flipped.test == [(t, s) for s, t in corpus.test[:10]]

    caplog.clear()
    without = DatasetDict(train=split(corpus.train[:6]), validation=split(corpus.dev))
    with caplog.at_level("INFO", logger="hf_sparse"):
        got = load_pairs(without, source_lang="en", target_lang="de", dev_size=4, test_size=10)
    assert got.dev == corpus.dev[:4] and got.test == corpus.dev[4:14]
    assert "test pairs: validation pairs 4-13 (the dataset has no test split" in caplog.text


def _bad_cases(tmp_path, corpus, run):
    bert, marian = tmp_path / "bert", tmp_path / "marian_without_tokenizer"
    BertConfig().save_pretrained(bert)
    MarianConfig().save_pretrained(marian)

    def split(sources, targets):
        return Dataset.from_dict({"source": sources, "target": targets})

    few = corpus.train[:4]
    good = split([s for s, _ in few], [t for _, t in few])
    flat = Dataset.from_dict({"translation": [s for s, _ in few]})  # a text column by that name, not language dicts
    small = ParallelCorpus(train=few, dev=few, test=few)
    return [
        ({"model": str(bert), "pairs": small}, ValueError, "is a 'bert' checkpoint; valid: a Marian checkpoint"),
        ({"model": str(tmp_path / "nothing"), "pairs": small}, ValueError, "no checkpoint there"),
        ({"model": str(marian), "pairs": small}, ValueError, "has no tokenizer that loads with AutoTokenizer"),
        ({"model": run.model_dir, "d_model": 16, "pairs": small}, ValueError, "d_model shape a new model only"),
        ({"model": run.model_dir, "max_length": 65, "pairs": small}, ValueError, "max_position_embeddings 64"),
        ({"method": "window", "pairs": small}, ValueError, "method must be one of distance, quantization, clust"),
        (
            {"target_recall": 1.5, "pairs": small},
            ValueError,
            "target_recall must be a finite number > 0 and <= 1, got 1.5",
        ),
        ({"steps": -1, "pairs": small}, ValueError, "steps must be a whole number >= 0, got -1"),
        ({"steps": 0, "pairs": small}, ValueError, "steps=0 without a model"),
        ({"d_model": 30, "pairs": small}, ValueError, "multiple of the 4 attention heads, got 30"),
        ({"fit_epochs": 0, "pairs": small}, ValueError, "fit_epochs must be a whole number >= 1"),
        ({"dev_size": 10**6}, ValueError, "cannot hold out 1000500"),
        ({"lang": "xx"}, ValueError, "no gettext catalogues for language 'xx'"),
        ({"pairs": few}, TypeError, "pairs must be None .gettext., a ParallelCorpus or a datasets.DatasetDict"),
        ({"pairs": ParallelCorpus(train=few, dev=few, test=[])}, ValueError, "the ParallelCorpus has no test pairs"),
        ({"pairs": DatasetDict(train=good)}, ValueError, r"no \['validation'\] split.*its splits: \['train'\]"),
        (
            {"pairs": DatasetDict(train=good, validation=good), "source_column": "en"},
            ValueError,
            r"split 'train' has no column\(s\) \['en'\]; its columns: \['source', 'target'\]",
        ),
        (
            {"pairs": DatasetDict(train=good, validation=good), "dev_size": 3, "test_size": 2},
            ValueError,
            "validation split has 4 pairs: too few to hold out dev_size=3 \\+ test_size=2",
        ),
        (
            {"pairs": DatasetDict(train=split(["a b", "  "], ["c d", "e"]), validation=good)},
            ValueError,
            r"split 'train': rows \[1\] have an empty or non-text",
        ),
        # Hugging Face's translation format: languages of a 'translation' column instead of two columns
        ({"source_lang": "de", "pairs": small}, ValueError, "give source_lang and target_lang together"),
        ({"source_column": "en", "pairs": small}, ValueError, "source_column picks the columns .* pairs is Parallel"),
        ({"source_lang": "de", "target_lang": "de"}, ValueError, "source_lang and target_lang are both 'de'"),
        (
            {"pairs": DatasetDict(train=good, validation=good), "source_lang": "de", "target_lang": "en"}
            | {"target_column": "target"},
            ValueError,
            "target_column with source_lang / target_lang is ambiguous",
        ),
        (
            {"source_lang": "en", "target_lang": "de"},
            ValueError,
            "source_lang and target_lang pick the columns or the 'translation' languages of a datasets.DatasetDict; "
            r"pairs is None \(the gettext pairs",
        ),
        (
            {"pairs": DatasetDict(train=good, validation=good), "source_lang": "de", "target_lang": "en"},
            ValueError,
            r"split 'train' has no column 'translation' .*its columns: \['source', 'target'\]",
        ),
        (
            {"pairs": DatasetDict(train=flat, validation=flat), "source_lang": "de", "target_lang": "en"},
            ValueError,
            r"column 'translation' holds Value\('string'\), not one \{language: text\} dict per row",
        ),
    ]


def test_bad_inputs_fail_before_any_work_naming_the_bad_value(run, corpus, tmp_path):
    for kwargs, error, message in _bad_cases(tmp_path, corpus, run):
        out = tmp_path / "out"
        with pytest.raises(error, match=message):
            run_translation_sparsefinder(**{**TINY, **kwargs, "output_dir": str(out)})
        assert not out.exists(), kwargs
