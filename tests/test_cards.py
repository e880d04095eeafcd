"""Model cards: the Hub metadata and the attention they describe come from the model itself."""

import pytest
import torch
from huggingface_hub import ModelCard

from conftest import tiny_kwargs
from hf_sparse import (
    EntmaxSparsefinderMarianConfig,
    EntmaxSparsefinderMarianMTModel,
    SparseBertConfig,
    SparseBertForMaskedLM,
    SparseBertForSequenceClassification,
)
from hf_sparse.cards import model_card, write_card
from hf_sparse.patterns import sparsity
from test_modeling_entmax_marian import MARIAN


def test_sparse_bert_card_has_hub_metadata_layer_sparsities_metrics_and_mask_heatmap(tmp_path):
    model = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(attention_pattern="window:3+global:1")))
    metrics = {"accuracy": 0.25, "loss": 3.5, "steps": 10}
    path = write_card(model, tmp_path, repo_id="org/tiny", metrics=metrics, dataset="toy text", n=32)
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "fill-mask"
    assert {"hf_sparse", "sparse-attention"} <= set(card.data.tags) and "entmax" not in card.data.tags
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": 0.25, "loss": 3.5}  # counts stay out of the eval results
    assert 'AutoModelForMaskedLM.from_pretrained("org/tiny", trust_remote_code=True)' in card.text
    expected = f"{100 * sparsity('window:3+global:1', 32):.1f} %"
    assert card.text.count(f"| `window:3+global:1` | {expected} |") == 2  # one row per layer
    assert "| steps | 10 |" in card.text and "(attention_masks.png)" in card.text
    assert (tmp_path / "attention_masks.png").stat().st_size > 1000


def test_frozen_dam_card_reports_the_stored_mask_and_per_layer_sparsity(tmp_path):
    torch.manual_seed(0)
    dam = {"structure": "element", "share_across_layers": False, "max_length": 16}
    model = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(dam=dam, max_position_embeddings=16)))
    with torch.no_grad():
        model.bert.dam.logits.normal_()  # a different random mask per layer and head
    model.freeze_dam()
    text = ModelCard.load(write_card(model, tmp_path)).text
    assert "frozen: the learned mask is stored in the checkpoint" in text and "structure `element`" in text
    masks = model.bert.dam.frozen(16)
    for layer in range(2):
        assert f"| {layer} | `learned` | {100 * (1 - masks[layer].float().mean().item()):.1f} % |" in text
    assert "sparsebert-dam" in ModelCard.load(tmp_path / "README.md").data.tags


def test_a_dam_shorter_than_the_positions_gets_its_card_at_the_length_its_gates_cover(tmp_path):
    dam = {"structure": "offset", "max_length": 24}
    model = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(dam=dam, max_position_embeddings=64)))
    model.freeze_dam()
    text = ModelCard.load(write_card(model, tmp_path)).text  # n = 64 would be refused by the gates
    assert "at n=24" in text and (tmp_path / "attention_masks.png").exists()


def test_marian_card_names_the_normalisers_and_the_unfitted_predictors():
    config = EntmaxSparsefinderMarianConfig(**MARIAN, sparsefinder={"method": "quantization", "num_buckets": 3})
    card = model_card(EntmaxSparsefinderMarianMTModel(config), repo_id="org/mt")
    assert card.data.pipeline_tag == "translation" and {"entmax", "sparsefinder"} <= set(card.data.tags)
    assert "AutoModelForSeq2SeqLM" in card.text
    assert "Decoder self-attention: 1.5-entmax; encoder self-attention: softmax" in card.text
    assert "layers [0, 1] (fitted: none)" in card.text and "`num_buckets=3`" in card.text


def test_card_task_follows_the_head_and_unknown_classes_are_refused():
    model = SparseBertForSequenceClassification(SparseBertConfig(**tiny_kwargs(attention_fn="sparsemax")))
    card = model_card(model)
    assert card.data.pipeline_tag == "text-classification" and "Normaliser: sparsemax" in card.text
    with pytest.raises(ValueError, match="no model card task for class 'Linear'"):
        model_card(torch.nn.Linear(2, 2))
