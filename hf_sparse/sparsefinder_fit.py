"""Sparsefinder, training side: gold graphs, the projection loss, k-means, fitting a model's predictors, and the
graph metrics (sparsity and recall of a predicted graph).

Never imported by modeling code (what runs in the forward and travels with checkpoints is
:mod:`hf_sparse.sparsefinder`). Fitting helpers take already-collected tensors; :func:`collect_attention` collects
them from a model and :func:`fit` does both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .sparsefinder import (
    _TRAINING_SIDE,
    CENTROID_METHODS,
    PROJECTED_METHODS,
    SparsefinderLayer,
    _require,
    _squared_distances,
    predicts_layer,
    resolve_config,
    valid_pairs,
    window_pairs,
)


def gold_graph(
    probs: torch.Tensor,
    valid_keys: torch.Tensor | None,
    causal: bool,
    valid_queries: torch.Tensor | None = None,
    query_offset: int = 0,
) -> torch.Tensor:
    """Pairs entmax keeps: ``probs > 0`` ``(B, H, Lq, Lk)`` restricted to :func:`valid_pairs`. Bool, same shape."""
    _, _, lq, lk = probs.shape
    valid = valid_pairs(valid_keys, lq, lk, causal, valid_queries, query_offset, probs.device)
    return (probs > 0) & valid


def build_predictors(settings: dict, num_layers: int, num_heads: int, head_dim: int) -> nn.ModuleDict:
    """One :class:`SparsefinderLayer` per predicted layer, keyed by the layer index as a string."""
    cfg = resolve_config(settings)
    too_deep = [x for x in cfg["layers"] or () if x >= num_layers]
    if too_deep:
        raise ValueError(f"sparsefinder layers {too_deep} do not exist; the model has layers 0..{num_layers - 1}")
    return nn.ModuleDict(
        {str(i): SparsefinderLayer(cfg, num_heads, head_dim) for i in range(num_layers) if predicts_layer(cfg, i)}
    )


# --------------------------------------------------------------------------------------------------------------
# Projection loss
# --------------------------------------------------------------------------------------------------------------


def sample_negatives(
    gold: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    num_negatives: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random negative keys per query, bool ``(B, H, Lq, Lk)``.

    Candidates are valid keys that are neither gold nor inside the window. Each query gets ``num_negatives``
    of them (None: as many as its gold keys outside the window), uniformly without replacement, or all
    candidates when there are fewer.
    """
    b, h, lq, lk = gold.shape
    inside = window_pairs(lq, lk, window, device=gold.device)
    candidates = valid & ~gold & ~inside
    if num_negatives is None:
        need = (gold & valid & ~inside).sum(-1, keepdim=True)
    else:
        need = torch.full((1, 1, 1, 1), num_negatives, device=gold.device)
    device = generator.device if generator is not None else gold.device
    scores = torch.rand((b, h, lq, lk), generator=generator, device=device).to(gold.device)
    scores = scores.masked_fill(~candidates, float("inf"))
    rank = scores.argsort(-1).argsort(-1)  # candidates first, in random order
    return candidates & (rank < need)


