"""Sparsefinder: predict which query-key pairs α-entmax attention keeps, before computing the attention.

α-entmax gives most pairs exactly zero probability, but finding them still costs the full ``L x L`` score
matrix. Sparsefinder (Treviso et al. 2022, see REFERENCES.md) learns, per layer and head, cheap low-dimensional
projections of queries and keys (``r`` dims, "rounds") such that the pairs entmax keeps (the *gold graph*) are
close, and then predicts the pair set from the projections alone:

* ``distance``      ``||q'_i - k'_j|| <= threshold`` (or the ``top_k`` nearest keys of each query);
* ``quantization``  per projected dimension, the valid keys sorted by value are cut into equal-size buckets;
  a pair is kept when query and key share a bucket in at least one dimension;
* ``clustering``    k-means centroids on projected queries and keys; kept when they share one of their
  ``top_clusters`` nearest clusters;

and, as baselines on the raw queries and keys, ``window`` (the local window alone), ``lsh`` (Reformer-like
random-rotation hashing), ``routing`` (Routing-Transformer-like spherical k-means) and ``bigbird``
(window + global + random). Every prediction is united with the local window ``|i - j| <= window`` and then
restricted to valid pairs (no padding keys or queries, ``j <= i`` when causal).

Everything works on one layer's tensors of shape ``(B, H, L, d)`` and takes ``causal`` and a key-validity mask,
so the same code serves a causal decoder (with ``query_offset`` for incremental decoding, where the keys are the
cache) and a bidirectional encoder. All learned state (projections, centroids, rotations, ``fitted``) lives in
parameters and buffers of :class:`SparsefinderLayer`, so it travels in the state dict and the checkpoint.
Fitting helpers take already-collected tensors; collecting them from a model is the caller's business.

Imported by remote code: torch, the standard library and sibling modules only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .attention import attend_gathered

METHODS = ("distance", "quantization", "clustering", "window", "lsh", "routing", "bigbird")
#: methods whose prediction uses the learned projections
PROJECTED_METHODS = ("distance", "quantization", "clustering")
#: methods with k-means centroids (``clustering`` on projected q/k, ``routing`` on raw q/k)
CENTROID_METHODS = ("clustering", "routing")

SPARSEFINDER_DEFAULTS = {
    "method": "distance",
    "projection_dim": 4,  # r: dimensions of the projected queries and keys
    "share_projections": False,  # one projection for queries and keys
    "threshold": 1.0,  # distance: keep ||q' - k'|| <= threshold
    "top_k": None,  # distance: keep the top_k nearest keys per query instead of thresholding
    "num_buckets": 4,  # quantization: buckets per dimension (per sequence); lsh: hash buckets (1 or even)
    "bucket_size": None,  # quantization: tokens per bucket instead of num_buckets (set one of the two)
    "num_clusters": 8,  # clustering / routing: k-means centroids per head
    "top_clusters": 1,  # clustering / routing: a token belongs to its top_clusters nearest centroids
    "window": 3,  # always-attended local window |i - j| <= window; its keys are left out of the loss
    "margin": 1.0,  # margin of the projection loss
    "num_negatives": None,  # negatives per query in the loss; None: as many as its gold keys (the paper)
    "layers": None,  # layers that get predictors; None: all
    "enabled": False,  # attend only to the predicted pairs at inference
    "combine": "intersection",  # with a fixed/learned pattern in the same layer: pattern ∩ predicted, or ∪
    "num_hashes": 1,  # lsh: hashing rounds
    "global_tokens": 1,  # bigbird: the first G tokens attend to and are attended by all
    "random_keys": 2,  # bigbird: random keys per query
    "seed": 0,  # lsh rotations, bigbird random keys, k-means initialisation
}

_INT_AT_LEAST = {
    "projection_dim": 1,
    "num_clusters": 1,
    "top_clusters": 1,
    "window": 0,
    "num_hashes": 1,
    "global_tokens": 0,
    "random_keys": 0,
}
_OPTIONAL_INT_AT_LEAST = {"top_k": 1, "num_buckets": 1, "bucket_size": 1, "num_negatives": 1}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def resolve_config(cfg: dict | None) -> dict:
    """Fill defaults and refuse unknown keys or bad values, naming them and what would be valid."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(SPARSEFINDER_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown sparsefinder setting(s) {unknown}; valid settings: {sorted(SPARSEFINDER_DEFAULTS)}")
    if cfg.get("bucket_size") is not None:
        if cfg.get("num_buckets") is not None:
            raise ValueError(
                f"sparsefinder: set one of num_buckets={cfg['num_buckets']} and bucket_size={cfg['bucket_size']}, "
                "not both (num_buckets: buckets per sequence; bucket_size: tokens per bucket)"
            )
        cfg["num_buckets"] = None
    out = {**SPARSEFINDER_DEFAULTS, **cfg}
    if out["method"] not in METHODS:
        raise ValueError(f"unknown sparsefinder method {out['method']!r}; valid: {', '.join(METHODS)}")
    if out["combine"] not in ("intersection", "union"):
        raise ValueError(f"unknown sparsefinder combine {out['combine']!r}; valid: intersection, union")
    for key, low in _INT_AT_LEAST.items():
        if not _is_int(out[key]) or out[key] < low:
            raise ValueError(f"sparsefinder {key} must be an integer >= {low}, got {out[key]!r}")
    for key, low in _OPTIONAL_INT_AT_LEAST.items():
        if out[key] is not None and (not _is_int(out[key]) or out[key] < low):
            raise ValueError(f"sparsefinder {key} must be None or an integer >= {low}, got {out[key]!r}")
    for key in ("threshold", "margin"):
        if isinstance(out[key], bool) or not isinstance(out[key], (int, float)) or not out[key] >= 0:
            raise ValueError(f"sparsefinder {key} must be a number >= 0, got {out[key]!r}")
    for key in ("share_projections", "enabled"):
        if not isinstance(out[key], bool):
            raise ValueError(f"sparsefinder {key} must be true or false, got {out[key]!r}")
    if not _is_int(out["seed"]):
        raise ValueError(f"sparsefinder seed must be an integer, got {out['seed']!r}")
    if out["top_clusters"] > out["num_clusters"]:
        raise ValueError(
            f"sparsefinder top_clusters={out['top_clusters']} must be <= num_clusters={out['num_clusters']}"
        )
    if out["method"] == "lsh":
        nb = out["num_buckets"]
        if nb is None or (nb != 1 and nb % 2):
            raise ValueError(
                f"sparsefinder method 'lsh' needs num_buckets = 1 or an even number (buckets are the argmax over "
                f"[xR, -xR]), got num_buckets={nb!r}, bucket_size={out['bucket_size']!r}"
            )
    layers = out["layers"]
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not all(_is_int(x) and x >= 0 for x in layers):
            raise ValueError(f"sparsefinder layers must be None (all) or a list of layer indices >= 0, got {layers!r}")
        out["layers"] = sorted(set(layers))
    return out


