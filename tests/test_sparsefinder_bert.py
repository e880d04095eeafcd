"""Sparsefinder on an entmax SparseBERT encoder: the same predictor code as the Marian decoder, bidirectional."""

import pytest
import torch

from conftest import random_batch, tiny_kwargs
from hf_sparse import SparseBertConfig, SparseBertForMaskedLM
from hf_sparse.attention import AttentionMask, attend, build_mask
from hf_sparse.evaluation import sparsity_recall
from hf_sparse.patterns import dense_mask, parse
from hf_sparse.sparsefinder import predict_pairs
from hf_sparse.sparsefinder_fit import fit

METHOD_SETTINGS = [
    {"method": "distance", "threshold": 0.8},
    {"method": "distance", "top_k": 3},
    {"method": "quantization", "num_buckets": 3},
    {"method": "clustering", "num_clusters": 3},
    {"method": "window", "window": 2},
    {"method": "lsh", "num_buckets": 4},
    {"method": "routing", "num_clusters": 3},
    {"method": "bigbird", "random_keys": 2},
]


def entmax_bert(pattern="dense", **sparsefinder):
    torch.manual_seed(0)
    config = SparseBertConfig(
        **tiny_kwargs(
            attention_fn="entmax15",
            attention_pattern=pattern,
            sparsefinder={"method": "distance", "window": 1, **sparsefinder},
        )
    )
    model = SparseBertForMaskedLM(config).eval()
    with torch.no_grad():  # sharper scores so entmax is clearly sparse at random initialisation
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(8.0)
    return model


def loader(n=3):
    return [dict(zip(("input_ids", "attention_mask"), random_batch(seed=s))) for s in range(n)]


