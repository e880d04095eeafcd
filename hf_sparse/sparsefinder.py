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

This module is what runs in the forward: the settings, the predictor state, the prediction (a block of queries
at a time, :class:`Prediction`) and the predicted-sparse attention (:func:`attend_predicted`, gathering; and
:func:`attend_predicted_fused`, the same pairs as block and element masks of the fused Triton kernel). It is imported
by remote code: torch, the standard library and sibling modules only. Gold graphs, the projection loss, k-means,
fitting and graph metrics are the training side, :mod:`hf_sparse.sparsefinder_fit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from .attention import FUSED_ALPHA, AttentionMask, attend, normalize
from .block_maps import cached_block_map
from .checks import check_settings_dict
from .entmax_triton import entmax_attention
from .pair_codes import MAX_WORDS, PairCodes, distance_pairs
from .patterns import hash_uniform, rows_mask

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
    cfg = dict(check_settings_dict("sparsefinder", cfg or {}, "{'method': 'distance', 'threshold': 1.0}"))
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


def runs_predicted(module: nn.Module) -> bool:
    """Whether the attention ``module``'s next forward runs predicted-sparse attention (:func:`attend_layer`): it
    has a predictor, enabled in the config, in eval mode, and no collector is gathering its attention."""
    return (
        getattr(module, "sparsefinder", None) is not None
        and getattr(module, "sparsefinder_collector", None) is None
        and not module.training
        and bool((module.config.sparsefinder or {}).get("enabled"))
    )


def check_predictors_built(settings: dict | None, attentions, where: str, model_class: str) -> None:
    """Refuse enabled ``settings`` that name layers whose attention module (``attentions[i]`` for layer ``i``) has
    no predictor: predictors are made when the model is built, so settings given to a built model (or naming more
    ``layers``) would leave those layers dense, silently. Python objects only: no device is read."""
    if settings is None or not settings.get("enabled"):
        return
    wanted = resolve_config(settings)
    built = [getattr(attention, "sparsefinder", None) is not None for attention in attentions]
    missing = [i for i, has in enumerate(built) if predicts_layer(wanted, i) and not has]
    if missing:
        raise ValueError(
            f"config.sparsefinder enables predicted attention (method {wanted['method']!r}), but {where} {missing} "
            "have no predictor: predictors are made when the model is built, so settings given to a built model "
            f"would leave those layers dense. Build the model with them, e.g. {model_class}.from_pretrained(path, "
            "sparsefinder={...}) or from a config whose sparsefinder is set, then fit the predictors "
            "(hf_sparse.sparsefinder_fit.fit)"
        )


# --------------------------------------------------------------------------------------------------------------
# Valid pairs and the gold graph
# --------------------------------------------------------------------------------------------------------------


def _positions(
    num_queries: int, num_keys: int, query_offset: int | torch.Tensor, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute query positions ``(Lq, 1)`` (starting at ``query_offset``) and key positions ``(1, Lk)``.

    ``query_offset`` may be a 0-d integer tensor (a static cache's length lives on the device): added, never read."""
    qpos = torch.arange(num_queries, device=device).view(-1, 1) + query_offset
    kpos = torch.arange(num_keys, device=device).view(1, -1)
    return qpos, kpos


def valid_pairs(
    valid_keys: torch.Tensor | None,
    num_queries: int,
    num_keys: int,
    causal: bool,
    valid_queries: torch.Tensor | None = None,
    query_offset: int | torch.Tensor = 0,
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


def window_pairs(
    num_queries: int, num_keys: int, window: int, query_offset: int | torch.Tensor = 0, device=None
) -> torch.Tensor:
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

    def is_fitted(self) -> bool:
        """``fitted`` as a Python bool, read from the device once per value of the buffer, not every forward."""
        state = (self.fitted.data_ptr(), self.fitted._version)
        if getattr(self, "_fitted_read", (None,))[0] != state:
            self._fitted_read = (state, bool(self.fitted))
        return self._fitted_read[1]

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


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a_i - b_j||²`` for ``(..., Lq, D)`` and ``(..., Lk, D)`` → ``(..., Lq, Lk)``.

    Expanded as ``|a|² + |b|² - 2 a·b`` (no ``Lq x Lk x D`` intermediate), clamped at 0 against rounding.
    """
    sq = a.pow(2).sum(-1).unsqueeze(-1) + b.pow(2).sum(-1).unsqueeze(-2) - 2 * a @ b.transpose(-1, -2)
    return sq.clamp_min(0)


# --------------------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------------------


def _distance_codes(q_proj: torch.Tensor, k_proj: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``distance`` threshold's pairs as distance codes (:mod:`hf_sparse.pair_codes`), float64 ``(B, H, L, r +
    1)``: ``||q' - k'||² <= t²  ⟺  2 q'·k' - |k'|² >= |q'|² - t²``, so a query is ``[q', |q'|² - t²]`` and a key
    ``[2k', -|k'|²]`` (coordinates rounded to float32 first, as the test reads them), one multiply-add per
    coordinate and one comparison per pair (:func:`hf_sparse.pair_codes.distance_pairs`), the same bits in torch and
    in the fused kernel."""
    q32, k32 = q_proj.float().double(), k_proj.float().double()
    q_codes = torch.cat([q32, q32.pow(2).sum(-1, keepdim=True) - threshold**2], -1)
    k_codes = torch.cat([2 * k32, -k32.pow(2).sum(-1, keepdim=True)], -1)
    return q_codes, k_codes


def _nearest_clusters(x: torch.Tensor, centroids: torch.Tensor, top: int) -> torch.Tensor:
    """Bool ``(B, H, L, C)``: membership of each token in its ``top`` nearest centroids ``(H, C, D)``."""
    dist = _squared_distances(x, centroids.unsqueeze(0).to(x.dtype))
    idx = dist.topk(top, dim=-1, largest=False).indices
    return torch.zeros_like(dist, dtype=torch.bool).scatter_(-1, idx, True)


def _share_cluster(q_members: torch.Tensor, k_members: torch.Tensor) -> torch.Tensor:
    return (q_members.float() @ k_members.float().transpose(-1, -2)) > 0


def _quantization_buckets(
    q_proj: torch.Tensor, k_proj: torch.Tensor, valid_keys: torch.Tensor | None, settings: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-size buckets of the sorted valid keys per dimension (keys sorted once per dimension); queries placed
    by the key bucket boundaries. Returns the query and key buckets, ``(B, H, Lq, r)`` and ``(B, H, Lk, r)``."""
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
    # bucket of a query = how many lower bounds lie at or below it (bounds ascend; out-of-range ones are inf)
    q_bucket = torch.searchsorted(
        bounds.transpose(-1, -2).contiguous(), q_proj.transpose(-1, -2).contiguous().to(bounds.dtype), right=True
    ).transpose(-1, -2)  # (B, H, Lq, r)
    return q_bucket, k_bucket


def _lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Reformer hashing: argmax over ``[xR, -xR]`` per round. ``(B, H, L, d)`` → ``(B, H, rounds, L)``."""
    if rotations.shape[-1] == 0:  # a single bucket
        return torch.zeros(*x.shape[:2], rotations.shape[1], x.shape[2], dtype=torch.long, device=x.device)
    rotated = torch.einsum("bhld,hndr->bhnlr", x.to(rotations.dtype), rotations)
    return torch.cat([rotated, -rotated], dim=-1).argmax(-1)


def _bigbird_pairs(allowed: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, settings: dict) -> torch.Tensor:
    """Global tokens plus ``random_keys`` random allowed keys per query (the window is added by the caller).

    The random keys are the allowed keys with the highest hash of (absolute query position, key position, seed):
    no stored table, any length, and incremental decoding draws the same keys as the full sequence.
    """
    g = settings["global_tokens"]
    pairs = ((qpos < g) | (kpos < g)).view(1, 1, *allowed.shape[-2:])
    r = min(settings["random_keys"], allowed.shape[-1])
    if r > 0:
        scores = hash_uniform(qpos, kpos, settings["seed"]).expand_as(allowed)
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


class Prediction:
    """A layer's predicted pairs for one forward, produced a block of queries at a time.

    What a method needs from the whole sequence (projections, key buckets with keys sorted once per dimension,
    cluster memberships, hashes) is computed once at construction; :meth:`rows` then gives the pairs of queries
    ``start:stop`` as bool ``(B, H, stop - start, Lk)``, so no ``(B, H, Lq, Lk)`` tensor (nor a float distance or
    sort index of that size) needs to exist. Query ``i`` sits at absolute position ``query_offset + i``
    (incremental decoding: ``Lq = 1`` and the keys are the cache). Every method's pairs are united with the window
    ``|i - j| <= window`` and restricted to :func:`valid_pairs`.
    """

    @torch.no_grad()
    def __init__(
        self,
        layer_state: SparsefinderLayer,
        q: torch.Tensor,
        k: torch.Tensor,
        settings: dict,
        valid_keys: torch.Tensor | None,
        causal: bool,
        query_offset: int | torch.Tensor = 0,
        valid_queries: torch.Tensor | None = None,
    ):
        self.cfg = cfg = resolve_config(settings)
        self.method = method = cfg["method"]
        self.batch, self.heads, self.num_queries, _ = q.shape
        self.num_keys, self.device = k.shape[2], q.device
        self.valid_keys, self.valid_queries = valid_keys, valid_queries
        self.causal, self.query_offset = causal, query_offset
        h, top = self.heads, cfg["top_clusters"]
        if method in PROJECTED_METHODS:
            q_proj, k_proj = layer_state.project(q, k)
            if method == "distance" and cfg["top_k"] is None:
                self.features = _distance_codes(q_proj, k_proj, float(cfg["threshold"]))
            elif method == "distance":
                self.features = (q_proj, k_proj)
            elif method == "quantization":
                self.features = _quantization_buckets(q_proj, k_proj, valid_keys, cfg)
            else:
                centroids = _require(layer_state, "centroids", (h, cfg["num_clusters"], cfg["projection_dim"]), method)
                self.features = (_nearest_clusters(q_proj, centroids, top), _nearest_clusters(k_proj, centroids, top))
        elif method == "routing":
            centroids = _require(layer_state, "centroids", (h, cfg["num_clusters"], q.shape[-1]), method)
            qn = nn.functional.normalize(q.to(centroids.dtype), dim=-1)
            kn = nn.functional.normalize(k.to(centroids.dtype), dim=-1)
            self.features = (_nearest_clusters(qn, centroids, top), _nearest_clusters(kn, centroids, top))
        elif method == "lsh":
            shape = (h, cfg["num_hashes"], q.shape[-1], cfg["num_buckets"] // 2)
            rotations = _require(layer_state, "rotations", shape, method)
            self.features = (_lsh_buckets(q, rotations), _lsh_buckets(k, rotations))
        else:  # window, bigbird: positions only
            self.features = ()

    @torch.no_grad()
    def rows(self, start: int, stop: int, pattern: torch.Tensor | None = None, union: bool = False) -> torch.Tensor:
        """Predicted pairs of queries ``start:stop``: bool ``(B, H, stop - start, Lk)``.

        ``pattern`` (bool, broadcastable) is a fixed pattern for these rows, met by intersection or ``union``
        before the pairs are restricted to valid ones (so a union never brings back a padding key).
        """
        cfg, method = self.cfg, self.method
        c, lk, offset = stop - start, self.num_keys, self.query_offset + start
        valid_queries = None if self.valid_queries is None else self.valid_queries[..., start:stop]
        allowed = valid_pairs(self.valid_keys, c, lk, self.causal, valid_queries, offset, self.device)
        pred = window_pairs(c, lk, cfg["window"], offset, self.device).view(1, 1, c, lk)
        if method == "distance" and cfg["top_k"] is None:
            q_codes, k_codes = self.features
            pred = pred | distance_pairs(q_codes[:, :, start:stop], k_codes)
        elif method == "distance":
            q_proj, k_proj = self.features
            dist = _squared_distances(q_proj[:, :, start:stop], k_proj).masked_fill(~allowed, float("inf"))
            idx = dist.topk(min(cfg["top_k"], lk), dim=-1, largest=False).indices
            pred = pred | torch.zeros_like(dist, dtype=torch.bool).scatter_(-1, idx, True)
        elif method == "quantization":
            q_bucket, k_bucket = self.features
            pred = pred | (q_bucket[:, :, start:stop].unsqueeze(-2) == k_bucket.unsqueeze(-3)).any(-1)
        elif method in ("clustering", "routing"):
            q_members, k_members = self.features
            pred = pred | _share_cluster(q_members[:, :, start:stop], k_members)
        elif method == "lsh":
            q_buckets, k_buckets = self.features
            pred = pred | (q_buckets[..., start:stop].unsqueeze(-1) == k_buckets.unsqueeze(-2)).any(2)
        elif method == "bigbird":
            qpos, kpos = _positions(c, lk, offset, self.device)
            pred = pred | _bigbird_pairs(allowed.expand(self.batch, 1, c, lk), qpos, kpos, cfg)
        if pattern is not None:
            pred = pred | pattern if union else pred & pattern
        if self.valid_keys is not None or valid_queries is not None or self.causal:  # else every pair is valid
            pred = pred & allowed
        return pred.expand(self.batch, self.heads, c, lk)

    def codes(self) -> PairCodes | None:
        """The same pairs as :meth:`rows` (without a pattern) as per-token codes the fused kernel tests inside its
        tiles (:class:`hf_sparse.pair_codes.PairCodes`), or ``None`` where a pair is not decided by its two tokens
        alone: ``distance`` with ``top_k`` and ``bigbird`` (each query's own selection of keys), or more code words
        than the kernels take.

        Clusters (``clustering``, ``routing``) become membership bits, buckets (``quantization``: one word per
        projected dimension; ``lsh``: one per hashing round) words compared for equality, and the ``distance``
        threshold the projections as distance codes (:func:`_distance_codes`); padding and the query offset become
        positions, which also carry the window. Causality is the kernel's (its ``causal``)."""
        method, cfg = self.method, self.cfg
        if method == "distance" and cfg["top_k"] is None:
            (queries, keys), match = self.features, "distance"
        elif method in ("clustering", "routing"):
            q_members, k_members = self.features
            queries, keys, match = _membership_words(q_members), _membership_words(k_members), "bits"
        elif method == "quantization":
            (queries, keys), match = self.features, "equal"
        elif method == "lsh":
            q_buckets, k_buckets = self.features
            queries, keys, match = q_buckets.transpose(-1, -2), k_buckets.transpose(-1, -2), "equal"
        elif method == "window":
            queries = torch.zeros(1, 1, self.num_queries, 0, dtype=torch.int32, device=self.device)
            keys, match = queries.new_zeros(1, 1, self.num_keys, 0), "equal"
        else:
            return None
        qpos, kpos = _positions(self.num_queries, self.num_keys, self.query_offset, self.device)
        qpos, kpos = qpos.view(1, -1), kpos.view(1, -1)
        if self.valid_queries is not None:
            qpos = torch.where(self.valid_queries.to(device=self.device, dtype=torch.bool), qpos, -1)
        if self.valid_keys is not None:
            kpos = torch.where(self.valid_keys.to(device=self.device, dtype=torch.bool), kpos, -1)
        codes = PairCodes(queries, keys, match=match, window=cfg["window"], query_positions=qpos, key_positions=kpos)
        return codes if codes.words <= MAX_WORDS else None


def _membership_words(members: torch.Tensor) -> torch.Tensor:
    """bool ``(B, H, L, C)`` memberships → int64 ``(B, H, L, ceil(C / 32))`` words, bit ``c % 32`` of word
    ``c // 32`` for cluster ``c``."""
    c = members.shape[-1]
    words = math.ceil(c / 32)
    bits = nn.functional.pad(members.to(torch.int64), (0, words * 32 - c)).view(*members.shape[:-1], words, 32)
    return (bits << torch.arange(32, device=members.device)).sum(-1)


def predict_pairs(
    layer_state: SparsefinderLayer,
    q: torch.Tensor,
    k: torch.Tensor,
    settings: dict,
    valid_keys: torch.Tensor | None,
    causal: bool,
    query_offset: int | torch.Tensor = 0,
    valid_queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predicted pairs, bool ``(B, H, Lq, Lk)``, for queries ``q`` ``(B, H, Lq, d)`` and keys ``k`` ``(B, H, Lk, d)``
    (see :class:`Prediction`; this whole tensor is for metrics and fitting, the forward never builds it).
    """
    prediction = Prediction(layer_state, q, k, settings, valid_keys, causal, query_offset, valid_queries)
    lq = q.shape[2]
    chunks = [prediction.rows(s, min(s + QUERY_BLOCK, lq)) for s in range(0, lq, QUERY_BLOCK)]
    return torch.cat(chunks, dim=2).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Predicted-sparse attention
# --------------------------------------------------------------------------------------------------------------

QUERY_BLOCK = 128  # queries predicted and attended at once
KEY_BLOCK = 64  # keys per tile of the predicted-sparse execution
# How a block of queries is computed, by how its prediction looks (scripts/benchmark_model_masks.py,
# benchmarks/model_masks_cpu.md): a key gathered for one query costs about GATHER_COST keys scored in a gathered
# tile (memory traffic against a dense matmul), so each query's own keys are gathered when the most any query has,
# times GATHER_COST, is fewer than the keys of the touched tiles; else the touched tiles are gathered if they are
# at most PREDICTED_MAX_TILE_DENSITY of all; else every key is scored, with the prediction as mask.
GATHER_COST = 8
PREDICTED_MAX_TILE_DENSITY = 0.5


def _kept_keys(pairs: torch.Tensor, counts: torch.Tensor, most: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's kept keys, ``(B, H, c, most)`` positions (padded with 0) and whether each slot is real: from
    the nonzero entries of ``pairs`` (one pass), not a sort or top-k over every key."""
    rows, keys = pairs.flatten(0, 2).nonzero().unbind(-1)  # row-major: each row's keys in order
    starts = counts.flatten().cumsum(0) - counts.flatten()
    slots = torch.arange(len(rows), device=pairs.device) - starts[rows]
    index = torch.zeros(counts.numel(), most, dtype=torch.long, device=pairs.device)
    keep = torch.zeros(counts.numel(), most, dtype=torch.bool, device=pairs.device)
    index[rows, slots] = keys
    keep[rows, slots] = True
    return index.view(*counts.shape, most), keep.view(*counts.shape, most)


def _prediction(
    predictor: SparsefinderLayer,
    query: torch.Tensor,
    key: torch.Tensor,
    settings: dict,
    where: str,
    valid_keys: torch.Tensor | None,
    valid_queries: torch.Tensor | None,
    causal: bool,
    query_offset: int | torch.Tensor,
) -> Prediction:
    """The layer's :class:`Prediction` for this forward, refusing a predictor that was never fitted (``where``
    names the layer)."""
    if not predictor.is_fitted():
        raise ValueError(
            f"sparsefinder.enabled is set but the predictor of {where} is not fitted: run "
            "hf_sparse.sparsefinder_fit.fit(model, dataloader) first, or load a checkpoint saved after fitting"
        )
    return Prediction(predictor, query, key, settings, valid_keys, causal, query_offset, valid_queries)


def _pair_rows(
    prediction: Prediction,
    settings: dict,
    pattern_rows: Callable[[int, int], torch.Tensor] | None,
    allowed: torch.Tensor | None,
) -> Callable[[int, int], torch.Tensor]:
    """``rows(start, stop)``: the pairs predicted-sparse attention attends to for queries ``start:stop``, bool
    ``(B, H, stop - start, Lk)``: the prediction met with the pattern as ``combine`` says, then ``allowed``. The one
    definition both executions (:func:`attend_predicted`, :func:`attend_predicted_fused`) run on."""
    union = resolve_config(settings)["combine"] == "union"

    def rows(start: int, stop: int) -> torch.Tensor:
        pattern = None if pattern_rows is None else pattern_rows(start, stop)
        pairs = prediction.rows(start, stop, pattern, union)
        if allowed is not None:
            pairs = pairs & allowed[:, :, start:stop]
        return pairs

    return rows


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
    valid_queries: torch.Tensor | None = None,
    causal: bool = False,
    query_offset: int | torch.Tensor = 0,
    pattern_rows: Callable[[int, int], torch.Tensor] | None = None,
    allowed: torch.Tensor | None = None,
    dense_probabilities: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention on the predicted pairs only: the sparse execution of both models.

    Per block of :data:`QUERY_BLOCK` queries, the shape of the prediction (:class:`Prediction`) picks the
    computation: thin predictions gather each query's own predicted keys; predictions that touch few key tiles of
    :data:`KEY_BLOCK` keys gather those tiles (per batch row and head); dense ones score every key with the
    prediction as mask (thresholds above). Either way the result equals dense attention with every unpredicted
    pair masked out, and no ``(B, H, Lq, Lk)`` tensor exists unless ``dense_probabilities`` asks for the
    probabilities. Each block's gather sizes are two numbers read from the device (one small read per
    :data:`QUERY_BLOCK` queries: free on CPU; on CUDA, where such reads stall, :func:`attend_predicted_fused` runs
    the same pairs on the fused kernel without any).

    ``pattern_rows(start, stop)`` gives the layer's own pattern for those queries (bool, broadcastable to
    ``(B, H, stop - start, Lk)``), met as ``settings["combine"]`` says (pattern ∩ predicted, or pattern ∪
    predicted); ``allowed`` (``(B|1, H|1, Lq, Lk)``, e.g. a causal and padding mask) is always intersected.
    ``where`` names the layer in the error for an unfitted predictor.
    """
    b, h, lq, _ = query.shape
    lk = key.shape[2]
    prediction = _prediction(predictor, query, key, settings, where, valid_keys, valid_queries, causal, query_offset)
    rows_of = _pair_rows(prediction, settings, pattern_rows, allowed)
    blocks = range(0, lq, QUERY_BLOCK)

    def pairs_of(start: int) -> torch.Tensor:
        return rows_of(start, min(start + QUERY_BLOCK, lq))

    tiles = math.ceil(lk / KEY_BLOCK)
    pad = tiles * KEY_BLOCK - lk
    k_tiles = nn.functional.pad(key, (0, 0, 0, pad)).view(b, h, tiles, KEY_BLOCK, key.shape[-1])
    v_tiles = nn.functional.pad(value, (0, 0, 0, pad)).view(b, h, tiles, KEY_BLOCK, value.shape[-1])
    outs, probabilities = [], []
    for start in blocks:
        q = query[:, :, start : start + QUERY_BLOCK]
        pairs = pairs_of(start)
        c = pairs.shape[2]
        counts = pairs.sum(-1)  # (B, H, c)
        keys_hit = pairs.any(2)  # (B, H, Lk)
        hit = (nn.functional.pad(keys_hit, (0, pad)) if pad else keys_hit).view(b, h, tiles, KEY_BLOCK).any(-1)
        # most key tiles any (batch row, head) touches, most keys any query has: they size the gathers
        width, most = torch.stack([hit.sum(-1).amax(), counts.amax()]).tolist()
        if most == 0:  # no query of the block has a predicted key
            out, dense = q.new_zeros(*q.shape[:3], value.shape[-1]), q.new_zeros(pairs.shape)
        elif most * GATHER_COST <= min(width, PREDICTED_MAX_TILE_DENSITY * tiles) * KEY_BLOCK:
            # thin predictions: each query's own keys, gathered
            index, keep = _kept_keys(pairs, counts, most)  # (B, H, c, K)
            flat = index.flatten(2, 3)[..., None]
            keys = key.gather(2, flat.expand(-1, -1, -1, key.shape[-1])).view(b, h, c, most, -1)
            values = value.gather(2, flat.expand(-1, -1, -1, value.shape[-1])).view(b, h, c, most, -1)
            probs = normalize(torch.einsum("bhqd,bhqkd->bhqk", q, keys) * scaling, keep, attention_fn, alpha)
            out = torch.einsum("bhqk,bhqkd->bhqd", probs, values)
            dense = probs.new_zeros(pairs.shape).scatter_add_(-1, index, probs) if dense_probabilities else None
        elif width <= PREDICTED_MAX_TILE_DENSITY * tiles:  # the touched key tiles of each batch row and head
            columns = torch.argsort(hit.to(torch.int8), dim=-1, descending=True, stable=True)[..., :width]
            index = columns[..., None, None]
            keys = k_tiles.gather(2, index.expand(-1, -1, -1, KEY_BLOCK, k_tiles.shape[-1])).flatten(2, 3)
            values = v_tiles.gather(2, index.expand(-1, -1, -1, KEY_BLOCK, v_tiles.shape[-1])).flatten(2, 3)
            tiled = nn.functional.pad(pairs, (0, pad)).view(b, h, c, tiles, KEY_BLOCK)
            slots = columns[:, :, None, :, None].expand(-1, -1, c, -1, KEY_BLOCK)
            keep = tiled.gather(3, slots)
            probs = normalize(torch.matmul(q, keys.transpose(-1, -2)) * scaling, keep.flatten(3), attention_fn, alpha)
            out = torch.matmul(probs, values)
            if dense_probabilities:
                whole = probs.new_zeros(b, h, c, tiles, KEY_BLOCK).scatter_(3, slots, probs.view_as(slots))
                dense = whole.flatten(3)[..., :lk]
        else:  # every key, the prediction as mask
            probs = normalize(torch.matmul(q, key.transpose(-1, -2)) * scaling, pairs, attention_fn, alpha)
            out, dense = torch.matmul(probs, value), probs
        outs.append(out)
        if dense_probabilities:
            probabilities.append(dense)
    out = torch.cat(outs, dim=2).transpose(1, 2).contiguous()
    return out, torch.cat(probabilities, dim=2) if dense_probabilities else None


# The fused execution (attend_predicted_fused): the kernel's block mask in tiles of FUSED_MASK_BLOCK (its key tile on
# CUDA, so every key tile the prediction leaves empty is skipped unread); the element mask of a call holds at most
# FUSED_PAIRS_PER_CALL pairs (1 byte each: 128 MiB) and is built FUSED_PREDICT_ROWS queries at a time (what bounds
# the prediction's own float scratch, e.g. distance: 8 bytes a pair, its float64 sum).
FUSED_MASK_BLOCK = 64
#: what :func:`hf_sparse.attention.attention_backends_used` names the fused execution of predicted attention
PREDICTED_FUSED = "fused (predicted blocks)"
FUSED_PAIRS_PER_CALL = 1 << 27
FUSED_PREDICT_ROWS = 512


def _predicted_tiles(
    rows_of: Callable[[int, int], torch.Tensor],
    shape: tuple[int, int],
    start: int,
    stop: int,
    num_keys: int,
    mask_block: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs of queries ``start:stop`` against keys ``:num_keys`` as the fused kernel takes them: the tiles
    holding any pair, ``(B, H, ceil(c / mask_block), ceil(num_keys / mask_block))``, and the element mask
    ``(B, H, c, num_keys)`` (a view into a tile-padded buffer, so the tiles are one reduction over it). Device
    tensors only: nothing is read back to the host."""
    b, h = shape
    c = stop - start
    n_q, n_k = math.ceil(c / mask_block), math.ceil(num_keys / mask_block)
    padded = torch.zeros(b, h, n_q * mask_block, n_k * mask_block, dtype=torch.bool, device=device)
    for first in range(start, stop, FUSED_PREDICT_ROWS):
        last = min(first + FUSED_PREDICT_ROWS, stop)
        padded[:, :, first - start : last - start, :num_keys] = rows_of(first, last)[..., :num_keys]
    tiles = padded.view(b, h, n_q, mask_block, n_k, mask_block).any(dim=5).any(dim=3)
    return tiles, padded[:, :, :c, :num_keys]


def _fused_codes(
    prediction: Prediction, pattern_rows: Callable[[int, int], torch.Tensor] | None, allowed: torch.Tensor | None
) -> PairCodes | None:
    """The prediction's pairs as codes (:meth:`Prediction.codes`) with ``allowed`` folded into the key positions,
    or ``None`` where codes cannot say them: a pattern to meet, or ``allowed`` more than a mask of keys shared by
    every head and query (``(B|1, 1, 1, Lk)``)."""
    if pattern_rows is not None or (allowed is not None and allowed.shape[1:3] != (1, 1)):
        return None
    codes = prediction.codes()
    if codes is None or allowed is None:
        return codes
    keys_allowed = allowed[:, 0, 0].to(device=prediction.device, dtype=torch.bool)
    return replace(codes, key_positions=torch.where(keys_allowed, codes.key_positions, -1))


def attend_predicted_fused(
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
    valid_queries: torch.Tensor | None = None,
    causal: bool = False,
    query_offset: int | torch.Tensor = 0,
    pattern_rows: Callable[[int, int], torch.Tensor] | None = None,
    allowed: torch.Tensor | None = None,
    mask_block: int | None = None,
) -> torch.Tensor:
    """:func:`attend_predicted` on the fused Triton kernel (:func:`hf_sparse.entmax_triton.entmax_attention`):
    ``(B, H, Lq, D)`` inputs → ``(B, Lq, H, Dv)``, the same result (dense attention with every unpredicted pair
    masked out), entmax family only.

    The same pairs (:func:`_pair_rows`: prediction, pattern as ``combine`` says, ``allowed``, padding, causality)
    become the kernel's ``block_mask`` (the ``mask_block`` tiles, default :data:`FUSED_MASK_BLOCK`, holding any
    pair; the rest are never read) and ``keep`` (the pairs themselves, read inside those tiles). Unlike
    :func:`attend_predicted`, nothing decides on the host: no gather sizes are read from the device, so on CUDA the
    whole layer is launched without a sync. Differentiable in ``query``, ``key`` and ``value``.

    Per-token codes, where the pairs allow them (:meth:`Prediction.codes`: ``distance`` with a threshold,
    ``clustering``, ``routing``, ``quantization``, ``lsh``, ``window``; no pattern to meet, and ``allowed`` at most
    a mask of keys, as in a decoding step; causal only with an ``int`` offset): the kernel tests each pair of a
    tile from the tokens' codes and reads only the tiles that can hold a pair (:class:`hf_sparse.pair_codes.
    PairCodes`: where the tiles' code unions meet; for distance codes, exactly the tiles holding one), in one call,
    with ``O(L)`` numbers instead of any ``Lq x Lk`` tensor; ``mask_block`` is then the kernel's own tile.

    Otherwise (``distance`` with ``top_k``, ``bigbird``, a pattern, a full ``allowed``), an element mask: the
    predictors give pairs, not tiles, so it is ``B·H·Lq·Lk`` bytes, built for at most :data:`FUSED_PAIRS_PER_CALL`
    pairs at a time (query chunks of whole tiles, one kernel call each), so e.g. ``B=1, H=12, L=8192`` takes 7
    calls of 1344 queries with a 126 MiB mask each. Causal chunks pass only the keys up to their last query (and
    ``causal=True``), so the kernel never loops over the keys above the diagonal.
    """
    if attention_fn not in FUSED_ALPHA and attention_fn != "entmax_bisect":
        raise ValueError(
            f"the fused kernel runs the entmax family (entmax15, sparsemax, entmax_bisect), got attention_fn="
            f"{attention_fn!r}; use attend_predicted"
        )
    mask_block = FUSED_MASK_BLOCK if mask_block is None else mask_block
    b, h, lq, _ = query.shape
    lk = key.shape[2]
    alpha = FUSED_ALPHA.get(attention_fn, alpha)
    prediction = _prediction(predictor, query, key, settings, where, valid_keys, valid_queries, causal, query_offset)
    codes = _fused_codes(prediction, pattern_rows, allowed)
    tail = causal and isinstance(query_offset, int) and query_offset + lq <= lk
    if codes is not None and (tail or not causal):
        num_keys = query_offset + lq if tail else lk  # causal: the queries are the last of these keys
        codes = replace(codes, keys=codes.keys[:, :, :num_keys], key_positions=codes.key_positions[:, :num_keys])
        out = entmax_attention(
            query, key[:, :, :num_keys], value[:, :, :num_keys], alpha=alpha, scaling=scaling, causal=tail, keep=codes
        )
        return out.transpose(1, 2).contiguous()
    rows_of = _pair_rows(prediction, settings, pattern_rows, allowed)
    chunk = max(1, FUSED_PAIRS_PER_CALL // max(1, b * h * lk * mask_block)) * mask_block
    outs = []
    for start in range(0, lq, chunk):
        stop = min(start + chunk, lq)
        # causal: the chunk's queries are the last of the keys up to its last query (what the kernel's causal means);
        # an offset on the device (static cache) is not read back: every key, causality from the element mask
        tail = causal and isinstance(query_offset, int) and query_offset + stop <= lk
        num_keys = query_offset + stop if tail else lk
        tiles, keep = _predicted_tiles(rows_of, (b, h), start, stop, num_keys, mask_block, query.device)
        outs.append(
            entmax_attention(
                query[:, :, start:stop],
                key[:, :, :num_keys],
                value[:, :, :num_keys],
                alpha=alpha,
                scaling=scaling,
                causal=tail,
                block_mask=tiles,
                mask_block=mask_block,
                keep=keep,
            )
        )
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous()


def attend_layer(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: AttentionMask,
    *,
    where: str,
    scaling: float,
    attention_fn: str,
    alpha: float,
    dropout: float = 0.0,
    output_attentions: bool = False,
    causal: bool = False,
    valid_queries: torch.Tensor | None = None,
    predicted_probabilities: bool | None = None,
    query_offset: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention of one layer in either model: what Sparsefinder does to it, in one place.

    ``predicted_probabilities`` (default: ``output_attentions``): whether predicted-sparse attention returns its
    probabilities, scattered into ``(B, H, Lq, Lk)``: the one ``Lq x Lk`` tensor it can build.

    * predictor enabled (``config.sparsefinder["enabled"]``, eval mode, not collecting): attention on the
      predicted pairs only, met with the layer's pattern ``mask.pattern`` (SparseBERT's) as ``combine`` says and
      restricted to the real keys ``mask.valid_tokens``, or, without a pattern, to ``mask.keep`` (Marian's causal
      and padding mask; when ``mask.from_padding``, rebuilt from ``mask.valid_tokens`` and causality, as with a
      pattern, so the fused kernel may take the pairs as codes): on the fused Triton kernel
      (:func:`attend_predicted_fused`) when ``mask`` was built for it (``attention_backend="fused"``, or ``"auto"``
      where it picks the fused kernel: the entmax family on CUDA, :func:`hf_sparse.attention.choose_backend`) and
      no probabilities are asked for, else by gathering (:func:`attend_predicted`), which also returns the
      probabilities;
    * otherwise the kernel ``mask`` was built for (:func:`hf_sparse.attention.attend`); while ``fit`` collects
      (``module.sparsefinder_collector``), the collector gets the queries, keys, probabilities and the valid pairs:
      ``mask.keep`` restricted to the real queries ``valid_queries`` ``(B, Lq)``.

    ``query_offset``: the absolute position of the first query, where predicted attention places its window and
    causality (a decoder's cache length: an ``int``, or for a static cache a 0-d tensor on the device, used without
    being read back). By default the queries are the last ``Lq`` of the ``Lk`` positions (a dynamic cache holds
    exactly the earlier ones); a static cache has ``Lk = max_cache_len`` keys, mostly empty slots, so its caller
    must pass the true offset. The kernel that
    ran (``mask.backend``, ``"sparsefinder"`` (gathering) or :data:`PREDICTED_FUSED`) is left on
    ``module.attention_backend_used`` (see
    :func:`hf_sparse.attention.attention_backends_used`).
    """
    predictor = getattr(module, "sparsefinder", None)
    collector = getattr(module, "sparsefinder_collector", None)
    settings = module.config.sparsefinder
    if runs_predicted(module):
        probabilities = output_attentions if predicted_probabilities is None else predicted_probabilities
        # the fused kernel never builds probabilities: asked for them, the gathering execution returns them, and
        # says so (choose_backend picks "fused" only without output_attentions: refused when explicit, eager on auto)
        fused = mask.backend == "fused" and not probabilities
        # read by hf_sparse.attention.attention_backends_used
        module.attention_backend_used = PREDICTED_FUSED if fused else "sparsefinder"
        lq, lk, pattern = query.shape[2], key.shape[2], mask.pattern
        pattern_rows = None
        if pattern is not None and pattern.per_row:  # random keys drawn for this batch's rows
            batch, device = query.shape[0], query.device
            pattern_rows = lambda start, stop: rows_mask(pattern, lk, device, batch, start, stop)  # noqa: E731
        elif pattern is not None and not pattern.is_dense:
            block_map = cached_block_map(pattern, lk, query.device)
            pattern_rows = lambda start, stop: block_map.rows(start, stop)[None]  # noqa: E731
        common = dict(
            where=where,
            scaling=scaling,
            attention_fn=attention_fn,
            alpha=alpha,
            valid_keys=mask.valid_tokens,
            causal=causal,
            query_offset=lk - lq if query_offset is None else query_offset,
            pattern_rows=pattern_rows,
            allowed=mask.keep if pattern is None and not mask.from_padding else None,
        )
        if fused:
            return attend_predicted_fused(predictor, query, key, value, settings, **common), None
        return attend_predicted(predictor, query, key, value, settings, **common, dense_probabilities=probabilities)
    module.attention_backend_used = mask.backend
    out, probs = attend(
        query,
        key,
        value,
        mask,
        scaling=scaling,
        dropout=dropout,
        attention_fn=attention_fn,
        alpha=alpha,
        output_attentions=output_attentions or collector is not None,
    )
    if collector is not None:
        allowed = mask.keep
        if valid_queries is not None:
            real = valid_queries.to(torch.bool)[:, None, :, None]
            allowed = real if allowed is None else allowed & real
        collector(module, query, key, probs, allowed)
    return out, probs if output_attentions else None


def check_loaded_predictors(model: nn.Module, missing_keys, unexpected_keys) -> None:
    """After ``from_pretrained``: predictor state is loaded whole or not at all, and never for predictors the config
    has no place for.

    A layer's predictor with some tensors missing (a truncated or hand-edited checkpoint) would predict with a
    random projection; with ``enabled`` set, every predictor must come from the checkpoint. Missing predictors are
    fine otherwise (a stock checkpoint gets fresh, unfitted predictors to fit).
    """
    settings = getattr(model.config, "sparsefinder", None) or {}
    unexpected = sorted(k for k in unexpected_keys if ".sparsefinder." in k)
    if unexpected:
        raise ValueError(
            f"the checkpoint holds Sparsefinder state this model's config has no place for: {unexpected[:6]}"
            f"{' ...' if len(unexpected) > 6 else ''}; load it with the sparsefinder config it was saved with "
            f"(this one: {settings or None})"
        )
    missing = set(missing_keys)
    for name, module in model.named_modules():
        if not isinstance(module, SparsefinderLayer):
            continue
        keys = {f"{name}.{key}" for key in module.state_dict()}
        lost = sorted(keys & missing)
        if lost and (len(lost) < len(keys) or settings.get("enabled")):
            why = "sparsefinder.enabled is set" if len(lost) == len(keys) else "the rest of it is there"
            raise ValueError(
                f"the checkpoint lacks predictor state {lost} of {name} ({why}): the predictor would run with "
                "fresh, unfitted state. Load a complete checkpoint, or refit with hf_sparse.sparsefinder_fit.fit"
            )


def __getattr__(name: str):
    """The training-side names once lived here (``from hf_sparse.sparsefinder import fit``): still found, from
    :mod:`hf_sparse.sparsefinder_fit`, which remote code neither copies nor needs."""
    if name not in _TRAINING_SIDE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(__name__ + "_fit"), name)


_TRAINING_SIDE = (
    "FitBatch",
    "build_predictors",
    "collect_attention",
    "fit",
    "fit_centroids",
    "fit_projections",
    "gold_graph",
    "graph_metrics",
    "kmeans",
    "margin_loss",
    "sample_negatives",
)

__all__ = [
    "CENTROID_METHODS",
    "METHODS",
    "PREDICTED_FUSED",
    "PROJECTED_METHODS",
    "SPARSEFINDER_DEFAULTS",
    "Prediction",
    "SparsefinderLayer",
    "attend_layer",
    "attend_predicted",
    "attend_predicted_fused",
    "check_loaded_predictors",
    "check_model_settings",
    "check_predictors_built",
    "initialize",
    "predict_pairs",
    "predicts_layer",
    "resolve_config",
    "valid_pairs",
    "window_pairs",
]
