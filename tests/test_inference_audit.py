"""Inference as a Transformers user runs it: the idioms of stock BERT and Marian work the same on both families."""

import copy

import pytest
import torch
from test_sparsefinder_marian import loader, model_with
from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM, pipeline

from conftest import random_batch, tiny_kwargs, tiny_tokenizer
from hf_sparse import (
    EntmaxSparsefinderMarianConfig,
    EntmaxSparsefinderMarianMTModel,
    SparseBertConfig,
    SparseBertForMaskedLM,
    SparseBertForTokenClassification,
)
from hf_sparse.sparsefinder_fit import fit
from test_modeling_entmax_marian import MARIAN, batch


def _bert(path):
    SparseBertForMaskedLM(
        SparseBertConfig(**tiny_kwargs(attention_fn="entmax15", attention_pattern="window:3"))
    ).save_pretrained(path)
    ids, mask = random_batch()
    return SparseBertForMaskedLM, AutoModelForMaskedLM, dict(input_ids=ids, attention_mask=mask), "attentions"


def _marian(path):
    EntmaxSparsefinderMarianMTModel(EntmaxSparsefinderMarianConfig(**MARIAN)).save_pretrained(path)
    ids, mask, decoder = batch()
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder)
    return EntmaxSparsefinderMarianMTModel, AutoModelForSeq2SeqLM, inputs, "decoder_attentions"


@pytest.mark.parametrize("family", [_bert, _marian], ids=["sparse_bert", "entmax_marian"])
def test_from_pretrained_with_output_attentions_returns_the_attentions(tmp_path, family):
    """``from_pretrained(path, output_attentions=True)`` (Transformers' documented idiom) makes Transformers' config
    switch ``attn_implementation`` to "eager" on its own; that was refused as if the user had asked for it."""
    cls, auto_cls, inputs, key = family(tmp_path)
    with torch.no_grad():
        want = cls.from_pretrained(tmp_path).eval()(**inputs, output_attentions=True)[key]
    for loading in (cls, auto_cls):
        model = loading.from_pretrained(tmp_path, output_attentions=True).eval()
        assert model.config.output_attentions is True
        with torch.no_grad():
            got = model(**inputs)[key]  # the config's default, no keyword
        assert got is not None and len(got) == len(want) == 2
        for a, b in zip(want, got):
            assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("family", [_bert, _marian], ids=["sparse_bert", "entmax_marian"])
def test_an_explicit_eager_attn_implementation_is_still_refused_with_output_attentions(tmp_path, family):
    cls, _, _, _ = family(tmp_path)
    with pytest.raises(ValueError, match="'eager'"):
        cls.from_pretrained(tmp_path, attn_implementation="eager", output_attentions=True)


@pytest.fixture(scope="module")
def predicting_marian():
    """An entmax Marian decoding with fitted, restrictive Sparsefinder predictors (they change the outputs)."""
    torch.manual_seed(0)
    model = model_with(threshold=0.5)
    fit(model, loader(), epochs=2, progress=False)
    model.config.sparsefinder["enabled"] = True
    return model


def test_predicted_decoding_with_an_assistant_model_gives_the_greedy_tokens(predicting_marian):
    """Assisted generation checks several drafted tokens in one decoder call on top of the cache (queries at
    positions past..past+k-1): greedy assisted decoding must give exactly greedy decoding's tokens."""
    model = predicting_marian
    assistant = copy.deepcopy(model)
    with torch.no_grad():  # a different draft model, so that some drafts are rejected and some accepted
        for p in assistant.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    calls = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[-1]), with_kwargs=True
    )
    ids, mask, _ = batch(4)
    try:
        for i in range(ids.shape[0]):
            source = ids[i : i + 1, : int(mask[i].sum())]
            kw = dict(max_new_tokens=12, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
            alone, assisted = model.generate(source, **kw), model.generate(source, assistant_model=assistant, **kw)
            assert torch.equal(alone.sequences, assisted.sequences)
            assert torch.allclose(torch.stack(alone.scores), torch.stack(assisted.scores), atol=1e-4)
    finally:
        hook.remove()
    assert max(calls) > 1  # several queries in one cached call did happen


def _frozen_dam(cls):
    dam = {"structure": "offset", "max_length": 32}
    model = cls(SparseBertConfig(**tiny_kwargs(attention_pattern="window:4", dam=dam)))
    model.freeze_dam()
    return model


def _predicting_bert(cls):
    sparsefinder = {"method": "distance", "window": 1, "threshold": 1.0}
    model = cls(SparseBertConfig(**tiny_kwargs(attention_fn="entmax15", sparsefinder=sparsefinder))).eval()
    fit(model, [dict(zip(("input_ids", "attention_mask"), random_batch(seed=s))) for s in range(2)], 1, progress=False)
    model.config.sparsefinder["enabled"] = True
    return model


@pytest.mark.parametrize(
    "make",
    [
        lambda cls: cls(SparseBertConfig(**tiny_kwargs(attention_fn="entmax15", attention_pattern="bigbird:3,1,2"))),
        _frozen_dam,
        _predicting_bert,
    ],
    ids=["bigbird_entmax", "frozen_dam", "sparsefinder"],
)
def test_batched_pipelines_give_what_one_text_at_a_time_gives(make):
    """A batch pads its shorter texts: patterns, DAM masks and predictions must not see the padding."""
    texts = ["the cat [MASK] on the mat", "a dog [MASK]", "the very good movie was [MASK] and it is not a bad film"]

    def rounded(result):
        if isinstance(result, list):
            return [rounded(r) for r in result]
        return {k: round(float(v), 5) if k == "score" else v for k, v in result.items()}

    for task, cls, inputs in [
        ("fill-mask", SparseBertForMaskedLM, texts),
        ("token-classification", SparseBertForTokenClassification, [t.replace("[MASK]", "sat") for t in texts]),
    ]:
        torch.manual_seed(0)
        run = pipeline(task, model=make(cls).eval(), tokenizer=tiny_tokenizer())
        assert rounded(run(inputs, batch_size=3)) == rounded([run(text) for text in inputs]), task


@pytest.mark.parametrize("family", [_bert, _marian], ids=["sparse_bert", "entmax_marian"])
def test_output_attentions_set_on_a_live_config_returns_them_and_the_model_saves(tmp_path, family):
    """``model.config.output_attentions = True`` raised Transformers' "set attn_implementation to 'eager'", which
    these models refuse; and a model loaded with ``output_attentions=True`` could not be saved (the same check in
    ``save_pretrained``'s validation). Both families return the probabilities whatever kernel runs."""
    cls, _, inputs, name = family(tmp_path / "saved")
    model = cls.from_pretrained(tmp_path / "saved").eval()
    model.config.output_attentions = True
    with torch.no_grad():
        attentions = getattr(model(**inputs), name)
    assert attentions is not None and all(torch.isfinite(a).all() for a in attentions)
    model.save_pretrained(tmp_path / "again")
    assert cls.from_pretrained(tmp_path / "again").config.output_attentions is True
    model.config.output_attentions = False
    with torch.no_grad():
        assert getattr(model(**inputs), name) is None
