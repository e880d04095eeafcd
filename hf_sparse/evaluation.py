"""Measuring models: held-out masked-LM quality (more to come: sparsity/recall and Pareto sweeps)."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm
from transformers import DataCollatorForLanguageModeling


@torch.no_grad()
def masked_lm_metrics(
    model, tokenizer, texts: list[str] | list[dict], max_length: int = 64, batch_size: int = 64, seed: int = 0
) -> dict[str, float]:
    """Masked-token accuracy, loss and perplexity with BERT's 15% masking, reproducible from ``seed``.

    ``texts``: strings (tokenized here, truncated to ``max_length``) or already tokenized examples (a list or a
    ``datasets.Dataset``).
    The same seed masks the same tokens, so two models (say, dense and sparse) are compared on identical inputs.
    """
    texts = list(texts)  # a Dataset iterates as example dicts
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, return_tensors="pt")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc="masked-LM eval", leave=False):
            encoded = [
                t if isinstance(t, dict) else tokenizer(t, truncation=True, max_length=max_length)
                for t in texts[start : start + batch_size]
            ]
            batch = collator(encoded)
            labels = batch.pop("labels")
            batch = {k: v.to(model.device) for k, v in batch.items()}
            labels = labels.to(model.device)
            logits = model(**batch).logits
            chosen = labels != -100
            loss_sum += torch.nn.functional.cross_entropy(logits[chosen], labels[chosen], reduction="sum").item()
            correct += (logits[chosen].argmax(-1) == labels[chosen]).sum().item()
            total += chosen.sum().item()
    finally:
        torch.random.set_rng_state(generator_state)
        model.train(was_training)
    loss = loss_sum / max(total, 1)
    return {"accuracy": correct / max(total, 1), "loss": loss, "perplexity": math.exp(loss), "masked_tokens": total}


# -- Sparsefinder: how well the predicted graphs cover the pairs entmax keeps ---------------------------------


def _layer_metrics(state, batches, settings: dict, causal: bool, pattern=None) -> dict[str, torch.Tensor]:
    """Per-head metrics of one layer's predictor over collected batches (per sentence, then averaged).

    ``pattern``: a fixed pattern spec the prediction is combined with, as ``settings["combine"]`` says.
    """
    from .patterns import dense_mask
    from .sparsefinder import predict_pairs
    from .sparsefinder_fit import graph_metrics

    pooled: dict[str, list[torch.Tensor]] = {}
    for q, k, gold, valid in batches:
        valid_keys = valid[:, 0].any(dim=-2)  # a key some query may attend (not padding)
        pred = predict_pairs(state, q, k, settings, valid_keys, causal=causal)
        if pattern is not None:
            fixed = dense_mask(pattern, q.shape[2])[None]
            pred = pred & fixed if settings["combine"] == "intersection" else pred | fixed
        pred = pred & valid
        for name, value in graph_metrics(pred, gold, valid, per_sentence=True).items():
            pooled.setdefault(name, []).append(value)
    return {name: torch.cat(values).nanmean(0) for name, values in pooled.items()}


def _average(per_layer: dict[int, dict[str, torch.Tensor]]) -> dict[str, float]:
    names = next(iter(per_layer.values())).keys()
    return {name: torch.stack([m[name] for m in per_layer.values()]).mean().item() for name in names}


def predictor_like(fitted, settings: dict, batches):
    """A predictor for ``settings`` (any method) built from a fitted one: same learned projections; k-means centroids
    (clustering, routing) fitted on ``batches`` (collected attention) for the requested number of clusters."""
    from .sparsefinder import CENTROID_METHODS, PROJECTED_METHODS, SparsefinderLayer
    from .sparsefinder_fit import fit_centroids

    state = SparsefinderLayer(settings, fitted.num_heads, fitted.head_dim).to(fitted.q_weight.device)
    if settings["method"] in PROJECTED_METHODS:
        for own, learned in zip(state.projection_parameters(), fitted.projection_parameters(), strict=True):
            own.data.copy_(learned.data)
        state.fitted.fill_(True)
    if settings["method"] in CENTROID_METHODS:
        fit_centroids(state, batches, settings)
    return state


def sparsity_recall(
    model, dataloader, max_batches: int | None = None, max_sentences: int = 512, progress: bool = True
) -> dict:
    """Gold sparsity, graph sparsity, recall and exact of the model's own predictors (REFERENCES.md definitions).

    Returns ``{"per_layer": {layer: {metric: (H,) tensor}}, "average": {metric: float}}``; the average is over
    layers and heads of the per-sentence means.
    """
    from .sparsefinder_fit import collect_attention

    collected = collect_attention(model, dataloader, max_batches, max_sentences, progress)
    settings = model.config.sparsefinder
    per_layer = {
        layer: _layer_metrics(module.sparsefinder, collected[layer], settings, getattr(module, "is_causal", False))
        for layer, module in model.sparsefinder_modules().items()
    }
    return {"per_layer": per_layer, "average": _average(per_layer)}


# Sweep points of every method (setting overrides), from dense to sparse graphs: what scripts and the CLI sweep.
DEFAULT_SWEEP = {
    "distance": [{"threshold": t} for t in (0.5, 1.0, 1.5, 2.0, 3.0)],
    "quantization": [{"num_buckets": b} for b in (16, 8, 4, 2)],
    "clustering": [{"num_clusters": c, "top_clusters": 1} for c in (16, 8, 4, 2)],
    "window": [{"window": w} for w in (2, 8, 16, 32, 64)],
    "lsh": [{"num_buckets": b} for b in (16, 8, 4, 2)],
    "routing": [{"num_clusters": c} for c in (16, 8, 4, 2)],
    "bigbird": [{"window": w, "random_keys": 4} for w in (2, 8, 16, 32)],
}


def operating_point(rows: list[dict], method: str, recall: float) -> dict:
    """The sparsest sweep row of ``method`` whose recall reaches ``recall`` (else its highest-recall row)."""
    own = [r for r in rows if r["method"] == method]
    if not own:
        raise ValueError(f"no sweep rows for method {method!r}; swept: {sorted({r['method'] for r in rows})}")
    good = [r for r in own if r["recall"] >= recall]
    return max(good, key=lambda r: r["graph_sparsity"]) if good else max(own, key=lambda r: r["recall"])


def pareto(
    model,
    dataloader,
    sweep: dict[str, list[dict]],
    csv_path: str | None = None,
    png_path: str | None = None,
    max_batches: int | None = None,
    max_sentences: int = 512,
    progress: bool = True,
    pattern: str | None = None,
) -> list[dict]:
    """Sparsity vs recall of every method in ``sweep`` (method → list of setting overrides), from one collection.

    ``pattern``: also combine each prediction with this fixed pattern (``combine`` in the settings: intersection
    or union) before comparing it with the gold graph of the model as it is.

    The projected methods (distance, quantization, clustering) reuse the model's fitted projections; k-means
    centroids (clustering, routing) are fitted here for each number of clusters. Writes a CSV and a Pareto plot
    when paths are given. Rows: ``method``, ``setting`` (text), ``graph_sparsity``, ``recall``, ``exact``,
    ``gold_sparsity``, and ``overrides`` (the setting as a dict, not in the CSV).
    """
    from tqdm.auto import tqdm

    from .sparsefinder import (
        PROJECTED_METHODS,
        collect_attention,
        resolve_config,
    )

    modules = model.sparsefinder_modules()
    base = resolve_config(model.config.sparsefinder)
    if any(m in PROJECTED_METHODS for m in sweep) and not all(bool(m.sparsefinder.fitted) for m in modules.values()):
        raise ValueError("the projected methods reuse the model's projections: fit the predictors first")
    collected = collect_attention(model, dataloader, max_batches, max_sentences, progress)
    rows = []
    points = [(method, overrides) for method, settings_list in sweep.items() for overrides in settings_list]
    for method, overrides in tqdm(points, desc="Pareto sweep", disable=not progress):
        settings = resolve_config({**base, "method": method, **overrides, "layers": None})
        per_layer = {
            layer: _layer_metrics(
                predictor_like(module.sparsefinder, settings, collected[layer]),
                collected[layer],
                settings,
                getattr(module, "is_causal", False),
                pattern,
            )
            for layer, module in modules.items()
        }
        setting = ", ".join(f"{k}={v}" for k, v in overrides.items())
        rows.append({"method": method, "setting": setting, **_average(per_layer), "overrides": dict(overrides)})
    if csv_path:
        import csv

        with open(csv_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[k for k in rows[0] if k != "overrides"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    if png_path:
        from .plotting import plot_pareto

        plot_pareto(rows, png_path)
    return rows
