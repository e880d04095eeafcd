"""Time Sparsefinder's predicted attention on the fused Triton kernel against the gathering execution.

One attention layer's worth of synthetic queries, keys and values (``B x H x L x D``, BERT-base heads by default)
and a ``distance`` predictor whose threshold is set for a target pair density, or with ``--method clustering`` a
k-means predictor with ``1 / density`` centroids (``quantization``: buckets on the projections). Each one's pairs
reach the kernel as per-token codes, and are also timed as an element mask. By default the tokens come in
contiguous clusters (queries and keys near their segment's centre) and the predictor projects onto each head's
principal directions (a stand-in for fitted projections), so the prediction is block-structured; ``--projections
random`` (untrained projections) or ``--clusters 0`` (unstructured inputs) give predictions that touch most tiles,
the worst case for tile skipping. The table reports the largest difference of the fused execution to the gathering
one in float32 on the same inputs.

    python scripts/benchmark_fused_sparsefinder.py --lengths 4096 8192            # CUDA
    python scripts/benchmark_fused_sparsefinder.py --lengths 4096 --causal --density 0.05
    python scripts/benchmark_fused_sparsefinder.py --method clustering --work-only   # any machine: densities only

From another script (e.g. the GPU benchmark)::

    from benchmark_fused_sparsefinder import time_predicted_attention
    row = time_predicted_attention(8192, density=0.05)  # dict: densities, max |fused - gathered|, milliseconds

Variants: ``fused predicted`` (:func:`hf_sparse.sparsefinder.attend_predicted_fused`: prediction, masks or codes and
kernel), ``fused predicted, element mask`` (the same pairs as an element mask), ``gathered predicted``
(:func:`hf_sparse.sparsefinder.attend_predicted`, host reads per 128 queries) and ``fused dense``
(:func:`hf_sparse.entmax_triton.entmax_attention` on every pair, the attention Sparsefinder approximates). CUDA:
device time by CUDA events; elsewhere wall time (the fused kernel runs on CPU only under ``TRITON_INTERPRET=1``,
for a smoke run at small lengths).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import replace

import torch

from hf_sparse import sparsefinder
from hf_sparse.benchmarking import median_ms
from hf_sparse.entmax_triton import _causal_tiles, _code_tiles, entmax_attention
from hf_sparse.pair_codes import PairCodes
from hf_sparse.sparsefinder import FUSED_MASK_BLOCK, SparsefinderLayer, attend_predicted, attend_predicted_fused
from hf_sparse.sparsefinder_fit import kmeans


def synthetic_inputs(length, *, batch=1, heads=12, head_dim=64, clusters=16, dtype=torch.bfloat16, device="cuda",
                     seed=0):
    """``q, k, v`` ``(B, H, L, D)``; with ``clusters`` > 0, token ``i`` sits near the centre of its contiguous segment
    (``clusters`` segments), so queries score their own segment's keys highest."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=g) for _ in range(3))
    if clusters:
        centres = torch.randn(batch, heads, clusters, head_dim, generator=g) * 2
        segment = torch.arange(length) * clusters // length
        q, k = q + centres[:, :, segment], k + centres[:, :, segment]
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


@torch.no_grad()
def random_predictor(q, k, *, density=0.05, projections="pca", projection_dim=4, window=3, samples=1 << 20, seed=0):
    """A ``distance`` predictor, marked fitted, whose threshold keeps about ``density`` of the pairs (a quantile of
    the projected distances of ``samples`` random pairs: no ``L x L`` tensor).

    ``projections="pca"``: each head projects onto the top principal directions of its own queries and keys (a
    stand-in for fitted projections: it keeps the cluster structure, so the prediction is block-structured);
    ``"random"``: the untrained random projections (on clustered inputs they mix the clusters).
    """
    if projections not in ("pca", "random"):
        raise ValueError(f"projections must be 'pca' or 'random', got {projections!r}")
    b, h, length, d = q.shape
    settings = {"method": "distance", "projection_dim": projection_dim, "window": window, "enabled": True}
    layer = SparsefinderLayer(settings, h, d, generator=torch.Generator().manual_seed(seed)).to(q.device)
    layer.fitted.fill_(True)
    if projections == "pca":
        principal_projections(layer, q, k)
    q_proj, k_proj = layer.project(q, k)
    g = torch.Generator(device=q.device).manual_seed(seed)
    i, j = (torch.randint(length, (samples,), device=q.device, generator=g) for _ in range(2))
    heads = torch.randint(h, (samples,), device=q.device, generator=g)
    rows = torch.randint(b, (samples,), device=q.device, generator=g)
    dist = (q_proj[rows, heads, i] - k_proj[rows, heads, j]).norm(dim=-1)
    settings["threshold"] = float(dist.float().quantile(density))
    return layer, settings


