"""Both models' entmax paths run hf_sparse.entmax_topk and give what the entmax package gives.

The reference swaps ``hf_sparse.attention.normalize`` (the one normaliser every attention path calls: eager
attention, gathered predicted-sparse attention, the Marian attention function) for the package on
``-inf``-masked scores, and the two models' logits and parameter gradients are compared in float64.
"""

import entmax
import pytest
import torch

from conftest import random_batch, tiny_kwargs
from hf_sparse import (
    EntmaxSparsefinderMarianConfig,
    EntmaxSparsefinderMarianMTModel,
    SparseBertConfig,
    SparseBertForMaskedLM,
)
from hf_sparse import attention as attention_module
from test_modeling_entmax_marian import MARIAN

PACKAGE = {
    "entmax15": lambda x, alpha: entmax.entmax15(x, dim=-1),
    "sparsemax": lambda x, alpha: entmax.sparsemax(x, dim=-1),
    "entmax_bisect": lambda x, alpha: entmax.entmax_bisect(x, alpha=alpha, dim=-1),
}


def package_normalize(scores, keep, attention_fn, alpha):
    """The package on scores with masked pairs at -inf; a query with no allowed key gets zeros."""
    keep = torch.ones_like(scores, dtype=torch.bool) if keep is None else keep.expand_as(scores)
    empty = ~keep.any(-1, keepdim=True)
    probs = PACKAGE[attention_fn](scores.masked_fill(~keep, float("-inf")).masked_fill(empty, 0.0), alpha)
    return probs.masked_fill(empty, 0.0)


def logits_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    (out.logits * torch.linspace(-1, 1, out.logits.shape[-1], dtype=out.logits.dtype)).sum().backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_as_package(model, inputs, monkeypatch):
    ours, ours_grads = logits_and_grads(model, inputs)
    with monkeypatch.context() as m:
        m.setattr(attention_module, "normalize", package_normalize)
        want, want_grads = logits_and_grads(model, inputs)
    assert torch.allclose(ours, want, rtol=0, atol=1e-10)
    assert ours_grads.keys() == want_grads.keys() and len(ours_grads) > 10
    for name, grad in ours_grads.items():
        assert torch.allclose(grad, want_grads[name], rtol=0, atol=1e-9), name


@pytest.mark.parametrize("fn", sorted(PACKAGE))
def test_sparse_bert_entmax_attention_equals_the_package(fn, monkeypatch):
    torch.manual_seed(0)
    config = SparseBertConfig(**tiny_kwargs(attention_fn=fn, entmax_alpha=1.3, attention_pattern="window:6+global:1"))
    model = SparseBertForMaskedLM(config).double().train()
    with torch.no_grad():  # sharper scores: sparse rows at random initialisation
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(8.0)
    ids, mask = random_batch(length=40)
    probs = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[0]
    assert ((probs == 0) & (mask[:, None, None, :] == 1)).any()  # exact zeros among real, allowed keys
    assert_same_as_package(model, {"input_ids": ids, "attention_mask": mask}, monkeypatch)


def test_entmax_marian_every_attention_equals_the_package(monkeypatch):
    torch.manual_seed(0)
    config = EntmaxSparsefinderMarianConfig(
        **MARIAN,
        decoder_attention_fn="entmax15",
        encoder_attention_fn="entmax_bisect",
        cross_attention_fn="sparsemax",
        entmax_alpha=1.3,
    )
    model = EntmaxSparsefinderMarianMTModel(config).double().train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("q_proj.weight"):
                param.mul_(6.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 25, (3, 30), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[2, 9:] = 0
    ids[mask == 0] = 0
    decoder = torch.randint(5, 25, (3, 25), generator=g)
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder}
    assert_same_as_package(model, inputs, monkeypatch)
