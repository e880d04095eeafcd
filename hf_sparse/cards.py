"""Model cards for hf_sparse checkpoints: what attention the model runs, how to load it, what was measured.

A checkpoint of ours loads only with ``trust_remote_code=True`` and its behaviour hides in config fields (pattern,
DAM mask, Sparsefinder predictors), so the card spells those out: the attention of every layer with its sparsity,
the DAM and Sparsefinder state, the loading snippet, the metrics and plots it was given, and the two papers.
Built with ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData`` (the YAML header the Hub reads: library, tags,
pipeline tag, base model, datasets, eval results). Not imported by modeling code.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .patterns import sparsity

# architecture suffix -> (Auto class, pipeline tag); longest suffix first
_TASKS = [
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "AutoModelForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering", "question-answering"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice", "multiple-choice"),
    ("ForMaskedLM", "AutoModelForMaskedLM", "fill-mask"),
    ("MTModel", "AutoModelForSeq2SeqLM", "translation"),
    ("Model", "AutoModel", "feature-extraction"),
]

CITATIONS = """\
```bibtex
@inproceedings{shi2021sparsebert,
  title = {SparseBERT: Rethinking the Importance Analysis in Self-attention},
  author = {Shi, Han and others},
  booktitle = {International Conference on Machine Learning (ICML)},
  year = {2021},
  note = {arXiv:2102.12871}
}
@inproceedings{treviso2022sparsefinder,
  title = {Predicting Attention Sparsity in Transformers},
  author = {Treviso, Marcos and G{\\'o}is, Ant{\\'o}nio and Fernandes, Patrick and Fonseca, Erick
            and Martins, Andr{\\'e} F. T.},
  booktitle = {Workshop on Structured Prediction for NLP (SPNLP)},
  year = {2022},
  note = {arXiv:2109.12188}
}
```"""


def auto_class_and_task(model) -> tuple[str, str]:
    """The Auto class that loads ``model`` and its pipeline tag, from its class name."""
    name = type(model).__name__
    for suffix, auto, task in _TASKS:
        if name.endswith(suffix):
            return auto, task
    raise ValueError(f"no model card task for class {name!r}; known suffixes: {', '.join(s for s, _, _ in _TASKS)}")


def _normaliser(fn: str, alpha: float) -> str:
    return {"softmax": "softmax", "entmax15": "1.5-entmax", "sparsemax": "sparsemax"}.get(fn, f"{alpha:g}-entmax")


# the Sparsefinder settings each method reads (besides method, window, combine, layers)
_METHOD_SETTINGS = {
    "distance": ("projection_dim", "share_projections", "margin", "threshold", "top_k"),
    "quantization": ("projection_dim", "share_projections", "margin", "num_buckets", "bucket_size"),
    "clustering": ("projection_dim", "share_projections", "margin", "num_clusters", "top_clusters"),
    "window": (),
    "lsh": ("num_buckets", "num_hashes", "seed"),
    "routing": ("num_clusters", "top_clusters", "seed"),
    "bigbird": ("global_tokens", "random_keys", "seed"),
}


def _sparsefinder_lines(model) -> list[str]:
    settings = model.config.sparsefinder
    if not settings:
        return []
    modules = model.sparsefinder_modules()
    fitted = [layer for layer, module in modules.items() if module.sparsefinder.is_fitted()]
    keys = ("method", "window", "combine", "layers", *_METHOD_SETTINGS.get(settings.get("method"), ()))
    shown = {k: settings[k] for k in keys if k in settings}
    return [
        "",
        "### Sparsefinder",
        "",
        f"Predictors of the pairs entmax keeps on layers {sorted(modules)} (fitted: {fitted or 'none'}). "
        + (
            "Inference attends **only to the predicted pairs** (`sparsefinder.enabled = true`)."
            if settings.get("enabled")
            else "Inference runs full entmax; set `sparsefinder.enabled = true` in the config to attend only to the "
            "predicted pairs."
        ),
        "",
        "Settings: " + ", ".join(f"`{k}={v}`" for k, v in shown.items()) + ".",
    ]


def _sparse_bert_lines(model, n: int) -> list[str]:
    config = model.config
    normaliser = _normaliser(config.attention_fn, config.entmax_alpha)
    patterns = model.base_model.layer_patterns(n, "cpu")
    if all(pattern.is_dense for pattern in patterns):
        lines = [f"Normaliser: {normaliser}. Pattern: `dense` in every layer (no fixed or learned sparsity)."]
    else:
        lines = [
            f"Normaliser: {normaliser}. Pattern: `{config.attention_pattern}`. Sparsity below: fraction of the "
            f"{n}×{n} attention matrix a layer never computes, averaged over heads.",
            "",
            "| layer | pattern | sparsity at n=" + str(n) + " |",
            "|---:|---|---:|",
        ]
        lines += [f"| {i} | `{p}` | {100 * sparsity(p, n):.1f} % |" for i, p in enumerate(patterns)]
    dam = config.dam
    if dam:
        state = "frozen: the learned mask is stored in the checkpoint" if dam.get("frozen") else "still searching"
        lines += [
            "",
            "### Differentiable Attention Mask (SparseBERT)",
            "",
            f"DAM gates, structure `{dam.get('structure')}`, {state}.",
        ]
    return lines + _sparsefinder_lines(model)


def _marian_lines(model) -> list[str]:
    config = model.config
    alpha = config.entmax_alpha
    lines = [
        f"Decoder self-attention: {_normaliser(config.decoder_attention_fn, alpha)}; encoder self-attention: "
        f"{_normaliser(config.encoder_attention_fn, alpha)}; cross-attention: "
        f"{_normaliser(config.cross_attention_fn, alpha)}. Weights, cache and `generate()` are Transformers' Marian.",
    ]
    return lines + _sparsefinder_lines(model)


def longest_described(model) -> int:
    """The longest length a SparseBERT card can describe: its positions, and at most the DAM gates' ``max_length``
    (the gates, and a frozen mask, cover no more; the model refuses longer inputs)."""
    longest = model.config.max_position_embeddings
    dam = getattr(model.config, "dam", None)
    if dam:
        longest = min(longest, dam.get("max_length") or longest)
    return longest


def attention_lines(model, n: int | None = None) -> list[str]:
    """Markdown lines describing the attention ``model`` runs (SparseBERT at length ``n``, default ≤ 512 and ≤
    :func:`longest_described`)."""
    if hasattr(model.base_model, "layer_patterns"):
        return _sparse_bert_lines(model, n or min(512, longest_described(model)))
    return _marian_lines(model)


def model_card(
    model,
    *,
    repo_id: str = "path/to/this/checkpoint",
    title: str | None = None,
    description: str = "",
    metrics: dict[str, float] | None = None,
    dataset: str | None = None,
    base_model: str | None = None,
    plots: dict[str, str] | None = None,
    license: str | None = None,
    n: int | None = None,
) -> ModelCard:
    """The card of ``model``.

    Args:
        repo_id: shown in the loading snippet (a Hub id or a local path).
        metrics: name → value, shown as a table; with ``dataset`` also as ``model-index`` eval results.
        dataset: the evaluation dataset's name (free text, e.g. "gettext English messages").
        plots: caption → image path relative to the card (e.g. ``{"attention masks": "attention_masks.png"}``).
    """
    if metrics is not None and not isinstance(metrics, dict):
        raise ValueError(f"metrics must be a dict of metric name -> value, got a {type(metrics).__name__}")
    auto, task = auto_class_and_task(model)
    kinds = ["hf_sparse", "sparse-attention"]
    config = model.config
    if getattr(config, "dam", None):
        kinds.append("sparsebert-dam")
    if getattr(config, "sparsefinder", None):
        kinds.append("sparsefinder")
    fns = [getattr(config, f, "softmax") for f in ("attention_fn", "decoder_attention_fn", "encoder_attention_fn")]
    if any(fn != "softmax" for fn in fns):
        kinds.append("entmax")
    eval_results = None
    if metrics and dataset:
        eval_results = [
            EvalResult(task_type=task, dataset_type=dataset, dataset_name=dataset, metric_type=k, metric_value=v)
            for k, v in metrics.items()
            if isinstance(v, float)  # measurements; counts (steps, blocks) stay in the table only
        ]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task,
        tags=kinds,
        base_model=base_model,
        license=license,
        model_name=title or repo_id,
        eval_results=eval_results,
    )
    lines = [
        f"# {title or repo_id}",
        "",
        description
        or f"A `{type(model).__name__}` with sparse attention from hf_sparse (learned and predicted "
        "sparse attention for 🤗 Transformers).",
        "",
        "## Use",
        "",
        "The modeling code travels with the checkpoint; `hf_sparse` need not be installed:",
        "",
        "```python",
        f"from transformers import {auto}",
        "",
        f'model = {auto}.from_pretrained("{repo_id}", trust_remote_code=True)',
        "```",
        "",
        "## Attention",
        "",
        *attention_lines(model, n),
    ]
    if metrics:
        lines += ["", "## Results", ""] + (["On " + dataset + ".", ""] if dataset else [])
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    for caption, path in (plots or {}).items():
        lines += ["", f"![{caption}]({path})"]
    lines += ["", "## Citation", "", CITATIONS, ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_card(model, directory: str | os.PathLike, *, plot_masks: bool = True, **card_kwargs) -> Path:
    """Write ``README.md`` (and, for a SparseBERT, ``attention_masks.png``) into ``directory``; returns the card.

    ``card_kwargs`` go to :func:`model_card`; the mask heatmap (drawn unless every layer is dense) is added to its
    ``plots``. ``n`` (the length of the sparsity table and heatmap) defaults to ``min(128, max positions)``, and
    to at most the DAM gates' ``max_length``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plots = dict(card_kwargs.pop("plots", None) or {})
    sparse_bert = hasattr(model.base_model, "layer_patterns")
    n = card_kwargs["n"] = card_kwargs.get("n") or min(128, longest_described(model))
    if plot_masks and sparse_bert and not all(p.is_dense for p in model.base_model.layer_patterns(n, "cpu")):
        from .plotting import plot_layer_masks

        plot_layer_masks(model, n, str(directory / "attention_masks.png"))
        plots = {f"attention mask of every layer and head at n={n}": "attention_masks.png", **plots}
    path = directory / "README.md"
    model_card(model, plots=plots, **card_kwargs).save(path)
    return path


def save_with_card(
    model, tokenizer, directory: str | os.PathLike, metrics: dict, *, card_metrics: dict | None = None, **card_kwargs
) -> Path:
    """What every command leaves behind: the checkpoint (weights, config with ``auto_map``, the remote code), its
    tokenizer, ``metrics.json`` and the model card (``card_metrics``, default ``metrics``, as its results); returns
    the card. The folder is what :func:`hf_sparse.hub.push_checkpoint` uploads."""
    import json

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    with open(directory / "metrics.json", "w") as handle:
        json.dump(metrics, handle, indent=2)
    card_kwargs.setdefault("repo_id", str(directory))
    return write_card(model, directory, metrics=metrics if card_metrics is None else card_metrics, **card_kwargs)
