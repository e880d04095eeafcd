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
