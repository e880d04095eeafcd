"""Inference as a Transformers user runs it: the idioms of stock BERT and Marian work the same on both families."""

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForSeq2SeqLM

from conftest import random_batch, tiny_kwargs
from hf_sparse import (
    EntmaxSparsefinderMarianConfig,
    EntmaxSparsefinderMarianMTModel,
    SparseBertConfig,
    SparseBertForMaskedLM,
)
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
    for loader in (cls, auto_cls):
        model = loader.from_pretrained(tmp_path, output_attentions=True).eval()
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
