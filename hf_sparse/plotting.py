"""Pictures people would rather look at than tables: pattern and mask heatmaps (matplotlib, PNG).

Kept out of the modules that checkpoints carry: remote code must not need matplotlib.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .patterns import Pattern, dense_mask, parse, sparsity  # noqa: E402


def plot_patterns(specs: list[str | Pattern], n: int, path: str, columns: int = 4) -> None:
    """Save one heatmap per pattern at length ``n`` (black = attended, head 0) in a grid PNG."""
    rows = math.ceil(len(specs) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, spec in zip(axes.flat, specs):
        pattern = parse(spec)
        ax.imshow(dense_mask(pattern, n)[0].numpy(), cmap="Greys", interpolation="nearest")
        ax.set_title(f"{pattern}\nsparsity {100 * sparsity(pattern, n):.2f}%", fontsize=9)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"attention patterns at n={n} (row: query i, column: key j)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pareto(rows: list[dict], path: str, title: str = "Sparsefinder: predicted-graph sparsity vs recall") -> None:
    """One line per method through its sweep points (x: graph sparsity, y: recall of the gold graph)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["graph_sparsity"], r["recall"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=method)
    gold = sum(r["gold_sparsity"] for r in rows) / len(rows)
    ax.axvline(gold, color="grey", linestyle=":", label=f"gold sparsity {gold:.2f}")
    ax.set_xlabel("graph sparsity (1 - predicted / valid pairs)")
    ax.set_ylabel("recall (gold pairs predicted)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layer_masks(model, n: int, path: str) -> None:
    """The attention mask a SparseBERT runs at length ``n``: one heatmap per layer and head (black = attended).

    Shows what is in the checkpoint: the fixed pattern, a frozen DAM mask (``learned``), or, during a DAM search,
    the pattern ∩ the current deterministic mask.
    """
    patterns = model.base_model.layer_patterns(n, "cpu")
    heads = model.config.num_attention_heads
    fig, axes = plt.subplots(
        len(patterns), heads, figsize=(2.2 * heads, 2.8 * len(patterns) + 0.4), squeeze=False, layout="constrained"
    )
    for layer, pattern in enumerate(patterns):
        masks = dense_mask(pattern, n).expand(heads, n, n)
        for head in range(heads):
            ax = axes[layer, head]
            ax.imshow(masks[head].numpy(), cmap="Greys", interpolation="nearest")
            ax.set_title(f"layer {layer} head {head}\nkept {100 * masks[head].float().mean():.1f}%", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"{model.config.attention_pattern} at n={n} (row: query i, column: key j)", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