def check_model_settings(sparsefinder: dict, num_layers: int, attention_fn: str, fn_name: str) -> dict:
    """What a model config must satisfy to carry predictors; returns the resolved settings.

    ``attention_fn`` (config field ``fn_name``) is the normaliser of the predicted attention: a softmax keeps every
    pair, so predicting its support is meaningless and refused.
    """
    settings = resolve_config(sparsefinder)
    missing = [layer for layer in settings["layers"] or [] if layer >= num_layers]
    if missing:
        raise ValueError(f"sparsefinder layers {missing} do not exist; the attention has layers 0..{num_layers - 1}")
    if attention_fn == "softmax":
        raise ValueError(
            f"sparsefinder predicts which pairs α-entmax keeps; with {fn_name}='softmax' every pair is kept, so there "
            f"is nothing to predict. Use {fn_name}='entmax15' (or entmax_bisect, sparsemax), or sparsefinder=None"
        )
    return settings


def predicts_layer(settings: dict, layer: int) -> bool:
    """Whether ``layer`` gets a predictor under ``settings["layers"]`` (None: every layer)."""
    return settings["layers"] is None or layer in settings["layers"]


# --------------------------------------------------------------------------------------------------------------
# Valid pairs and the gold graph
# --------------------------------------------------------------------------------------------------------------