@pytest.mark.parametrize("settings", METHOD_SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_encoder_sparse_execution_equals_float64_dense_entmax_on_the_predicted_pairs_with_padding(settings):
    model = entmax_bert(**settings).double()
    fit(model, loader(), epochs=1, progress=False)
    attention = model.bert.encoder.layer[0].attention.self
    ids, valid = random_batch(seed=11)
    hidden = model.bert.embeddings(ids).double()
    mask = build_mask(parse("dense"), valid.bool(), ids.shape[1], torch.device("cpu"), "eager")
    model.config.sparsefinder["enabled"] = True
    with torch.no_grad():
        got, _ = attention(hidden, mask)
        shape = (*hidden.shape[:-1], -1, attention.attention_head_size)
        q, k, v = (lin(hidden).view(shape).transpose(1, 2) for lin in (attention.query, attention.key, attention.value))
        pairs = predict_pairs(attention.sparsefinder, q, k, model.config.sparsefinder, valid.bool(), causal=False)
        want, _ = attend(
            q, k, v, AttentionMask("eager", keep=pairs), scaling=attention.scaling, attention_fn="entmax15"
        )
    assert not pairs[~valid.bool()[:, None, None, :].expand_as(pairs)].any()  # never a padding key
    assert not pairs.all()
    assert torch.allclose(got, want.reshape(got.shape), atol=1e-10)


def test_recall_and_sparsity_agree_with_a_brute_force_count_excluding_padding():
    model = entmax_bert(threshold=0.5)
    fit(model, loader(), epochs=2, progress=False)
    result = sparsity_recall(model, loader(1), progress=False)
    ids, valid = loader(1)[0].values()
    model.config.sparsefinder["enabled"] = False
    probs = model(ids, attention_mask=valid, output_attentions=True).attentions
    for layer, attention in model.sparsefinder_modules().items():
        # recompute this layer's q, k from its input hidden state
        hidden = model(ids, attention_mask=valid, output_hidden_states=True).hidden_states[layer]
        shape = (*hidden.shape[:-1], -1, attention.attention_head_size)
        q, k = (lin(hidden).view(shape).transpose(1, 2) for lin in (attention.query, attention.key))
        pred = predict_pairs(attention.sparsefinder, q, k, model.config.sparsefinder, valid.bool(), causal=False)
        sparsity, recall = [], []
        for b in range(ids.shape[0]):
            n = int(valid[b].sum())
            row_s, row_r = [], []
            for h in range(q.shape[1]):
                gold = {(i, j) for i in range(n) for j in range(n) if probs[layer][b, h, i, j] > 0}
                predicted = {(i, j) for i in range(n) for j in range(n) if pred[b, h, i, j]}
                row_s.append(1 - len(predicted) / (n * n))
                row_r.append(len(gold & predicted) / len(gold))
            sparsity.append(row_s)
            recall.append(row_r)
        per_layer = result["per_layer"][layer]
        assert torch.allclose(per_layer["graph_sparsity"], torch.tensor(sparsity, dtype=torch.float64).mean(0))
        assert torch.allclose(per_layer["recall"], torch.tensor(recall, dtype=torch.float64).mean(0))


@pytest.mark.parametrize("combine", ["intersection", "union"])
def test_prediction_combines_with_a_fixed_pattern(combine):
    model = entmax_bert(pattern="window:2+global:1", combine=combine, method="window", window=4)
    fit(model, loader(1), epochs=1, progress=False)
    model.config.sparsefinder["enabled"] = True
    ids, valid = random_batch(seed=3)
    probs = model(ids, attention_mask=valid, output_attentions=True).attentions[0]
    pattern = dense_mask("window:2+global:1", ids.shape[1])[None]
    i = torch.arange(ids.shape[1])
    predicted = ((i[:, None] - i[None]).abs() <= 4)[None, None]
    allowed = (pattern & predicted if combine == "intersection" else pattern | predicted) & valid.bool()[:, None, None]
    assert (probs[~allowed.expand_as(probs)] == 0).all()
    # union reaches beyond the pattern, intersection never does
    beyond = (probs > 0) & ~pattern
    assert beyond.any() == (combine == "union")


@pytest.mark.parametrize("pattern", ["dense", "window:2+global:1"])
def test_a_union_with_the_pattern_is_the_same_with_or_without_an_all_ones_attention_mask(pattern):
    """The padding mask is never taken for the pattern: with every token real, passing it changes nothing."""
    model = entmax_bert(pattern=pattern, combine="union", method="window", window=1)
    fit(model, loader(1), epochs=1, progress=False)
    model.config.sparsefinder["enabled"] = True
    ids, _ = random_batch(seed=4)
    with torch.no_grad():
        without = model(ids, output_attentions=True)
        ones = model(ids, attention_mask=torch.ones_like(ids), output_attentions=True)
    assert torch.equal(without.logits, ones.logits)
    for a, b in zip(without.attentions, ones.attentions):
        assert torch.equal(a > 0, b > 0)


def test_fitted_encoder_predictors_round_trip_through_remote_code(tmp_path):
    from test_remote_code import run_without_hf_sparse

    model = entmax_bert(threshold=0.6)
    fit(model, loader(), epochs=2, progress=False)
    model.config.sparsefinder["enabled"] = True
    model.save_pretrained(tmp_path / "ckpt")
    inputs = loader(1)[0]
    g = torch.Generator().manual_seed(1)
    probe = (torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 4, 12, 8, generator=g))
    got = run_without_hf_sparse(tmp_path, "AutoModelForMaskedLM", {**inputs, "probe": probe}, str(tmp_path / "ckpt"))
    for layer, attention in model.sparsefinder_modules().items():
        want = predict_pairs(attention.sparsefinder, *probe, model.config.sparsefinder, None, causal=True)
        assert torch.equal(got["pairs"][layer], want)
    with torch.no_grad():
        assert torch.equal(got["logits"], model(**inputs).logits)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(attention_fn="softmax", sparsefinder={"method": "distance"}), "nothing to predict"),
        (dict(attention_fn="entmax15", sparsefinder={"method": "distance", "layers": [5]}), "layers \\[5\\]"),
        (dict(attention_fn="entmax15", sparsefinder={"method": "distance", "combine": "xor"}), "combine 'xor'"),
    ],
)
def test_bad_sparsefinder_settings_are_refused(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SparseBertConfig(**tiny_kwargs(**kwargs))


def test_unfitted_encoder_predictors_are_refused_when_enabled():
    model = entmax_bert(enabled=True)
    with pytest.raises(ValueError, match="predictor of layer 0 is not fitted"):
        model(*random_batch())


def test_stock_bert_checkpoint_fine_tunes_to_entmax_attention_with_trainer(tmp_path):
    from transformers import BertForMaskedLM, Trainer, TrainingArguments

    from conftest import premasked_mlm_dataset, tiny_bert_config

    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path / "bert")
    model = SparseBertForMaskedLM.from_pretrained(tmp_path / "bert", attention_fn="entmax15")
    with torch.no_grad():  # random BERT weights give near-uniform scores; sharpen them so entmax has zeros to show
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(200.0)
    args = TrainingArguments(
        str(tmp_path / "run"),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=premasked_mlm_dataset())
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert sum(losses[-3:]) < sum(losses[:3])
    ids, mask = random_batch()
    probs = model.eval()(ids, attention_mask=mask, output_attentions=True).attentions
    valid = mask.bool()[:, None, None, :].expand_as(probs[0])
    assert all((p[valid] == 0).any() for p in probs)  # entmax: exact zeros among real tokens
    assert all(torch.allclose(p.sum(-1), torch.ones(())) for p in probs)


def test_sparsefinder_settings_given_to_a_built_encoder_are_refused_not_ignored():
    """Predictors are made when the model is built; enabled settings set afterwards once ran exact attention in
    every layer, silently (the twin of the Marian decoder's check)."""
    model = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(attention_fn="entmax15"))).eval()
    model.config.sparsefinder = {"method": "window", "enabled": True}
    ids, mask = random_batch()
    with pytest.raises(ValueError, match=r"layers \[0, 1\] have no predictor.*from_pretrained\(path, sparsefinder="):
        model(ids, attention_mask=mask)
    model.config.sparsefinder = {"method": "window", "enabled": False}  # not enabled: nothing to refuse
    model(ids, attention_mask=mask)