@torch.no_grad()
def principal_projections(layer, q, k):
    """Sets ``layer``'s projections to each head's top principal directions of its own queries and keys (a
    stand-in for fitted projections: it keeps the cluster structure) and marks it fitted."""
    x = torch.cat([q[0, :, :4096], k[0, :, :4096]], dim=1).float()  # (H, n, D), a sample of the first row
    directions = torch.linalg.svd(x - x.mean(1, keepdim=True), full_matrices=False).Vh  # (H, D, D), rows
    weight = directions[:, : layer.settings["projection_dim"]].transpose(-1, -2)  # (H, D, r)
    for w, bias in ((layer.q_weight, layer.q_bias), (layer.k_weight, layer.k_bias)):
        w.copy_(weight)
        bias.zero_()
    layer.fitted.fill_(True)


@torch.no_grad()
def clustering_predictor(q, k, *, density=0.05, projection_dim=4, window=3, samples=8192):
    """A ``clustering`` predictor (the paper's k-means method) on each head's principal directions, with
    ``round(1 / density)`` centroids fitted by :func:`hf_sparse.sparsefinder_fit.kmeans` on up to ``samples``
    queries and keys spread over the first sequence (balanced clusters give about ``density`` of the pairs). Its
    pairs are decided per token: the fused execution runs it on codes (:class:`hf_sparse.pair_codes.PairCodes`),
    no element mask."""
    settings = {"method": "clustering", "projection_dim": projection_dim, "window": window, "enabled": True,
                "num_clusters": max(1, round(1 / density))}
    layer = SparsefinderLayer(settings, q.shape[1], q.shape[-1]).to(q.device)
    principal_projections(layer, q, k)
    q_proj, k_proj = layer.project(q, k)
    step = max(1, 2 * q.shape[2] // samples)
    points = torch.cat([q_proj[0, :, ::step], k_proj[0, :, ::step]], dim=1).float()  # (H, n, r)
    layer.centroids.copy_(kmeans(points, settings["num_clusters"], iterations=20)[0])
    return layer, settings


def quantization_predictor(q, k, *, density=0.05, projection_dim=4, window=3):
    """A ``quantization`` predictor on each head's principal directions, with as many buckets per dimension as make
    about ``density`` of the pairs share a bucket in some dimension (``1 - (1 - 1/n)^r``, were the dimensions
    independent). Its pairs are decided per token, so they reach the kernel as codes (one word per dimension)."""
    settings = {"method": "quantization", "projection_dim": projection_dim, "window": window, "enabled": True,
                "num_buckets": max(1, round(1 / (1 - (1 - density) ** (1 / projection_dim))))}
    layer = SparsefinderLayer(settings, q.shape[1], q.shape[-1]).to(q.device)
    principal_projections(layer, q, k)
    return layer, settings


PREDICTORS = {"clustering": clustering_predictor, "quantization": quantization_predictor}  # besides distance's


def make_predictor(q, k, method, density, projections):
    """``(SparsefinderLayer, settings)`` for ``method``: :data:`PREDICTORS`' or :func:`random_predictor`'s
    (distance)."""
    if method in PREDICTORS:
        return PREDICTORS[method](q, k, density=density)
    return random_predictor(q, k, density=density, projections=projections)


@contextlib.contextmanager
def element_mask_only():
    """The fused execution builds an element mask even where the pairs could be codes (the execution before codes,
    to compare with)."""
    codes = sparsefinder.Prediction.codes
    sparsefinder.Prediction.codes = lambda self: None
    try:
        yield
    finally:
        sparsefinder.Prediction.codes = codes


def _densities(q, k, v, call):
    """Pair and tile densities of what ``call`` hands the fused kernel: its element masks and block masks, or its
    codes (their pairs counted 512 queries at a time, their tiles in the kernel's own, for distance codes those
    :func:`hf_sparse.entmax_triton._code_tiles` finds)."""
    kept = tiles = total = total_tiles = 0
    real = sparsefinder.entmax_attention

    def count(q_, k_, v_, **kw):
        nonlocal kept, tiles, total, total_tiles
        keep, block_mask = kw["keep"], kw.get("block_mask")
        lq, lk = q_.shape[2], k_.shape[2]
        if isinstance(keep, PairCodes):  # the kernel's causality on top (the queries are the last lq keys)
            for start in range(0, lq, 512):
                part = replace(keep, queries=keep.queries[:, :, start : start + 512],
                               query_positions=keep.query_positions[:, start : start + 512])
                pairs = part.pairs().expand(*q_.shape[:2], -1, -1)
                if kw.get("causal"):
                    pairs = pairs & torch.ones(lq, lk, dtype=torch.bool, device=q_.device).tril(lk - lq)[
                        start : start + 512]
                kept, total = kept + int(pairs.sum()), total + pairs.numel()
            block_mask = keep.tiles(FUSED_MASK_BLOCK)
            if keep.match == "distance":  # boxes: what the attention kernels read are the tiles holding a pair
                block_mask = _code_tiles(keep, block_mask.to(q_.device), FUSED_MASK_BLOCK, kw.get("causal", False))
            block_mask = block_mask.expand(*q_.shape[:2], -1, -1)
            if kw.get("causal"):
                block_mask = block_mask & _causal_tiles(lq, lk, FUSED_MASK_BLOCK, q_.device)
        else:
            kept, total = kept + int(keep.sum()), total + keep.numel()
        tiles, total_tiles = tiles + int(block_mask.sum()), total_tiles + block_mask.numel()
        return real(q_, k_, v_, **kw)

    sparsefinder.entmax_attention = count
    try:
        call()
    finally:
        sparsefinder.entmax_attention = real
    return kept / total, tiles / total_tiles


def time_predicted_attention(length, *, batch=1, heads=12, head_dim=64, density=0.05, clusters=16, causal=False,
                             projections="pca", dtype=torch.bfloat16, repeats=10, device="cuda", predictor=None,
                             variants=None, method="distance"):
    """Milliseconds of each variant at ``length`` (see the module docstring), the prediction's pair and tile
    densities, and the largest difference of the fused execution to the gathering one in float32.

    ``predictor``: ``(SparsefinderLayer, settings)`` to use instead of :func:`random_predictor` (a fitted one);
    ``method="clustering"`` or ``"quantization"``: :func:`clustering_predictor` or :func:`quantization_predictor`
    instead. The fused execution takes the pairs as codes where it can (:meth:`sparsefinder.Prediction.codes`),
    and the variant ``fused predicted, element mask`` times the same pairs as an element mask.
    """
    device = torch.device(device)
    q, k, v = synthetic_inputs(length, batch=batch, heads=heads, head_dim=head_dim, clusters=clusters, dtype=dtype,
                               device=device)
    layer, settings = predictor or make_predictor(q, k, method, density, projections)
    layer.is_fitted()
    kw = dict(where="benchmark", scaling=head_dim**-0.5, attention_fn="entmax15", alpha=1.5, causal=causal)

    def element_mask():
        with element_mask_only():
            return attend_predicted_fused(layer, q, k, v, settings, **kw)

    calls = {
        "fused predicted": lambda: attend_predicted_fused(layer, q, k, v, settings, **kw),
        "fused predicted, element mask": element_mask,
        "gathered predicted": lambda: attend_predicted(layer, q, k, v, settings, **kw)[0],
        "fused dense": lambda: entmax_attention(q, k, v, scaling=head_dim**-0.5, causal=causal),
    }
    calls = {name: fn for name, fn in calls.items() if fn is not None and (variants is None or name in variants)}
    with torch.no_grad():
        fused = calls["fused predicted"]()
        # the reference: the gathering execution in float32 (in bfloat16 its own rounding moves entmax's support)
        gathered = attend_predicted(layer, q.float(), k.float(), v.float(), settings, **kw)[0]
        pair_density, tile_density = _densities(q, k, v, calls["fused predicted"])
        row = {
            "length": length,
            "pair density": pair_density,
            "tile density": tile_density,
            "max abs diff to float32 gathered": float((fused.float() - gathered.float()).abs().max()),
        }
        for name, fn in calls.items():
            fn()  # compile / warm up
            row[f"{name} ms"] = median_ms(fn, repeats, device)
    return row


@torch.no_grad()
def predicted_work(length, *, batch=1, heads=12, head_dim=64, density=0.05, clusters=16, causal=False,
                   projections="pca", method="distance", device="cpu"):
    """What the fused execution hands the kernel, without running it (any length, on a CPU): the pair density, the
    share of the ``FUSED_MASK_BLOCK`` tiles holding a pair (what the element mask's block mask reads) and, for
    codes, the share their per-tile unions let through (what the kernel reads from codes; causal: below the
    diagonal; distance codes' boxes are only candidates, among which a first kernel finds the tiles holding a pair,
    what the attention kernels then read), and the bytes of each form."""
    q, k, _ = synthetic_inputs(length, batch=batch, heads=heads, head_dim=head_dim, clusters=clusters,
                               dtype=torch.float32, device=device)
    layer, settings = make_predictor(q, k, method, density, projections)
    prediction = sparsefinder.Prediction(layer, q, k, settings, None, causal, 0)
    block = FUSED_MASK_BLOCK
    kept, tiles = 0, []
    for start in range(0, length, 8 * block):  # the element mask's tiles and pairs, as the fused execution builds them
        chunk_tiles, pairs = sparsefinder._predicted_tiles(prediction.rows, (batch, heads), start,
                                                           min(start + 8 * block, length), length, block, device)
        kept += int(pairs.sum())
        tiles.append(chunk_tiles)
    row = {"length": length, "pair density": kept / (batch * heads * length**2),
           "tiles holding a pair": float(torch.cat(tiles, 2).float().mean()),
           "element mask MiB": batch * heads * length**2 / 2**20}
    codes = prediction.codes()
    if codes is not None:
        code_tiles = codes.tiles(block).expand(batch, heads, -1, -1)
        if causal:
            code_tiles = code_tiles & _causal_tiles(length, length, block, device)
        if codes.match == "distance":  # boxes, loose: the kernel first finds the tiles holding a pair among them
            row["candidate tiles (boxes)"] = float(code_tiles.float().mean())
            row["tiles read from codes"] = row["tiles holding a pair"]  # (entmax_triton._code_tiles, tested exact)
        else:
            row["tiles read from codes"] = float(code_tiles.float().mean())
        row["codes MiB"] = codes.packed().numel() * 4 / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.05, help="target fraction of predicted pairs")
    parser.add_argument("--projections", choices=["pca", "random"], default="pca")
    parser.add_argument("--method", choices=["distance", *PREDICTORS], default="distance",
                        help="the predictor: distance, clustering or quantization (all three on per-token codes)")
    parser.add_argument("--clusters", type=int, default=16, help="contiguous token clusters (0: unstructured)")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work-only", action="store_true",
                        help="no kernel, no timing: densities and sizes of what the kernel would get (any length, CPU)")
    args = parser.parse_args()
    common = dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, density=args.density,
                  clusters=args.clusters, causal=args.causal, projections=args.projections, method=args.method,
                  device=args.device)
    if args.work_only:
        rows = [predicted_work(n, **common) for n in args.lengths]
    else:
        rows = [time_predicted_attention(n, **common, dtype=getattr(torch, args.dtype), repeats=args.repeats)
                for n in args.lengths]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU (Triton interpreter)"
    where, dtype = ("no kernel run (--work-only)", "float32") if args.work_only else (where, args.dtype)
    print(f"{where}; B={args.batch} H={args.heads} D={args.head_dim} {dtype}, causal={args.causal}, "
          f"clusters={args.clusters}, {args.method} predictor, {args.projections} projections, mask tiles "
          f"{FUSED_MASK_BLOCK}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) and not math.isnan(v) else str(v)
                                for v in row.values()) + " |")


if __name__ == "__main__":
    main()