def _positions(num_queries: int, num_keys: int, query_offset: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute query positions ``(Lq, 1)`` (starting at ``query_offset``) and key positions ``(1, Lk)``."""
    qpos = torch.arange(query_offset, query_offset + num_queries, device=device).view(-1, 1)
    kpos = torch.arange(num_keys, device=device).view(1, -1)
    return qpos, kpos


def valid_pairs(
    valid_keys: torch.Tensor | None,
    num_queries: int,
    num_keys: int,
    causal: bool,
    valid_queries: torch.Tensor | None = None,
    query_offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bool ``(B, 1, Lq, Lk)`` (``B`` = 1 without masks): key not padding, query not padding, ``j <= i`` if causal.

    ``valid_keys`` ``(B, Lk)`` and ``valid_queries`` ``(B, Lq)`` are True (or 1) for real tokens; query ``i`` sits
    at absolute position ``query_offset + i`` and key ``j`` at position ``j``.
    """
    if device is None:
        device = valid_keys.device if valid_keys is not None else "cpu"
    qpos, kpos = _positions(num_queries, num_keys, query_offset, device)
    pairs = (kpos <= qpos) if causal else torch.ones(num_queries, num_keys, dtype=torch.bool, device=device)
    pairs = pairs.view(1, 1, num_queries, num_keys)
    if valid_keys is not None:
        if valid_keys.shape[-1] != num_keys:
            raise ValueError(f"valid_keys has {valid_keys.shape[-1]} positions, the keys have {num_keys}")
        pairs = pairs & valid_keys.to(device=device, dtype=torch.bool)[:, None, None, :]
    if valid_queries is not None:
        if valid_queries.shape[-1] != num_queries:
            raise ValueError(f"valid_queries has {valid_queries.shape[-1]} positions, the queries have {num_queries}")
        pairs = pairs & valid_queries.to(device=device, dtype=torch.bool)[:, None, :, None]
    return pairs


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


def window_pairs(num_queries: int, num_keys: int, window: int, query_offset: int = 0, device=None) -> torch.Tensor:
    """Bool ``(Lq, Lk)``: ``|i - j| <= window`` in absolute positions."""
    qpos, kpos = _positions(num_queries, num_keys, query_offset, device)
    return (qpos - kpos).abs() <= window


# --------------------------------------------------------------------------------------------------------------
# State: projections, centroids, rotations
# --------------------------------------------------------------------------------------------------------------


class SparsefinderLayer(nn.Module):
    """Predictor state of one attention layer.

    Parameters: per-head linear maps of queries and keys to ``r = projection_dim`` dimensions,
    ``q_weight``/``k_weight`` ``(H, d, r)`` and ``q_bias``/``k_bias`` ``(H, r)`` (no ``k_*`` when
    ``share_projections``). Buffers, only for the method that needs them: ``centroids`` ``(H, C, r)`` for
    ``clustering`` or ``(H, C, d)`` (unit norm) for ``routing``; ``rotations`` ``(H, num_hashes, d, num_buckets//2)``
    for ``lsh``, drawn from ``seed``. ``fitted`` (bool scalar) is True once the method's learned state was fitted
    (projections for distance/quantization, centroids for clustering/routing; always for window/lsh/bigbird).
    """

    def __init__(self, settings: dict, num_heads: int, head_dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.settings = cfg = resolve_config(settings)
        self.num_heads, self.head_dim = num_heads, head_dim
        r = cfg["projection_dim"]
        self.q_weight = nn.Parameter(torch.empty(num_heads, head_dim, r))
        self.q_bias = nn.Parameter(torch.empty(num_heads, r))
        if not cfg["share_projections"]:
            self.k_weight = nn.Parameter(torch.empty(num_heads, head_dim, r))
            self.k_bias = nn.Parameter(torch.empty(num_heads, r))
        method = cfg["method"]
        if method in CENTROID_METHODS:
            dim = r if method == "clustering" else head_dim
            self.register_buffer("centroids", torch.zeros(num_heads, cfg["num_clusters"], dim))
        if method == "lsh":
            half = cfg["num_buckets"] // 2
            self.register_buffer("rotations", torch.zeros(num_heads, cfg["num_hashes"], head_dim, half))
        self.register_buffer("fitted", torch.tensor(method not in PROJECTED_METHODS + CENTROID_METHODS))
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``nn.Linear``-style uniform(±1/sqrt(d)) projections; LSH rotations redrawn from ``seed``."""
        bound = 1.0 / math.sqrt(self.head_dim)
        with torch.no_grad():
            for p in self.projection_parameters():
                p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
            if hasattr(self, "rotations"):
                g = torch.Generator().manual_seed(self.settings["seed"])
                self.rotations.copy_(torch.randn(self.rotations.shape, generator=g))
            if hasattr(self, "centroids"):
                self.centroids.zero_()
            self.fitted.fill_(self.settings["method"] not in PROJECTED_METHODS + CENTROID_METHODS)

    def projection_parameters(self) -> list[nn.Parameter]:
        """The trainable projection weights and biases (the keys' only when not shared)."""
        names = ["q_weight", "q_bias"] + ([] if self.settings["share_projections"] else ["k_weight", "k_bias"])
        return [getattr(self, n) for n in names]

    def project(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, H, L, d)`` queries and keys → ``(B, H, L, r)`` projections (in the parameters' dtype)."""
        shared = self.settings["share_projections"]
        kw, kb = (self.q_weight, self.q_bias) if shared else (self.k_weight, self.k_bias)
        q_proj = torch.einsum("bhld,hdr->bhlr", q.to(self.q_weight.dtype), self.q_weight) + self.q_bias[:, None]
        k_proj = torch.einsum("bhld,hdr->bhlr", k.to(kw.dtype), kw) + kb[:, None]
        return q_proj, k_proj

    def extra_repr(self) -> str:
        s = self.settings
        return f"method={s['method']}, heads={self.num_heads}, head_dim={self.head_dim}, r={s['projection_dim']}"


def initialize(module: nn.Module) -> None:
    """A model's ``_init_weights`` hook: fresh state for a :class:`SparsefinderLayer` through Transformers' init
    functions, which leave alone tensors already loaded from a checkpoint."""
    if isinstance(module, SparsefinderLayer):
        from transformers import initialization as init

        fresh = SparsefinderLayer(module.settings, module.num_heads, module.head_dim)
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            init.copy_(tensor, getattr(fresh, name))


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


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||²`` for ``(..., Lq, D)`` and ``(..., Lk, D)`` → ``(..., Lq, Lk)``.

    Expanded as ``|a|² + |b|² - 2 a·b`` (no ``Lq x Lk x D`` intermediate), clamped at 0 against rounding.
    """
    sq = a.pow(2).sum(-1).unsqueeze(-1) + b.pow(2).sum(-1).unsqueeze(-2) - 2 * a @ b.transpose(-1, -2)
    return sq.clamp_min(0)


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
# Prediction
# --------------------------------------------------------------------------------------------------------------


def _nearest_clusters(x: torch.Tensor, centroids: torch.Tensor, top: int) -> torch.Tensor:
    """Bool ``(B, H, L, C)``: membership of each token in its ``top`` nearest centroids ``(H, C, D)``."""
    dist = _squared_distances(x, centroids.unsqueeze(0).to(x.dtype))
    idx = dist.topk(top, dim=-1, largest=False).indices
    return torch.zeros_like(dist, dtype=torch.bool).scatter_(-1, idx, True)


def _share_cluster(q_members: torch.Tensor, k_members: torch.Tensor) -> torch.Tensor:
    return (q_members.float() @ k_members.float().transpose(-1, -2)) > 0


def _quantization_pairs(
    q_proj: torch.Tensor, k_proj: torch.Tensor, valid_keys: torch.Tensor | None, settings: dict
) -> torch.Tensor:
    """Equal-size buckets of the sorted valid keys per dimension; queries placed by the key bucket boundaries."""
    b, h, lk, r = k_proj.shape
    keys_valid = (
        torch.ones(b, lk, dtype=torch.bool, device=k_proj.device)
        if valid_keys is None
        else valid_keys.to(device=k_proj.device, dtype=torch.bool).expand(b, lk)
    )
    n_valid = keys_valid.sum(-1)  # (B,)
    if settings["bucket_size"] is not None:
        size = torch.full_like(n_valid, settings["bucket_size"])
        num_bounds = max(math.ceil(lk / settings["bucket_size"]) - 1, 0)
    else:
        size = (n_valid + settings["num_buckets"] - 1) // settings["num_buckets"]
        num_bounds = settings["num_buckets"] - 1
    size = size.clamp_min(1).view(b, 1, 1, 1)
    x = k_proj.masked_fill(~keys_valid.view(b, 1, lk, 1), float("inf"))  # padding sorts last
    sorted_x, order = x.sort(dim=2)
    rank = order.argsort(dim=2)
    k_bucket = rank // size  # (B, H, Lk, r)
    # lower bound of bucket m >= 1: the value at rank m*size, if that rank holds a valid key
    bound_rank = torch.arange(1, num_bounds + 1, device=k_proj.device).view(1, 1, -1, 1) * size
    in_range = bound_rank < n_valid.view(b, 1, 1, 1)
    bounds = sorted_x.gather(2, bound_rank.clamp_max(lk - 1).expand(b, h, num_bounds, r))
    bounds = bounds.masked_fill(~in_range, float("inf"))  # (B, H, M, r)
    q_bucket = (q_proj.unsqueeze(-2) >= bounds.unsqueeze(2)).sum(-2)  # (B, H, Lq, r)
    return (q_bucket.unsqueeze(-2) == k_bucket.unsqueeze(-3)).any(-1)


def _lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Reformer hashing: argmax over ``[xR, -xR]`` per round. ``(B, H, L, d)`` → ``(B, H, rounds, L)``."""
    if rotations.shape[-1] == 0:  # a single bucket
        return torch.zeros(*x.shape[:2], rotations.shape[1], x.shape[2], dtype=torch.long, device=x.device)
    rotated = torch.einsum("bhld,hndr->bhnlr", x.to(rotations.dtype), rotations)
    return torch.cat([rotated, -rotated], dim=-1).argmax(-1)


def _hash_uniform(qpos: torch.Tensor, kpos: torch.Tensor, seed: int) -> torch.Tensor:
    """A reproducible pseudo-random number in [0, 1) per (query position, key position), independent of length."""
    mask = 0xFFFFFFFF
    x = ((qpos * 73856093) ^ (kpos * 19349663) ^ ((seed + 1) * 83492791)) & mask
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & mask
    x = (x >> 16) ^ x
    return x.double() / float(1 << 32)


def _bigbird_pairs(allowed: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, settings: dict) -> torch.Tensor:
    """Global tokens plus ``random_keys`` random allowed keys per query (the window is added by the caller).

    The random keys are the allowed keys with the highest hash of (absolute query position, key position, seed):
    no stored table, any length, and incremental decoding draws the same keys as the full sequence.
    """
    g = settings["global_tokens"]
    pairs = ((qpos < g) | (kpos < g)).view(1, 1, *allowed.shape[-2:])
    r = min(settings["random_keys"], allowed.shape[-1])
    if r > 0:
        scores = _hash_uniform(qpos, kpos, settings["seed"]).expand_as(allowed)
        scores = scores.masked_fill(~allowed, -1.0)
        idx = scores.topk(r, dim=-1).indices
        pairs = pairs | torch.zeros(allowed.shape, dtype=torch.bool, device=allowed.device).scatter_(-1, idx, True)
    return pairs


def _require(layer_state: SparsefinderLayer, name: str, shape: tuple, method: str) -> torch.Tensor:
    state = getattr(layer_state, name, None)
    if state is None or tuple(state.shape) != shape:
        have = None if state is None else tuple(state.shape)
        raise ValueError(
            f"sparsefinder method {method!r} needs layer state {name!r} of shape {shape}, but this layer has "
            f"{have}: build the SparsefinderLayer with the same method and settings you predict with"
        )
    return state


@torch.no_grad()
def predict_pairs(
    layer_state: SparsefinderLayer,
    q: torch.Tensor,
    k: torch.Tensor,
    settings: dict,
    valid_keys: torch.Tensor | None,
    causal: bool,
    query_offset: int = 0,
    valid_queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predicted pairs, bool ``(B, H, Lq, Lk)``, for queries ``q`` ``(B, H, Lq, d)`` and keys ``k`` ``(B, H, Lk, d)``.

    ``settings`` (resolved here) choose the method; ``layer_state`` holds what it learned. Query ``i`` is at
    absolute position ``query_offset + i`` (incremental decoding: ``Lq = 1`` and the keys are the cache). The
    method's pairs are united with the window ``|i - j| <= window`` and restricted to :func:`valid_pairs`.
    """
    cfg = resolve_config(settings)
    method = cfg["method"]
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    device = q.device
    allowed = valid_pairs(valid_keys, lq, lk, causal, valid_queries, query_offset, device)
    qpos, kpos = _positions(lq, lk, query_offset, device)
    pred = window_pairs(lq, lk, cfg["window"], query_offset, device).view(1, 1, lq, lk)
    if method in PROJECTED_METHODS:
        q_proj, k_proj = layer_state.project(q, k)
        if method == "distance":
            dist = _squared_distances(q_proj, k_proj)
            if cfg["top_k"] is None:
                pred = pred | (dist <= float(cfg["threshold"]) ** 2)
            else:
                dist = dist.masked_fill(~allowed, float("inf"))
                idx = dist.topk(min(cfg["top_k"], lk), dim=-1, largest=False).indices
                pred = pred | torch.zeros_like(dist, dtype=torch.bool).scatter_(-1, idx, True)
        elif method == "quantization":
            pred = pred | _quantization_pairs(q_proj, k_proj, valid_keys, cfg)
        else:
            shape = (h, cfg["num_clusters"], cfg["projection_dim"])
            centroids = _require(layer_state, "centroids", shape, method)
            top = cfg["top_clusters"]
            pred = pred | _share_cluster(
                _nearest_clusters(q_proj, centroids, top), _nearest_clusters(k_proj, centroids, top)
            )
    elif method == "routing":
        centroids = _require(layer_state, "centroids", (h, cfg["num_clusters"], q.shape[-1]), method)
        qn = nn.functional.normalize(q.to(centroids.dtype), dim=-1)
        kn = nn.functional.normalize(k.to(centroids.dtype), dim=-1)
        top = cfg["top_clusters"]
        pred = pred | _share_cluster(_nearest_clusters(qn, centroids, top), _nearest_clusters(kn, centroids, top))
    elif method == "lsh":
        shape = (h, cfg["num_hashes"], q.shape[-1], cfg["num_buckets"] // 2)
        rotations = _require(layer_state, "rotations", shape, method)
        qb, kb = _lsh_buckets(q, rotations), _lsh_buckets(k, rotations)
        pred = pred | (qb.unsqueeze(-1) == kb.unsqueeze(-2)).any(2)
    elif method == "bigbird":
        pred = pred | _bigbird_pairs(allowed.expand(b, 1, lq, lk), qpos, kpos, cfg)
    return (pred & allowed).expand(b, h, lq, lk).contiguous()


def attend_predicted(
    predictor: SparsefinderLayer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    settings: dict,
    *,
    where: str,
    scaling: float,
    attention_fn: str,
    alpha: float,
    valid_keys: torch.Tensor | None = None,
    causal: bool = False,
    query_offset: int = 0,
    pattern: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    dense_probabilities: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention on the predicted pairs only (gathered keys per query): the sparse execution of both models.

    ``pattern`` (bool, broadcastable to ``(B, H, Lq, Lk)``) is the layer's own pattern, met as
    ``settings["combine"]`` says (pattern ∩ predicted, or pattern ∪ predicted); ``allowed`` (e.g. a causal and
    padding mask) is always intersected. ``where`` names the layer in the error for an unfitted predictor.
    """
    if not bool(predictor.fitted):
        raise ValueError(
            f"sparsefinder.enabled is set but the predictor of {where} is not fitted: run "
            "hf_sparse.sparsefinder.fit(model, dataloader) first, or load a checkpoint saved after fitting"
        )
    pairs = predict_pairs(predictor, query, key, settings, valid_keys, causal=causal, query_offset=query_offset)
    if pattern is not None:
        pairs = pairs & pattern if resolve_config(settings)["combine"] == "intersection" else pairs | pattern
    if allowed is not None:
        pairs = pairs & allowed
    return attend_gathered(
        query,
        key,
        value,
        pairs,
        scaling=scaling,
        attention_fn=attention_fn,
        alpha=alpha,
        dense_probabilities=dense_probabilities,
    )


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


__all__ = [
    "METHODS",
    "SPARSEFINDER_DEFAULTS",
    "FitBatch",
    "SparsefinderLayer",
    "attend_predicted",
    "build_predictors",
    "check_model_settings",
    "collect_attention",
    "fit",
    "fit_centroids",
    "fit_projections",
    "gold_graph",
    "initialize",
    "graph_metrics",
    "kmeans",
    "margin_loss",
    "predict_pairs",
    "predicts_layer",
    "resolve_config",
    "sample_negatives",
    "valid_pairs",
    "window_pairs",
]


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
