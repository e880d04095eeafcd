"""Pairs given by per-token codes (hf_sparse.pair_codes.PairCodes): the rule written out, the tiles, and the fused
kernel testing pairs from codes inside its tiles, against the element mask of the same pairs and a float64 dense
masked entmax from the ``entmax`` package.

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is first used).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="the fused kernel needs triton (a dev dependency)")
pytest.importorskip("entmax", reason="the float64 reference is the entmax package")

from test_fused_sparsefinder import fitted_layer, qkv, reference, spy_on_the_kernel, tiles_of  # noqa: E402

from hf_sparse.entmax_triton import _code_tiles, entmax_attention  # noqa: E402
from hf_sparse.pair_codes import PairCodes  # noqa: E402
from hf_sparse.sparsefinder import _distance_codes, attend_predicted, attend_predicted_fused  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TILE = 16  # the interpreter's kernel tile: codes' tiles are the kernel's own


def clustered_codes(b, h, length, match, seed, spread=3):
    """Codes of contiguous segments (token ``i`` in segment ``i // 8``, some tokens also in a random other one), so
    that the allowed pairs leave whole tiles empty. bits: one word, segment ``s`` is bit ``(5 s) % 32`` (bit 31
    included: negative int32 words); equal: two words, the segment and a second bucket of ``spread`` values."""
    g = torch.Generator().manual_seed(seed)
    segment = (torch.arange(length) // 8).expand(b, h, length)
    if match == "bits":
        other = torch.randint(0, 8, (b, h, length), generator=g) * (torch.rand(b, h, length, generator=g) < 0.1)
        words = (1 << (5 * segment % 32)) | (1 << (5 * other % 32)) * (other > 0)
        return words[..., None]
    second = torch.randint(0, spread, (b, h, length), generator=g) + 100
    return torch.stack([segment, second * (torch.rand(b, h, length, generator=g) < 0.05)], -1)


def clustered_distance_codes(b, h, lq, lk, seed, threshold=1.0):
    """Sparsefinder's distance codes (:func:`hf_sparse.sparsefinder._distance_codes`) of points ``(B, H, Lk, 3)``
    in contiguous segments (token ``i`` near ``(4·(i // 8), 0, 0)``), so that pairs within ``threshold`` leave whole
    tiles empty; the queries are the last ``lq`` points."""
    g = torch.Generator().manual_seed(seed)
    points = torch.randn(b, h, lk, 3, generator=g, dtype=torch.float64) * 0.25
    points[..., 0] += 4.0 * (torch.arange(lk) // 8)
    return _distance_codes(points[:, :, lk - lq :], points, threshold)


def sequential_sum(query: list, key: list) -> float:
    """The distance test's sum in Python floats (float64): the key's constant, then each coordinate's product of
    float32-rounded values, in order."""
    total = key[-1]
    for a, c in zip(query[:-1], key[:-1]):
        total = total + torch.tensor(a, dtype=torch.float32).item() * torch.tensor(c, dtype=torch.float32).item()
    return total


def dense_reference(q, k, v, pairs, scaling, alpha):
    """test_fused_sparsefinder's float64 masked entmax of the ``entmax`` package, ``(B, H, Lq, Dv)``."""
    attention_fn = {1.5: "entmax15", 2.0: "sparsemax"}.get(alpha, "entmax_bisect")
    return reference(q, k, v, pairs, scaling, attention_fn, alpha).transpose(1, 2)


def test_pairs_follow_the_rule_pair_by_pair():
    """pairs() against the rule of the module docstring, one pair at a time in Python."""
    b, h, lq, lk = 2, 2, 7, 9
    g = torch.Generator().manual_seed(0)
    for match in ("bits", "equal"):
        high = 1 << 32 if match == "bits" else 3
        queries = torch.randint(0, high, (b, 1, lq, 2), generator=g)
        keys = torch.randint(0, high, (1, h, lk, 2), generator=g)
        qpos = torch.arange(lk - lq, lk).repeat(b, 1)
        kpos = torch.arange(lk).repeat(b, 1)
        qpos[1, 2], kpos[0, 4] = -3, -1  # padding
        codes = PairCodes(queries, keys, match=match, window=1, query_positions=qpos, key_positions=kpos)
        got = codes.pairs()
        assert got.shape == (b, h, lq, lk)
        for bi in range(b):
            for hi in range(h):
                for i in range(lq):
                    for j in range(lk):
                        a, c = queries[bi, 0, i].tolist(), keys[0, hi, j].tolist()
                        if match == "bits":
                            shared = any(x & y for x, y in zip(a, c))
                        else:
                            shared = any(x == y for x, y in zip(a, c))
                        near = abs(qpos[bi, i].item() - kpos[bi, j].item()) <= 1
                        real = qpos[bi, i] >= 0 and kpos[bi, j] >= 0
                        assert got[bi, hi, i, j].item() == bool(real and (shared or near)), (match, bi, hi, i, j)


def test_distance_pairs_follow_the_rule_pair_by_pair_ties_included():
    """pairs() of distance codes against the sum written out in Python floats. Every query's constant is set to
    its sum with one key (a tie: allowed) or to the next float above it (not allowed), so a sum rounded
    differently anywhere would show."""
    b, h, lq, lk, r = 2, 2, 7, 9, 3
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(b, 1, lq, r + 1, generator=g, dtype=torch.float64)
    keys = torch.randn(1, h, lk, r + 1, generator=g, dtype=torch.float64)
    queries[..., :r] = queries[..., :r].float().double()  # the tie is only exact for the coordinates it reads
    for bi in range(b):
        for i in range(lq):
            tie = sequential_sum(queries[bi, 0, i].tolist(), keys[0, i % h, (3 * i) % lk].tolist())
            queries[bi, 0, i, r] = tie if i % 2 == 0 else math.nextafter(tie, math.inf)
    qpos, kpos = torch.arange(lk - lq, lk).repeat(b, 1), torch.arange(lk).repeat(b, 1)
    qpos[1, 2], kpos[0, 4] = -3, -1  # padding
    got = PairCodes(queries, keys, match="distance", window=1, query_positions=qpos, key_positions=kpos).pairs()
    assert got.shape == (b, h, lq, lk)
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                for j in range(lk):
                    near = abs(qpos[bi, i].item() - kpos[bi, j].item()) <= 1
                    real = qpos[bi, i] >= 0 and kpos[bi, j] >= 0
                    hit = sequential_sum(queries[bi, 0, i].tolist(), keys[0, hi, j].tolist()) >= queries[bi, 0, i, r]
                    assert got[bi, hi, i, j].item() == bool(real and (hit or near)), (bi, hi, i, j)
    for bi in range(b):  # the ties themselves: allowed on the sum, not one float above it
        for i in range(lq):
            j = (3 * i) % lk
            if qpos[bi, i] >= 0 and kpos[bi, j] >= 0 and abs(qpos[bi, i].item() - j) > 1:
                assert got[bi, i % h, i, j].item() == (i % 2 == 0), (bi, i)


def test_distance_codes_are_sparsefinders_distance_threshold():
    """_distance_codes' pairs are ``||q' - k'|| <= t``: exactly on a grid of halves (distances on the threshold
    included), and for random points wherever the distance is not within 1e-9 of it."""
    g = torch.Generator().manual_seed(1)
    grid_q = torch.randint(-4, 5, (1, 2, 30, 4), generator=g).double() / 2
    grid_k = torch.randint(-4, 5, (1, 2, 40, 4), generator=g).double() / 2
    for q, k, t in ((grid_q, grid_k, 1.5), (torch.randn(1, 2, 30, 4, generator=g, dtype=torch.float64),
                                             torch.randn(1, 2, 40, 4, generator=g, dtype=torch.float64), 1.7)):
        q, k = q.float().double(), k.float().double()
        got = PairCodes(*_distance_codes(q, k, t), match="distance").pairs()
        squared = ((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1)
        clear = (squared - t * t).abs() > 1e-9
        assert torch.equal(got[clear], (squared <= t * t)[clear])
        assert 0.05 < got.double().mean() < 0.95
        if t == 1.5:
            assert not clear.all() and torch.equal(got, squared <= t * t)  # ties, decided as <=


@pytest.mark.parametrize("match", ["bits", "equal", "distance"])
@pytest.mark.parametrize("window", [None, 2])
def test_tiles_hold_every_allowed_pair_and_leave_out_tiles_without_one(match, window):
    b, h, lq, lk = 2, 3, 45, 61
    if match == "distance":
        queries, keys = clustered_distance_codes(b, h, lq, lq + lk, seed=1)
        queries, keys = queries[:, :, :lq], keys[:, :, lq:]
    else:
        codes = clustered_codes(b, h, lq + lk, match, seed=1)
        queries, keys = codes[:, :, :lq], codes[:, :, lq:]
    qpos, kpos = torch.arange(lk - lq, lk).repeat(b, 1), torch.arange(lk).repeat(b, 1)
    kpos[1, 50:] = -1
    qpos[0, :16] = -1  # a whole tile of padding queries
    pc = PairCodes(queries, keys, match=match, window=window, query_positions=qpos, key_positions=kpos)
    exact = tiles_of(pc.pairs())
    tiles = pc.tiles(TILE)
    assert tiles.shape == exact.shape
    assert not (exact & ~tiles).any(), "a tile holding an allowed pair was left out"
    assert not tiles[0, :, 0].any()  # the padding queries' tile
    if match == "distance":  # boxes: loose; the kernel's own pair test gives the exact tiles
        assert (~tiles).any() and torch.equal(_code_tiles(pc, tiles.to(DEVICE), TILE).cpu(), exact)
        return
    assert (~tiles).sum() >= (~exact).sum() * 0.8  # most empty tiles are left out
    if match == "bits" and window is None:  # unions of bits are exact
        assert torch.equal(tiles, exact)


@pytest.mark.parametrize("tile", [1, 2, 4])
def test_distance_tiles_never_leave_out_a_pair(tile):
    """The boxes' bound holds for coordinates of one sign or either, at any scale, down to tiles of one token: every
    pair that matches lies in a tile let through, ties on the constant included (each query's constant is the
    median of its sums, so half its keys match and one ties)."""
    g = torch.Generator().manual_seed(tile)
    b, h, lq, lk, r = 2, 3, 24, 41, 4
    sign_q, sign_k = torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.tensor([-1.0, 1.0, 1.0, 1.0])
    scale = torch.tensor([1.0, 10.0, 0.01, 1.0])
    magnitude = torch.ones(r)
    magnitude[3] = 0.0  # the last coordinate of either sign
    queries = torch.randn(b, h, lq, r + 1, generator=g, dtype=torch.float64)
    keys = torch.randn(b, h, lk, r + 1, generator=g, dtype=torch.float64)
    queries[..., :r] = ((queries[..., :r].abs() + 0.5) * magnitude + queries[..., :r] * (1 - magnitude)) * sign_q
    keys[..., :r] = ((keys[..., :r].abs() + 0.5) * magnitude + keys[..., :r] * (1 - magnitude)) * sign_k * scale
    queries[..., :r] = queries[..., :r].float().double()
    keys[..., :r] = keys[..., :r].float().double()
    sums = keys[..., None, :, r] + (queries[..., :, None, :r] * keys[..., None, :, :r]).sum(-1)  # (B, H, Lq, Lk)
    queries[..., r] = sums.median(-1).values  # an approximation of the sum: the tie is made exact below
    ties = ((sums - queries[..., r, None]).abs() == (sums - queries[..., r, None]).abs().amin(-1, keepdim=True))
    for bi, hi, i, j in ties.nonzero().tolist()[::3]:  # a third of the queries tie exactly with their median key
        queries[bi, hi, i, r] = sequential_sum(queries[bi, hi, i].tolist(), keys[bi, hi, j].tolist())
    pc = PairCodes(queries, keys, match="distance")
    pairs = pc.pairs()
    assert 0.3 < pairs.double().mean() < 0.7
    exact = tiles_of(pairs, tile)
    tiles = pc.tiles(tile)
    assert not (exact & ~tiles).any(), "a tile holding a pair was left out"
    if tile == 1:  # a tile of one pair: let through only if it matches or comes within the bound's margin
        size = keys[..., None, :, r].abs() + (queries[..., :, None, :r] * keys[..., None, :, :r]).abs().sum(-1)
        near = (sums - queries[..., r, None]).abs() <= 1e-9 * (size + queries[..., r, None].abs())
        assert not (tiles & ~exact & ~near).any() and (exact | ~tiles).float().mean() > 0.99


@pytest.mark.parametrize("tile", [16, 32, 48])
def test_the_exact_tiles_of_distance_codes_are_those_holding_a_pair_among_the_candidates(tile):
    """What entmax_attention reads for distance codes: of the candidate tiles, exactly those holding an allowed
    pair, for tiles of one to three sub-tiles of the kernel (48: three of 16)."""
    b, h, lq, lk = 2, 2, 45, 100
    queries, keys = clustered_distance_codes(b, h, lq, lk, seed=2)
    qpos = torch.arange(lk - lq, lk).repeat(b, 1)
    qpos[1, 40:] = -1
    pc = PairCodes(queries.to(DEVICE), keys[:1].to(DEVICE), match="distance", window=1,
                   query_positions=qpos.to(DEVICE))
    exact = tiles_of(pc.pairs(), tile)
    candidates = pc.tiles(tile).expand_as(exact).clone()
    assert not (exact & ~candidates).any()
    candidates[:, :, :, 0] = False  # a candidate mask that leaves out some tiles holding pairs too
    got = _code_tiles(pc, candidates, tile)
    assert torch.equal(got, exact & candidates) and got.any() and (candidates & ~got).any()
    visible = torch.ones(1, 1, lq, lk, dtype=torch.bool, device=DEVICE).tril(lk - lq)  # causal: tiles a query sees
    visible = tiles_of(visible, tile)[0, 0]
    assert tile == 48 or not visible.all()  # (one tile row of 48 queries sees every key tile)
    assert torch.equal(_code_tiles(pc, candidates, tile, causal=True), exact & candidates & visible)


CASES = {  # each threshold pass reads the codes too
    "entmax15-bits-topk": dict(alpha=1.5, match="bits", window=None, causal=False, broadcast="queries",
                               threshold_pass="topk"),
    "sparsemax-equal-window-causal-stream": dict(alpha=2.0, match="equal", window=2, causal=True, broadcast="keys",
                                                 threshold_pass="stream"),
    "bisect-bits-window-bound": dict(alpha=1.3, match="bits", window=1, causal=False, broadcast=None,
                                     threshold_pass="bound"),
    "entmax15-distance-window-causal-bound": dict(alpha=1.5, match="distance", window=1, causal=True,
                                                  broadcast="queries", threshold_pass="bound"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_kernel_on_codes_equals_the_element_mask_of_the_same_pairs_and_float64_entmax(case):
    spec = CASES[case]
    b, h, lq, lk, d, scaling = 2, 2, 37, 45, 16, 0.3
    if spec["match"] == "distance":
        queries, keys = clustered_distance_codes(b, h, lq, lk, seed=len(case))
    else:
        keys = clustered_codes(b, h, lk, spec["match"], seed=len(case))
        queries = keys[:, :, lk - lq :]  # the queries are the last lq positions, coded as those keys
    if spec["broadcast"] == "queries":
        queries = queries[:1]
    elif spec["broadcast"] == "keys":
        keys = keys[:, :1]
    qpos, kpos = torch.arange(lk - lq, lk).repeat(b, 1), torch.arange(lk).repeat(b, 1)
    kpos[1, 40:] = -1
    qpos[1, 30:] = -1  # padding queries: zero rows
    pc = PairCodes(queries.to(DEVICE), keys.to(DEVICE), match=spec["match"], window=spec["window"],
                   query_positions=qpos.to(DEVICE), key_positions=kpos.to(DEVICE))
    pairs = pc.pairs().expand(b, h, lq, lk)
    if spec["causal"]:
        pairs = pairs & torch.ones(lq, lk, dtype=torch.bool, device=DEVICE).tril(lk - lq)
    assert not pc.tiles(TILE).all(), "the codes should leave whole tiles out"
    kw = dict(alpha=spec["alpha"], scaling=scaling, causal=spec["causal"], threshold_pass=spec["threshold_pass"])
    outs, grads = {}, {}
    for name, keep in (("codes", pc), ("mask", pairs)):
        q, k, v = qkv(b, h, lq, lk, d, seed=3, grad=True)
        out = entmax_attention(q, k, v, keep=keep, **kw)
        out.backward(torch.ones_like(out) + torch.arange(d, device=DEVICE, dtype=out.dtype))
        outs[name], grads[name] = out.detach(), (q.grad, k.grad, v.grad)
    torch.testing.assert_close(outs["codes"], outs["mask"], atol=1e-13, rtol=0)
    for got, want, name in zip(grads["codes"], grads["mask"], "qkv"):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0, msg=f"d{name}")
    q, k, v = qkv(b, h, lq, lk, d, seed=3)
    torch.testing.assert_close(outs["codes"].cpu(), dense_reference(q, k, v, pairs, scaling, spec["alpha"]),
                               atol=1e-9, rtol=0)
    assert torch.equal(outs["codes"][1, :, 30:], torch.zeros_like(outs["codes"][1, :, 30:]))


def test_the_kernel_decides_each_distance_pair_as_torch_does_ties_included():
    """With all scores equal (q = 0) entmax spreads each row evenly over its allowed keys, so the output is the
    mean of their values and shows the kernel's pair set exactly. Half the queries' constants tie with one key's
    sum (allowed), the other half lie the next float above (not), on full float32 coordinates: a sum the kernel
    rounded differently from torch would flip them."""
    b, h, lq, lk, r, d = 1, 2, 24, 40, 4, 16
    g = torch.Generator().manual_seed(6)
    queries = torch.randn(b, h, lq, r + 1, generator=g, dtype=torch.float64)
    keys = torch.randn(b, h, lk, r + 1, generator=g, dtype=torch.float64)
    queries[..., :r] = queries[..., :r].float().double()
    for hi in range(h):
        for i in range(lq):
            tie = sequential_sum(queries[0, hi, i].tolist(), keys[0, hi, (7 * i + hi) % lk].tolist())
            queries[0, hi, i, r] = tie if (i + hi) % 2 == 0 else math.nextafter(tie, math.inf)
    pc = PairCodes(queries.to(DEVICE), keys.to(DEVICE), match="distance")
    pairs = pc.pairs()
    assert 0.1 < pairs.double().mean() < 0.9
    _, _, v = qkv(b, h, lq, lk, d, seed=7)
    q, k = torch.zeros(b, h, lq, d, dtype=torch.float64, device=DEVICE), torch.zeros_like(v)
    out = entmax_attention(q, k, v, keep=pc)
    count = pairs.sum(-1, keepdim=True).double()
    mean = torch.where(count > 0, pairs.double() @ v / count.clamp_min(1), 0.0)
    torch.testing.assert_close(out, mean, atol=1e-12, rtol=0)


def test_a_given_block_mask_is_met_with_the_codes_tiles():
    b, h, lq, lk, d = 1, 2, 32, 48, 16
    codes = clustered_codes(b, h, lk, "bits", seed=4)
    pc = PairCodes(codes[:, :, lk - lq:], codes)
    block_mask = torch.ones(1, 1, 1, 2, dtype=torch.bool, device=DEVICE)  # tiles of 32: keys 32-47 left out
    block_mask[..., 1] = False
    q, k, v = qkv(b, h, lq, lk, d, seed=5)
    out = entmax_attention(q, k, v, keep=pc, block_mask=block_mask, mask_block=32)
    pairs = pc.pairs().clone()
    pairs[..., 32:] = False
    torch.testing.assert_close(out.cpu(), dense_reference(q, k, v, pairs, d**-0.5, 1.5), atol=1e-9, rtol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(match="any"), "match must be one of bits, equal"),
        (dict(window=-1), "window must be None or a whole number >= 0"),
        (dict(queries=torch.zeros(1, 1, 8, 1)), "queries must be an integer tensor of shape"),
        (dict(keys=torch.zeros(1, 1, 7, 1, dtype=torch.int64)), r"keys must be an integer tensor of shape \(1 or 1"),
        (dict(keys=torch.zeros(1, 1, 8, 2, dtype=torch.int64)), "same number of code words, at most 31"),
        (dict(key_positions=torch.arange(9)[None]), r"key_positions must be an integer tensor of shape \(1 or 1, 8\)"),
        (dict(query_positions=torch.ones(1, 8, dtype=torch.bool)), "query_positions must be an integer tensor"),
        (dict(match="distance"), r"queries must be a floating tensor of shape \(1 or 1, 1 or 1, 8, r \+ 1\)"),
        (dict(match="distance", queries=torch.zeros(1, 1, 8, 1), keys=torch.zeros(1, 1, 8, 1)),
         "same r \\+ 1 columns \\(r coordinates, then the constant\\), 2 to 15, got 1 and 1"),
        (dict(match="distance", queries=torch.zeros(1, 1, 8, 16), keys=torch.zeros(1, 1, 8, 16)), "2 to 15, got 16"),
    ],
)
def test_bad_codes_are_refused_naming_the_value(change, message):
    q, k, v = qkv(1, 1, 8, 8, 16)
    fields = dict(queries=torch.zeros(1, 1, 8, 1, dtype=torch.int64), keys=torch.zeros(1, 1, 8, 1, dtype=torch.int64))
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        entmax_attention(q, k, v, keep=PairCodes(**fields))


METHODS = {
    "distance": dict(method="distance", threshold=4.0),
    "clustering": dict(method="clustering", num_clusters=40, top_clusters=2),  # two code words
    "routing": dict(method="routing", num_clusters=4),
    "quantization": dict(method="quantization", num_buckets=3),
    "lsh": dict(method="lsh", num_buckets=4, num_hashes=2),
    "window": dict(method="window", window=2),
}


@pytest.mark.parametrize("method", METHODS, ids=list(METHODS))
def test_sparsefinder_methods_decided_per_token_run_on_codes_and_equal_the_gathered_execution(method, monkeypatch):
    """SparseBERT's way (padding as valid keys and queries): one kernel call on codes, no element mask."""
    b, h, lk, d = 2, 2, 40, 16
    layer, settings = fitted_layer(h, d, **METHODS[method])
    if hasattr(layer, "centroids"):
        g = torch.Generator().manual_seed(2)
        layer.centroids.copy_(torch.randn(layer.centroids.shape, generator=g, dtype=torch.float64))
    q, k, v = qkv(b, h, lk, lk, d, seed=9)
    valid = torch.ones(b, lk, dtype=torch.bool, device=DEVICE)
    valid[1, 27:] = False
    kw = dict(where="test", scaling=0.25, attention_fn="entmax15", alpha=1.5, valid_keys=valid, valid_queries=valid)
    calls = spy_on_the_kernel(monkeypatch)
    fused = attend_predicted_fused(layer, q, k, v, settings, **kw)
    assert len(calls) == 1 and isinstance(calls[0]["keep"], PairCodes)
    assert 0.05 < calls[0]["keep"].pairs().double().mean() < 0.95
    gathered, _ = attend_predicted(layer, q, k, v, settings, **kw)
    torch.testing.assert_close(fused, gathered, atol=1e-12, rtol=0)
    assert torch.equal(fused[1, 27:], torch.zeros_like(fused[1, 27:]))


def test_distance_with_more_coordinates_than_the_kernels_take_keeps_the_element_mask(monkeypatch):
    """r = 15 projected dimensions are 32 words a token: the element mask instead, the same result."""
    b, h, lk, d = 1, 2, 24, 16
    layer, settings = fitted_layer(h, d, method="distance", projection_dim=15, threshold=6.0)
    q, k, v = qkv(b, h, lk, lk, d, seed=10)
    kw = dict(where="test", scaling=0.25, attention_fn="entmax15", alpha=1.5)
    calls = spy_on_the_kernel(monkeypatch)
    fused = attend_predicted_fused(layer, q, k, v, settings, **kw)
    assert isinstance(calls[-1]["keep"], torch.Tensor) and 0.05 < calls[-1]["keep"].double().mean() < 0.95
    gathered, _ = attend_predicted(layer, q, k, v, settings, **kw)
    torch.testing.assert_close(fused, gathered, atol=1e-12, rtol=0)


def test_a_decoding_step_with_a_key_mask_runs_on_codes_and_a_full_mask_on_the_element_mask(monkeypatch):
    """Marian's way: the model's boolean mask as ``allowed``. A decoding step's mask (one query row) is a mask of
    keys and folds into the codes; a prefill's full causal mask does not, and keeps the element mask."""
    b, h, d, cached = 2, 2, 16, 33
    layer, settings = fitted_layer(h, d, method="quantization", num_buckets=4)
    valid = torch.ones(b, cached + 1, dtype=torch.bool, device=DEVICE)
    valid[0, :5] = False  # left padding
    kw = dict(where="test", scaling=0.25, attention_fn="sparsemax", alpha=2.0, causal=True, query_offset=cached)
    q, k, v = qkv(b, h, 1, cached + 1, d, seed=11)
    calls = spy_on_the_kernel(monkeypatch)
    step = attend_predicted_fused(layer, q, k, v, settings, **kw, allowed=valid[:, None, None, :])
    assert isinstance(calls[-1]["keep"], PairCodes)
    gathered, _ = attend_predicted(layer, q, k, v, settings, **kw, allowed=valid[:, None, None, :])
    torch.testing.assert_close(step, gathered, atol=1e-12, rtol=0)

    lq = 20
    q, k, v = qkv(b, h, lq, cached + 1, d, seed=12)
    allowed = torch.ones(lq, cached + 1, dtype=torch.bool, device=DEVICE).tril(cached + 1 - lq)[None, None]
    allowed = allowed & valid[:, None, None, :]
    kw["query_offset"] = cached + 1 - lq
    prefill = attend_predicted_fused(layer, q, k, v, settings, **kw, allowed=allowed)
    assert isinstance(calls[-1]["keep"], torch.Tensor)
    gathered, _ = attend_predicted(layer, q, k, v, settings, **kw, allowed=allowed)
    torch.testing.assert_close(prefill, gathered, atol=1e-12, rtol=0)


def test_causal_codes_take_only_the_keys_up_to_the_last_query(monkeypatch):
    b, h, lk, lq, d = 1, 2, 40, 24, 16
    layer, settings = fitted_layer(h, d, method="lsh", num_buckets=2)
    q, k, v = qkv(b, h, lq, lk, d, seed=13)
    kw = dict(where="test", scaling=0.3, attention_fn="entmax15", alpha=1.5, causal=True, query_offset=10)
    calls = spy_on_the_kernel(monkeypatch)
    fused = attend_predicted_fused(layer, q, k, v, settings, **kw)
    assert calls[-1]["causal"] and calls[-1]["keep"].keys.shape[2] == 10 + lq
    gathered, _ = attend_predicted(layer, q, k, v, settings, **kw)
    torch.testing.assert_close(fused, gathered, atol=1e-12, rtol=0)
