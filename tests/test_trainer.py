import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

from conftest import tiny_kwargs, tiny_tokenizer
from hf_sparse import SparseBertConfig, SparseBertForSequenceClassification

POSITIVE = ["a good movie", "a great film", "the film was very good", "it is a great movie and good"]
NEGATIVE = ["a bad movie", "an awful film", "the film was very bad", "it is not good and awful"]


def _dataset(tok) -> Dataset:
    texts = (POSITIVE + NEGATIVE) * 4
    labels = ([1] * len(POSITIVE) + [0] * len(NEGATIVE)) * 4
    return Dataset.from_dict({"text": texts, "label": labels}).map(lambda b: tok(b["text"]), batched=True)


def test_trainer_with_sparse_pattern_reduces_loss_and_checkpoint_reloads(tmp_path):
    tok = tiny_tokenizer()
    data = _dataset(tok).remove_columns("text")
    config = SparseBertConfig(**tiny_kwargs(attention_pattern="window:1+global:1", num_labels=2))
    model = SparseBertForSequenceClassification(config)
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=10,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorWithPadding(tok))
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3

    trainer.save_model(str(tmp_path / "final"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    assert type(reloaded) is SparseBertForSequenceClassification
    assert reloaded.config.attention_pattern == "window:1+global:1"
    batch = tok(POSITIVE, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)


def test_evaluate_during_a_dam_search_hands_compute_metrics_the_logits_alone(tmp_path):
    """The search's dam_penalty and dam_density are outputs too; Trainer once added them to the predictions, so the
    usual compute_metrics (argmax over the logits) failed on a tuple of logits and per-batch scalars."""
    import numpy as np

    g = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(5, 20, (16,), generator=g).tolist(), "attention_mask": [1] * 16, "labels": i % 2}
        for i in range(12)
    ]
    seen = []

    def accuracy(prediction):
        seen.append(np.shape(prediction.predictions))
        return {"acc": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    dam = {"structure": "offset", "max_length": 16}
    model = SparseBertForSequenceClassification(SparseBertConfig(**tiny_kwargs(attention_pattern="window:3", dam=dam)))
    args = TrainingArguments(tmp_path, per_device_eval_batch_size=8, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, eval_dataset=data, compute_metrics=accuracy)
    assert "eval_acc" in trainer.evaluate()
    assert trainer.predict(data).predictions.shape == (12, model.config.num_labels)
    assert seen == [(12, model.config.num_labels)] * 2
