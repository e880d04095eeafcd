"""Time Sparsefinder's predicted attention on the fused Triton kernel against the gathering execution.

One attention layer's worth of synthetic queries, keys and values (``B x H x L x D``, BERT-base heads by default)
and a ``distance`` predictor whose threshold is set for a target pair density. By default the tokens come in
contiguous clusters (queries and keys near their segment's centre) and the predictor projects onto each head's
principal directions (a stand-in for fitted projections), so the prediction is block-structured;
``--projections random`` (untrained projections) or ``--clusters 0`` (unstructured inputs) give predictions that
touch most tiles, the worst case for tile skipping. The table reports the largest difference of the fused execution
to the gathering one in float32 on the same inputs.

    python scripts/benchmark_fused_sparsefinder.py --lengths 4096 8192            # CUDA
    python scripts/benchmark_fused_sparsefinder.py --lengths 4096 --causal --density 0.05

From another script (e.g. the GPU benchmark)::

    from benchmark_fused_sparsefinder import time_predicted_attention
    row = time_predicted_attention(8192, density=0.05)  # dict: densities, max |fused - gathered|, milliseconds

Variants: ``fused predicted`` (:func:`hf_sparse.sparsefinder.attend_predicted_fused`: prediction, masks and kernel),
``gathered predicted`` (:func:`hf_sparse.sparsefinder.attend_predicted`, host reads per 128 queries) and
``fused dense`` (:func:`hf_sparse.entmax_triton.entmax_attention` on every pair, the attention Sparsefinder
approximates). CUDA: device time by CUDA events; elsewhere wall time (the fused kernel runs on CPU only under
``TRITON_INTERPRET=1``, for a smoke run at small lengths).
"""

from __future__ import annotations

import argparse
import math

import torch

from hf_sparse import sparsefinder
from hf_sparse.benchmarking import median_ms
from hf_sparse.entmax_triton import entmax_attention
from hf_sparse.sparsefinder import FUSED_MASK_BLOCK, SparsefinderLayer, attend_predicted, attend_predicted_fused


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
        x = torch.cat([q[0, :, :4096], k[0, :, :4096]], dim=1).float()  # (H, n, D), a sample of the first row
        directions = torch.linalg.svd(x - x.mean(1, keepdim=True), full_matrices=False).Vh  # (H, D, D), rows
        weight = directions[:, :projection_dim].transpose(-1, -2)  # (H, D, r)
        for w, bias in ((layer.q_weight, layer.q_bias), (layer.k_weight, layer.k_bias)):
            w.copy_(weight)
            bias.zero_()
    q_proj, k_proj = layer.project(q, k)
    g = torch.Generator(device=q.device).manual_seed(seed)
    i, j = (torch.randint(length, (samples,), device=q.device, generator=g) for _ in range(2))
    heads = torch.randint(h, (samples,), device=q.device, generator=g)
    rows = torch.randint(b, (samples,), device=q.device, generator=g)
    dist = (q_proj[rows, heads, i] - k_proj[rows, heads, j]).norm(dim=-1)
    settings["threshold"] = float(dist.float().quantile(density))
    return layer, settings


def time_predicted_attention(length, *, batch=1, heads=12, head_dim=64, density=0.05, clusters=16, causal=False,
                             projections="pca", dtype=torch.bfloat16, repeats=10, device="cuda", predictor=None,
                             variants=None):
    """Milliseconds of each variant at ``length`` (see the module docstring), the prediction's pair and tile
    densities, and the largest difference of the fused execution to the gathering one in float32.

    ``predictor``: ``(SparsefinderLayer, settings)`` to use instead of :func:`random_predictor` (a fitted one).
    """
    device = torch.device(device)
    q, k, v = synthetic_inputs(length, batch=batch, heads=heads, head_dim=head_dim, clusters=clusters, dtype=dtype,
                               device=device)
    layer, settings = predictor or random_predictor(q, k, density=density, projections=projections)
    layer.is_fitted()
    kw = dict(where="benchmark", scaling=head_dim**-0.5, attention_fn="entmax15", alpha=1.5, causal=causal)
    calls = {
        "fused predicted": lambda: attend_predicted_fused(layer, q, k, v, settings, **kw),
        "gathered predicted": lambda: attend_predicted(layer, q, k, v, settings, **kw)[0],
        "fused dense": lambda: entmax_attention(q, k, v, scaling=head_dim**-0.5, causal=causal),
    }
    calls = {name: fn for name, fn in calls.items() if variants is None or name in variants}
    with torch.no_grad():
        fused = calls["fused predicted"]()
        # the reference: the gathering execution in float32 (in bfloat16 its own rounding moves entmax's support)
        gathered = attend_predicted(layer, q.float(), k.float(), v.float(), settings, **kw)[0]
        # the densities, from the one mask build the fused execution does (a query chunk at a time)
        kept = tiles = total = total_tiles = 0
        real = sparsefinder.entmax_attention

        def count(q_, k_, v_, *, block_mask, keep, **rest):
            nonlocal kept, tiles, total, total_tiles
            kept, total = kept + int(keep.sum()), total + keep.numel()
            tiles, total_tiles = tiles + int(block_mask.sum()), total_tiles + block_mask.numel()
            return real(q_, k_, v_, block_mask=block_mask, keep=keep, **rest)

        sparsefinder.entmax_attention = count
        try:
            calls["fused predicted"]()
        finally:
            sparsefinder.entmax_attention = real
        row = {
            "length": length,
            "pair density": kept / total,
            "tile density": tiles / total_tiles,
            "max abs diff to float32 gathered": float((fused.float() - gathered.float()).abs().max()),
        }
        for name, fn in calls.items():
            fn()  # compile / warm up
            row[f"{name} ms"] = median_ms(fn, repeats, device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--density", type=float, default=0.05, help="target fraction of predicted pairs")
    parser.add_argument("--projections", choices=["pca", "random"], default="pca")
    parser.add_argument("--clusters", type=int, default=16, help="contiguous token clusters (0: unstructured)")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = [
        time_predicted_attention(
            n, batch=args.batch, heads=args.heads, head_dim=args.head_dim, density=args.density,
            clusters=args.clusters, causal=args.causal, projections=args.projections,
            dtype=getattr(torch, args.dtype), repeats=args.repeats, device=args.device,
        )
        for n in args.lengths
    ]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU (Triton interpreter)"
    print(f"{where}; B={args.batch} H={args.heads} D={args.head_dim} {args.dtype}, causal={args.causal}, "
          f"clusters={args.clusters}, {args.projections} projections, mask tiles {FUSED_MASK_BLOCK}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) and not math.isnan(v) else str(v)
                                for v in row.values()) + " |")


if __name__ == "__main__":
    main()
