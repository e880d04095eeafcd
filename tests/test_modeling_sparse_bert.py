import pytest
import torch
from transformers import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    pipeline,
)

from conftest import random_batch, tiny_bert_config, tiny_kwargs, tiny_tokenizer
from hf_sparse import (
    SparseBertConfig,
    SparseBertForMaskedLM,
    SparseBertForMultipleChoice,
    SparseBertForQuestionAnswering,
    SparseBertForSequenceClassification,
    SparseBertForTokenClassification,
    SparseBertModel,
)
from test_patterns import EVERY_SPEC

PAIRS = [
    (BertModel, SparseBertModel),
    (BertForMaskedLM, SparseBertForMaskedLM),
    (BertForSequenceClassification, SparseBertForSequenceClassification),
    (BertForTokenClassification, SparseBertForTokenClassification),
    (BertForQuestionAnswering, SparseBertForQuestionAnswering),
    (BertForMultipleChoice, SparseBertForMultipleChoice),
]


def _pair(stock_cls, sparse_cls, **overrides):
    stock = stock_cls(tiny_bert_config(**overrides)).eval()
    sparse = sparse_cls(SparseBertConfig(**tiny_kwargs(**overrides))).eval()
    result = sparse.load_state_dict(stock.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return stock, sparse


@pytest.mark.parametrize("stock_cls, sparse_cls", PAIRS, ids=[p[1].__name__ for p in PAIRS])
@pytest.mark.parametrize("backend", ["auto", "eager", "sdpa", "tiles"])
def test_dense_pattern_equals_stock_bert_with_padding(stock_cls, sparse_cls, backend):
    stock, sparse = _pair(stock_cls, sparse_cls, num_labels=2 if stock_cls is BertForQuestionAnswering else 3)
    sparse.config.attention_backend = backend
    ids, mask = random_batch()
    if stock_cls is BertForMultipleChoice:
        ids, mask = ids.view(1, 3, -1), mask.view(1, 3, -1)
    with torch.no_grad():
        want = stock(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        got = sparse(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    keys = [k for k in want.keys() if k != "hidden_states"]
    assert keys and keys == [k for k in got.keys() if k != "hidden_states"]
    for key in keys:
        assert torch.allclose(want[key], got[key], atol=1e-5), key
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for a, b in zip(want.hidden_states, got.hidden_states):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("spec", EVERY_SPEC)
def test_stock_checkpoint_loads_for_every_pattern_without_missing_or_unexpected_keys(tmp_path, spec):
    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path)
    model, info = SparseBertForMaskedLM.from_pretrained(tmp_path, attention_pattern=spec, output_loading_info=True)
    assert model.config.attention_pattern == spec
    assert model.config.model_type == "sparse_bert"
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    stock = BertForMaskedLM.from_pretrained(tmp_path)
    for name, tensor in stock.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_base_model_checkpoint_loads_into_headed_model_and_back(tmp_path):
    BertModel(tiny_bert_config(), add_pooling_layer=False).save_pretrained(tmp_path / "base")
    mlm = SparseBertForMaskedLM.from_pretrained(tmp_path / "base")
    stock = BertModel.from_pretrained(tmp_path / "base", add_pooling_layer=False)
    assert torch.equal(mlm.bert.embeddings.word_embeddings.weight, stock.embeddings.word_embeddings.weight)
    mlm.save_pretrained(tmp_path / "mlm")
    base = SparseBertModel.from_pretrained(tmp_path / "mlm", add_pooling_layer=False)
    assert torch.equal(base.encoder.layer[1].output.dense.weight, mlm.bert.encoder.layer[1].output.dense.weight)


@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_no_diagonal_gives_exact_zero_self_attention_in_every_layer_and_head(backend):
    model = SparseBertModel(SparseBertConfig(**tiny_kwargs(attention_pattern="no_diagonal"))).eval()
    model.config.attention_backend = backend
    ids, mask = random_batch()
    out = model(ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 2
    for probs in out.attentions:
        assert (probs.diagonal(dim1=-2, dim2=-1) == 0).all()
        # nothing else is masked: every valid off-diagonal key of a valid query gets positive probability
        valid_pair = (mask[:, None, :, None] * mask[:, None, None, :]).bool() & ~torch.eye(20, dtype=torch.bool)
        assert (probs[valid_pair.expand_as(probs)] > 0).all()
        assert torch.allclose(probs.sum(-1)[mask.bool()[:, None].expand(-1, 4, -1)], torch.tensor(1.0))


@pytest.mark.parametrize("attention_fn", ["softmax", "entmax15"])
def test_every_kernel_gives_the_eager_outputs_and_gradients_for_a_sparse_pattern_with_padding(attention_fn):
    ids, mask = random_batch()
    config = SparseBertConfig(**tiny_kwargs(attention_pattern="window:3+global:1", attention_fn=attention_fn))
    model = SparseBertForMaskedLM(config).train()
    model.config.attention_probs_dropout_prob = model.config.hidden_dropout_prob = 0.0
    backends = ["eager", "tiles"] + (["sdpa"] if attention_fn == "softmax" else [])
    results = {}
    for backend in backends:
        model.config.attention_backend = backend
        model.zero_grad()
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        results[backend] = (out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    if attention_fn == "softmax":  # flex: inference only on CPU
        model.eval().config.attention_backend = "flex"
        with torch.no_grad():
            results["flex"] = (model(ids, attention_mask=mask).logits, results["eager"][1])
    for backend, (logits, grads) in results.items():
        assert torch.allclose(logits, results["eager"][0], atol=1e-5), backend
        for got, want in zip(grads, results["eager"][1]):
            assert torch.allclose(got, want, atol=1e-5), backend


def test_pattern_applies_in_every_layer_with_padding():
    model = SparseBertModel(SparseBertConfig(**tiny_kwargs(attention_pattern="window:2+global:1"))).eval()
    ids, mask = random_batch()
    probs = model(ids, attention_mask=mask, output_attentions=True).attentions
    i = torch.arange(20)
    allowed = ((i[:, None] - i[None]).abs() <= 2) | (i[:, None] < 1) | (i[None] < 1)
    allowed = allowed[None, None] & mask.bool()[:, None, None, :]
    for p in probs:
        assert (p[~allowed.expand_as(p)] == 0).all()
        assert (p[allowed.expand_as(p)] > 0).all()


def test_sparse_pattern_changes_outputs_and_sdpa_equals_eager():
    ids, mask = random_batch()
    model = SparseBertModel(SparseBertConfig(**tiny_kwargs(attention_pattern="strided:3"))).eval()
    with torch.no_grad():
        sparse = model(ids, attention_mask=mask).last_hidden_state
        model.config.attention_backend = "eager"
        eager = model(ids, attention_mask=mask).last_hidden_state
        model.config.attention_pattern = "dense"
        dense = model(ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(sparse, eager, atol=1e-5)
    assert (sparse - dense).abs().max() > 1e-3


def test_output_attentions_and_hidden_states_flags_and_tuple_return():
    model = SparseBertForSequenceClassification(SparseBertConfig(**tiny_kwargs(attention_pattern="star"))).eval()
    ids, mask = random_batch()
    out = model(ids, attention_mask=mask)
    assert out.attentions is None and out.hidden_states is None
    tup = model(ids, attention_mask=mask, return_dict=False, output_hidden_states=True)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.logits) and len(tup[1]) == 3


def test_gradient_checkpointing_gives_the_same_gradients():
    """Through Transformers' own machinery (the layers are GradientCheckpointingLayers): the backward pass
    recomputes each layer's attention (run twice) and the gradients are those of the plain run."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    ids, mask = random_batch()
    labels = ids.clone()
    model = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(attention_pattern="window:3"))).train()
    runs = []
    model.bert.encoder.layer[0].attention.register_forward_hook(lambda *_: runs.append(1))
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    assert len(runs) == 1
    model.zero_grad()
    model.activation_checkpointing_enable()
    layers = model.bert.encoder.layer
    assert all(isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing for layer in layers)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert len(runs) == 3  # once in the forward, once more when the backward recomputes it
    for a, p in zip(plain, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_resize_token_embeddings_keeps_weights_tied():
    model = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(attention_pattern="window:3")))
    old = model.config.vocab_size
    model.resize_token_embeddings(old + 7)
    assert model.get_input_embeddings().weight.shape[0] == old + 7
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids, mask = random_batch()
    ids[0, 0] = old + 6
    assert model(ids, attention_mask=mask).logits.shape[-1] == old + 7


@pytest.mark.parametrize("attention_fn", ["softmax", "entmax15"])
def test_torch_compile_of_the_model_matches_eager_mode(attention_fn):
    """entmax15 (hf_sparse.entmax_topk) has data-dependent control flow: compile graph-breaks around it, and the
    compiled model must still give the same logits and train."""
    config = SparseBertConfig(**tiny_kwargs(attention_pattern="bigbird:2,1,2", attention_fn=attention_fn))
    model = SparseBertForMaskedLM(config).eval()
    ids, mask = random_batch()
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = torch.compile(model)(ids, attention_mask=mask).logits
    assert torch.allclose(want, got, atol=1e-5)
    if attention_fn != "softmax":
        model.train()
        torch.compile(model)(ids, attention_mask=mask, labels=ids).loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)


def test_fill_mask_and_text_classification_pipelines(tmp_path):
    tok = tiny_tokenizer()
    mlm = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(attention_pattern="window:2+global:1")))
    fill = pipeline("fill-mask", model=mlm, tokenizer=tok)
    preds = fill("the cat [MASK] on the mat", top_k=3)
    assert len(preds) == 3 and all(p["token_str"] in tok.get_vocab() for p in preds)
    clf = SparseBertForSequenceClassification(
        SparseBertConfig(**tiny_kwargs(attention_pattern="no_diagonal", num_labels=2, id2label={0: "neg", 1: "pos"}))
    )
    clf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    result = pipeline("text-classification", model=str(tmp_path))(["a good movie", "a very bad film and not great"])
    assert [r["label"] in ("neg", "pos") for r in result] == [True, True]


def test_sequence_longer_than_positions_is_refused_with_the_limit_named():
    model = SparseBertModel(SparseBertConfig(**tiny_kwargs()))
    with pytest.raises(ValueError, match="sequence length 65 is longer than max_position_embeddings=64"):
        model(torch.ones(1, 65, dtype=torch.long))


def test_learned_pattern_without_a_dam_mask_is_refused_at_configuration():
    with pytest.raises(ValueError, match="'learned', which needs a frozen DAM mask.*freeze_dam"):
        SparseBertConfig(**tiny_kwargs(attention_pattern="window:3&learned"))


def test_learned_pattern_is_refused_when_loading_a_stock_checkpoint(tmp_path):
    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'learned', which needs a frozen DAM mask"):
        SparseBertForMaskedLM.from_pretrained(tmp_path, attention_pattern="learned")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(attention_pattern="windw:3"), "unknown pattern 'windw'"),
        (dict(attention_pattern="window:a"), "non-integer"),
        (dict(attention_fn="relu"), "unknown attention_fn 'relu'"),
        (dict(attention_backend="fast"), "unknown attention_backend 'fast'"),
    ],
)
def test_bad_config_values_raise_value_error(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SparseBertConfig(**tiny_kwargs(**kwargs))


def test_bad_pattern_at_load_time_is_refused(tmp_path):
    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown pattern 'diag'"):
        SparseBertForMaskedLM.from_pretrained(tmp_path, attention_pattern="diag")


def test_mask_of_wrong_shape_is_refused():
    model = SparseBertModel(SparseBertConfig(**tiny_kwargs()))
    ids, mask = random_batch()
    with pytest.raises(ValueError, match="attention_mask covers 19 positions but the input has 20"):
        model(ids, attention_mask=mask[:, :19])
    with pytest.raises(ValueError, match="shape \\(batch, sequence\\)"):
        model(ids, attention_mask=mask[:, None, None, :])


def test_a_one_row_attention_mask_is_not_broadcast_over_a_larger_batch():
    model = SparseBertModel(SparseBertConfig(**tiny_kwargs(attention_pattern="window:2"))).eval()
    ids, mask = random_batch()
    with pytest.raises(ValueError, match="attention_mask has 1 rows but the batch has 2"):
        model(ids[:2], attention_mask=mask[:1])


def test_a_stock_bert_checkpoint_loads_without_the_model_type_warning(tmp_path):
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path)
    logger = logging.get_logger("transformers.configuration_utils")
    with CaptureLogger(logger) as captured:
        model = SparseBertForMaskedLM.from_pretrained(tmp_path)
    assert model.config.model_type == "sparse_bert"
    assert "to instantiate a model of type" not in captured.out


@pytest.mark.parametrize("stock_cls, sparse_cls", PAIRS, ids=[p[1].__name__ for p in PAIRS])
def test_config_return_dict_false_returns_the_tuples_bert_returns(stock_cls, sparse_cls):
    stock, sparse = _pair(stock_cls, sparse_cls)
    ids, mask = random_batch()
    if stock_cls is BertForMultipleChoice:
        ids, mask = ids[None], mask[None]
    stock.config.return_dict = sparse.config.return_dict = False
    with torch.no_grad():
        want, got = stock(ids, attention_mask=mask), sparse(ids, attention_mask=mask)
    assert isinstance(got, tuple) and len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_a_stock_bert_config_is_taken_as_a_sparse_bert_config(tmp_path):
    """The usual recipe: AutoConfig.from_pretrained(bert, num_labels=3), then the model class with config=."""
    from transformers import AutoConfig

    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, num_labels=3)
    assert type(config).__name__ == "BertConfig"
    model = SparseBertForSequenceClassification.from_pretrained(tmp_path, config=config).eval()
    assert isinstance(model.config, SparseBertConfig) and model.config.num_labels == 3
    assert model.config.attention_pattern == "dense"
    ids, mask = random_batch()
    assert model(ids, attention_mask=mask).logits.shape == (ids.shape[0], 3)
    assert isinstance(SparseBertModel(tiny_bert_config()).config, SparseBertConfig)