def margin_loss(
    q_proj: torch.Tensor,
    k_proj: torch.Tensor,
    gold: torch.Tensor,
    valid: torch.Tensor,
    window: int,
    margin: float = 1.0,
    num_negatives: int | None = None,
    generator: torch.Generator | None = None,
    negatives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparsefinder's projection loss (REFERENCES.md), a scalar.

    Per query ``i`` with gold keys ``P(i)`` and random negative keys ``N(i)`` (:func:`sample_negatives`, or
    ``negatives`` given), both leaving out keys inside the window ``|i - j| <= window``::

        relu(margin + Σ_{j∈P(i)} ||q'_i - k'_j||² - Σ_{j∈N(i)} ||q'_i - k'_j||²)

    ``valid`` ``(B, 1|H, Lq, Lk)`` are the valid pairs (:func:`valid_pairs`); queries with no valid pair are
    padding and masked. Averaged over the valid queries of each sentence and head, then over heads and sentences.
    A query with no gold key outside the window contributes ``margin`` (a constant, no gradient), as in the
    reference code.
    """
    valid = valid.expand_as(gold)
    if negatives is None:
        negatives = sample_negatives(gold, valid, window, num_negatives, generator)
    inside = window_pairs(gold.shape[-2], gold.shape[-1], window, device=gold.device)
    positives = gold & valid & ~inside
    sq = _squared_distances(q_proj, k_proj)
    zero = sq.new_zeros(())
    pos = torch.where(positives, sq, zero).sum(-1)
    neg = torch.where(negatives & valid, sq, zero).sum(-1)
    per_query = torch.relu(margin + pos - neg)  # (B, H, Lq)
    real = valid.any(-1)
    count = real.sum(-1)  # (B, H)
    per_head = torch.where(real, per_query, zero).sum(-1) / count.clamp_min(1)
    return per_head[count > 0].mean() if bool((count > 0).any()) else per_head.sum() * 0


# --------------------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------------------


class FitBatch(NamedTuple):
    """Collected tensors of one batch for one layer: ``q``/``k`` ``(B, H, L, d)``, ``gold`` ``(B, H, L, L)``
    bool (:func:`gold_graph`), ``valid`` ``(B, 1|H, L, L)`` bool (:func:`valid_pairs`)."""

    q: torch.Tensor
    k: torch.Tensor
    gold: torch.Tensor
    valid: torch.Tensor


def fit_projections(
    layer_state: SparsefinderLayer,
    batches: Sequence[FitBatch | tuple],
    settings: dict,
    epochs: int,
    lr: float = 1e-3,
    clip: float = 1.0,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the projections with :func:`margin_loss` (Adam, gradient-norm clipping); return per-step losses.

    ``batches`` is a sequence (re-read every epoch) of :class:`FitBatch`. ``generator`` draws the negatives.
    ``on_step(step, loss)`` is called after every step (e.g. to advance a progress bar). Sets ``fitted`` for
    the projection methods.
    """
    cfg = resolve_config(settings)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    params = layer_state.projection_parameters()
    optimizer = torch.optim.Adam(params, lr=lr)
    losses: list[float] = []
    was_training = layer_state.training
    layer_state.train()
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in batches:
                q, k, gold, valid = (t.to(layer_state.q_weight.device) for t in batch)
                q_proj, k_proj = layer_state.project(q.detach(), k.detach())
                loss = margin_loss(
                    q_proj, k_proj, gold, valid, cfg["window"], cfg["margin"], cfg["num_negatives"], generator
                )
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
                losses.append(loss.item())
                if on_step is not None:
                    on_step(len(losses), losses[-1])
    layer_state.train(was_training)
    if cfg["method"] in ("distance", "quantization"):
        layer_state.fitted.fill_(True)
    return losses


def kmeans(
    x: torch.Tensor, num_clusters: int, iterations: int = 50, seed: int = 0, spherical: bool = False
) -> tuple[torch.Tensor, list[float]]:
    """Plain Lloyd k-means per head on ``x`` ``(H, N, D)``: centroids ``(H, C, D)`` and the inertia per iteration.

    Initialised with ``C`` distinct points per head drawn with ``seed``; an empty cluster keeps its centroid.
    ``spherical``: points and centroids are unit vectors (Routing Transformer).
    """
    h, n, dim = x.shape
    if n == 0:
        raise ValueError("k-means got no points: every collected token was padding")
    if spherical:
        x = nn.functional.normalize(x, dim=-1)
    g = torch.Generator().manual_seed(seed)
    if n >= num_clusters:
        init = torch.stack([torch.randperm(n, generator=g)[:num_clusters] for _ in range(h)])
    else:
        init = torch.randint(0, n, (h, num_clusters), generator=g)
    centroids = x.gather(1, init.to(x.device).unsqueeze(-1).expand(h, num_clusters, dim))
    inertia: list[float] = []
    assign = None
    for _ in range(iterations):
        dist = _squared_distances(x, centroids)
        best, new_assign = dist.min(-1)
        inertia.append(best.mean().item())
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        sums = torch.zeros_like(centroids).scatter_add_(1, assign.unsqueeze(-1).expand(h, n, dim), x)
        counts = torch.zeros(h, num_clusters, device=x.device, dtype=x.dtype).scatter_add_(
            1, assign, torch.ones_like(assign, dtype=x.dtype)
        )
        updated = sums / counts.clamp_min(1).unsqueeze(-1)
        centroids = torch.where(counts.unsqueeze(-1) > 0, updated, centroids)
        if spherical:
            centroids = nn.functional.normalize(centroids, dim=-1)
    return centroids, inertia


@torch.no_grad()
def fit_centroids(
    layer_state: SparsefinderLayer,
    batches: Sequence[FitBatch | tuple],
    settings: dict,
    iterations: int = 50,
    seed: int | None = None,
) -> list[float]:
    """k-means centroids for ``clustering`` (on projected q and k) or ``routing`` (unit raw q and k).

    Uses every valid query and key of ``batches`` (:class:`FitBatch`; ``gold`` unused), pooled per head; for
    ``clustering``, fit the projections first. ``seed`` defaults to ``settings["seed"]``. Returns the inertia
    (mean squared distance to the nearest centroid) per iteration and sets ``fitted``.
    """
    cfg = resolve_config(settings)
    method = cfg["method"]
    if method not in CENTROID_METHODS:
        raise ValueError(f"fit_centroids is for methods {', '.join(CENTROID_METHODS)}; got method {method!r}")
    points = []
    for batch in batches:
        q, k, _, valid = (t.to(layer_state.fitted.device) for t in batch)
        if method == "clustering":
            q, k = layer_state.project(q, k)
        q_mask, k_mask = valid.any(-1).any(1), valid.any(-2).any(1)  # (B, L): valid in some head
        points += [q.transpose(0, 1)[:, q_mask], k.transpose(0, 1)[:, k_mask]]
    x = torch.cat(points, dim=1).float()
    shape = (layer_state.num_heads, cfg["num_clusters"], x.shape[-1])
    target = _require(layer_state, "centroids", shape, method)
    centroids, inertia = kmeans(
        x, cfg["num_clusters"], iterations, cfg["seed"] if seed is None else seed, spherical=method == "routing"
    )
    target.copy_(centroids)
    layer_state.fitted.fill_(True)
    return inertia


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


def graph_metrics(
    pred: torch.Tensor, gold: torch.Tensor, valid_pairs: torch.Tensor, per_sentence: bool = False
) -> dict[str, torch.Tensor]:
    """Sparsity and recall of a predicted graph against the gold graph, per head ``(H,)``.

    For each sentence ``b`` and head ``h``, counting only valid pairs (``valid_pairs`` broadcastable to
    ``(B, H, Lq, Lk)``):

    * ``gold_sparsity``  = 1 - |gold| / |valid|
    * ``graph_sparsity`` = 1 - |pred| / |valid|
    * ``recall``         = |pred ∩ gold| / |gold|   (1 when the sentence has no gold pair)
    * ``exact``          = fraction of valid queries (rows with a valid pair) whose every gold key is predicted
      (a query with no gold key counts as exact)

    then the plain mean over sentences (as the paper: per sentence, then averaged), skipping sentences with no
    valid pair. ``per_sentence=True`` returns the ``(B, H)`` values instead, NaN for sentences with no valid pair,
    so that callers can pool batches and take ``nanmean(0)``.
    """
    valid = valid_pairs.bool().expand_as(pred)
    pred, gold = pred.bool() & valid, gold.bool() & valid
    n_valid = valid.sum((-1, -2)).double()
    n_gold = gold.sum((-1, -2)).double()
    hits = (pred & gold).sum((-1, -2)).double()
    queries = valid.any(-1)
    exact_queries = queries & ~(gold & ~pred).any(-1)
    has_pairs = n_valid > 0
    nan = torch.full_like(n_valid, float("nan"))
    values = {
        "gold_sparsity": 1 - n_gold / n_valid.clamp_min(1),
        "graph_sparsity": 1 - pred.sum((-1, -2)).double() / n_valid.clamp_min(1),
        "recall": torch.where(n_gold > 0, hits / n_gold.clamp_min(1), torch.ones_like(hits)),
        "exact": exact_queries.sum(-1).double() / queries.sum(-1).clamp_min(1).double(),
    }
    values = {name: torch.where(has_pairs, v, nan) for name, v in values.items()}
    if per_sentence:
        return values
    return {name: v.nanmean(0) for name, v in values.items()}


# --------------------------------------------------------------------------------------------------------------
# Fitting a model's predictors
# --------------------------------------------------------------------------------------------------------------


def collect_attention(
    model: nn.Module,
    dataloader,
    max_batches: int | None = None,
    max_sentences: int = 512,
    progress: bool = True,
) -> dict[int, list[FitBatch]]:
    """Run ``model`` (eval mode, no gradients, dense attention) and record, for every attention module with a
    predictor, its queries, keys, gold graph (the pairs entmax keeps) and valid pairs, on CPU.

    Memory-bounded: stops after ``max_sentences`` sentences per layer or ``max_batches`` batches. The model tells
    which modules have predictors through ``model.sparsefinder_modules()`` → ``{layer: attention_module}``; their
    attention function hands a ``sparsefinder_collector`` its ``(module, query, key, probabilities, allowed)``.
    """
    from tqdm.auto import tqdm  # a dependency of transformers, so remote code has it too

    modules = model.sparsefinder_modules()
    if not modules:
        raise ValueError("this model has no Sparsefinder predictors: build it with a `sparsefinder` config")
    collected: dict[int, list[FitBatch]] = {i: [] for i in modules}
    seen = dict.fromkeys(modules, 0)

    def collector_for(layer: int):
        def collect(module, query, key, probs, allowed):
            if seen[layer] >= max_sentences:
                return
            b, _, lq, lk = probs.shape
            valid = allowed if allowed is not None else torch.ones(b, 1, lq, lk, dtype=torch.bool, device=probs.device)
            gold = (probs > 0) & valid
            collected[layer].append(FitBatch(query.detach().cpu(), key.detach().cpu(), gold.cpu(), valid.cpu()))
            seen[layer] += b

        return collect

    was_training = model.training
    model.eval()
    for layer, module in modules.items():
        module.sparsefinder_collector = collector_for(layer)
    try:
        with torch.no_grad():
            for step, batch in enumerate(tqdm(dataloader, desc="collecting attention", disable=not progress)):
                if (max_batches is not None and step >= max_batches) or min(seen.values()) >= max_sentences:
                    break
                model(**{k: v.to(model.device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
    finally:
        for module in modules.values():
            module.sparsefinder_collector = None
        model.train(was_training)
    empty = [layer for layer, batches in collected.items() if not batches]
    if empty:
        raise ValueError(f"no attention was collected for layers {empty}: is the dataloader empty?")
    return collected


def fit(
    model: nn.Module,
    dataloader,
    epochs: int = 3,
    lr: float = 1e-3,
    max_batches: int | None = None,
    max_sentences: int = 512,
    seed: int = 0,
    progress: bool = True,
) -> dict[int, list[float]]:
    """Fit every predictor of ``model`` on the attention it computes over ``dataloader``; return losses per layer.

    Two passes, as the reference pipeline: (1) :func:`collect_attention`; (2) train the projections with the
    margin loss for ``epochs`` epochs (Adam, ``lr``, clipping 1.0) and/or fit k-means centroids. Only predictor
    state changes; the model's own weights are untouched.
    """
    from tqdm.auto import tqdm

    collected = collect_attention(model, dataloader, max_batches, max_sentences, progress)
    settings = resolve_config(model.config.sparsefinder)
    generator = torch.Generator().manual_seed(seed)
    losses: dict[int, list[float]] = {}
    method = settings["method"]
    for layer, module in model.sparsefinder_modules().items():
        state, batches = module.sparsefinder, collected[layer]
        losses[layer] = []
        if method in PROJECTED_METHODS:
            with tqdm(total=epochs * len(batches), desc=f"fitting layer {layer}", disable=not progress) as bar:
                losses[layer] = fit_projections(
                    state, batches, settings, epochs, lr=lr, generator=generator, on_step=lambda *_, b=bar: b.update()
                )
        if method in CENTROID_METHODS:
            fit_centroids(state, batches, settings, seed=seed)
        state.fitted.fill_(True)
    return losses


__all__ = list(_TRAINING_SIDE)  # one list: hf_sparse.sparsefinder still finds these names here
