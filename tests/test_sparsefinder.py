"""Sparsefinder core: configuration, gold graphs, predictors, projection loss, fitting, metrics, state."""

import pytest
import torch
from entmax import entmax15

from hf_sparse.sparsefinder import (
    METHODS,
    SPARSEFINDER_DEFAULTS,
    SparsefinderLayer,
    predict_pairs,
    resolve_config,
    valid_pairs,
    window_pairs,
)
from hf_sparse.sparsefinder_fit import (
    FitBatch,
    build_predictors,
    fit_centroids,
    fit_projections,
    gold_graph,
    graph_metrics,
    kmeans,
    margin_loss,
    sample_negatives,
)

B, H, L, D = 2, 2, 10, 8
LENGTHS = (10, 7)  # sentence 1 is padded at the end

# Settings under which each method keeps every pair.
PERMISSIVE = {
    "distance": {"method": "distance", "threshold": 1e6, "window": 0},
    "distance_top_k": {"method": "distance", "top_k": L, "window": 0},
    "quantization_bucket_size": {"method": "quantization", "bucket_size": L, "window": 0},
    "quantization_num_buckets": {"method": "quantization", "num_buckets": 1, "window": 0},
    "clustering": {"method": "clustering", "num_clusters": 3, "top_clusters": 3, "window": 0},
    "window": {"method": "window", "window": L},
    "lsh": {"method": "lsh", "num_buckets": 1, "num_hashes": 2, "window": 0},
    "routing": {"method": "routing", "num_clusters": 3, "top_clusters": 3, "window": 0},
    "bigbird": {"method": "bigbird", "global_tokens": 0, "random_keys": L, "window": 0},
}
# Settings under which each method keeps few pairs.
RESTRICTIVE = {
    "distance": {"method": "distance", "threshold": 0.0, "window": 2},
    "distance_top_k": {"method": "distance", "top_k": 2, "window": 2},
    "quantization": {"method": "quantization", "bucket_size": 2, "projection_dim": 2, "window": 2},
    "clustering": {"method": "clustering", "num_clusters": 4, "top_clusters": 1, "window": 2},
    "window": {"method": "window", "window": 2},
    "lsh": {"method": "lsh", "num_buckets": 8, "num_hashes": 2, "window": 2},
    "routing": {"method": "routing", "num_clusters": 4, "top_clusters": 1, "window": 2},
    "bigbird": {"method": "bigbird", "global_tokens": 1, "random_keys": 1, "window": 2},
}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _key_mask(lengths=LENGTHS, n=L) -> torch.Tensor:
    return torch.arange(n).view(1, -1) < torch.tensor(lengths).view(-1, 1)


def _qk(seed: int = 0, b=B, h=H, n=L, d=D) -> tuple[torch.Tensor, torch.Tensor]:
    g = _generator(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


def _entmax_gold(q, k, valid_keys, causal):
    """The real thing: pairs with nonzero entmax15 probability."""
    n = q.shape[2]
    valid = valid_pairs(valid_keys, n, n, causal)
    scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~valid, -1e4)
    return gold_graph(entmax15(scores, dim=-1), valid_keys, causal, valid_queries=valid_keys)


def _layer(settings: dict, q, k, valid, seed: int = 0) -> SparsefinderLayer:
    """A layer for ``settings``; centroid methods get centroids fitted on ``q``/``k``."""
    layer = SparsefinderLayer(settings, q.shape[1], q.shape[-1], generator=_generator(seed))
    if settings["method"] in ("clustering", "routing"):
        fit_centroids(layer, [FitBatch(q, k, torch.zeros_like(valid.expand(-1, q.shape[1], -1, -1)), valid)], settings)
    return layer


# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------


def test_resolve_config_fills_defaults():
    cfg = resolve_config({"method": "quantization", "bucket_size": 8, "layers": [3, 1, 3]})
    assert set(cfg) == set(SPARSEFINDER_DEFAULTS)
    assert cfg["bucket_size"] == 8 and cfg["num_buckets"] is None and cfg["layers"] == [1, 3]
    assert resolve_config(None)["method"] == "distance"
    assert resolve_config(cfg) == cfg  # idempotent


@pytest.mark.parametrize(
    "cfg, named",
    [
        ({"method": "hashing"}, ["'hashing'", "distance", "quantization", "clustering", "bigbird"]),
        ({"tresholds": 1.0}, ["tresholds", "threshold"]),
        ({"top_clusters": 5, "num_clusters": 4}, ["top_clusters=5", "num_clusters=4"]),
        ({"num_buckets": 4, "bucket_size": 8}, ["num_buckets=4", "bucket_size=8"]),
        ({"method": "lsh", "num_buckets": 3}, ["lsh", "num_buckets=3"]),
        ({"projection_dim": 0}, ["projection_dim", "0"]),
        ({"threshold": -1}, ["threshold", "-1"]),
        ({"layers": [0, -2]}, ["layers", "-2"]),
        ({"enabled": "yes"}, ["enabled", "'yes'"]),
        ({"window": 1.5}, ["window", "1.5"]),
    ],
)
def test_resolve_config_rejects_bad_settings_naming_them(cfg, named):
    with pytest.raises(ValueError) as err:
        resolve_config(cfg)
    for text in named:
        assert text in str(err.value)


def test_build_predictors_only_for_chosen_layers():
    predictors = build_predictors({"layers": [0, 2]}, num_layers=3, num_heads=H, head_dim=D)
    assert list(predictors) == ["0", "2"]
    assert len(build_predictors({}, num_layers=3, num_heads=H, head_dim=D)) == 3
    with pytest.raises(ValueError, match=r"layers \[5\]"):
        build_predictors({"layers": [5]}, num_layers=3, num_heads=H, head_dim=D)


# ---------------------------------------------------------------------------------------------------------------
# gold graph and metrics on hand-built graphs
# ---------------------------------------------------------------------------------------------------------------


def test_gold_graph_drops_padding_and_future_pairs():
    probs = torch.tensor([[0.5, 0.0, 0.5], [0.2, 0.8, 0.0], [0.3, 0.3, 0.4]]).view(1, 1, 3, 3)
    keys = torch.tensor([[True, True, False]])
    bidirectional = gold_graph(probs, keys, causal=False)
    assert bidirectional[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, False]]
    causal = gold_graph(probs, keys, causal=True, valid_queries=keys)
    assert causal[0, 0].tolist() == [[True, False, False], [True, True, False], [False, False, False]]
    # incremental: one query at absolute position 1 sees keys 0 and 1 only
    step = gold_graph(torch.full((1, 1, 1, 3), 1 / 3), None, causal=True, query_offset=1)
    assert step[0, 0].tolist() == [[True, True, False]]


def test_graph_metrics_hand_computed_bidirectional_with_padding():
    # sentence 0: 3 real tokens, 9 valid pairs
    gold0 = [[1, 1, 0], [0, 1, 0], [0, 0, 1]]  # 4 gold pairs
    pred0 = [[1, 0, 0], [0, 1, 1], [1, 0, 1]]  # 5 predicted; hits (0,0) (1,1) (2,2)
    # sentence 1: token 2 is padding, 4 valid pairs; entries touching token 2 must be ignored
    gold1 = [[1, 0, 1], [1, 1, 0], [1, 1, 1]]  # valid part [[1,0],[1,1]]: 3 gold
    pred1 = [[0, 1, 1], [1, 1, 1], [0, 0, 0]]  # valid part [[0,1],[1,1]]: 3 predicted, hits (1,0) (1,1)
    gold = torch.tensor([gold0, gold1], dtype=torch.bool).unsqueeze(1)
    pred = torch.tensor([pred0, pred1], dtype=torch.bool).unsqueeze(1)
    keys = torch.tensor([[True, True, True], [True, True, False]])
    valid = valid_pairs(keys, 3, 3, causal=False, valid_queries=keys)

    per_sentence = graph_metrics(pred, gold, valid, per_sentence=True)
    # sentence 0: 1-4/9, 1-5/9, 3/4, queries 1 and 2 exact -> 2/3
    # sentence 1: 1-3/4, 1-3/4, 2/3, query 1 exact -> 1/2
    expected = {
        "gold_sparsity": [5 / 9, 1 / 4],
        "graph_sparsity": [4 / 9, 1 / 4],
        "recall": [3 / 4, 2 / 3],
        "exact": [2 / 3, 1 / 2],
    }
    for name, values in expected.items():
        assert per_sentence[name][:, 0].tolist() == pytest.approx(values)

    averaged = graph_metrics(pred, gold, valid)
    for name, value in {
        "gold_sparsity": 29 / 72,
        "graph_sparsity": 25 / 72,
        "recall": 17 / 24,
        "exact": 7 / 12,
    }.items():
        assert averaged[name].shape == (1,)
        assert averaged[name].item() == pytest.approx(value)


def test_graph_metrics_hand_computed_causal_two_heads():
    valid = valid_pairs(None, 3, 3, causal=True)  # 6 valid pairs: the lower triangle
    gold_h0 = [[1, 0, 1], [1, 0, 0], [0, 1, 1]]  # (0,2) is in the future: ignored -> 4 gold
    pred_h0 = [[1, 1, 1], [0, 1, 0], [0, 1, 1]]  # valid part (0,0) (1,1) (2,1) (2,2): 4, hits (0,0) (2,1) (2,2)
    lower = [[1, 0, 0], [1, 1, 0], [1, 1, 1]]  # head 1: predicts and keeps everything valid
    gold = torch.tensor([[gold_h0, lower]], dtype=torch.bool)
    pred = torch.tensor([[pred_h0, lower]], dtype=torch.bool)
    out = graph_metrics(pred, gold, valid)
    # head 0: 1-4/6, 1-4/6, 3/4, queries 0 and 2 exact -> 2/3; head 1: 0, 0, 1, 1
    assert out["gold_sparsity"].tolist() == pytest.approx([1 / 3, 0.0])
    assert out["graph_sparsity"].tolist() == pytest.approx([1 / 3, 0.0])
    assert out["recall"].tolist() == pytest.approx([3 / 4, 1.0])
    assert out["exact"].tolist() == pytest.approx([2 / 3, 1.0])


# ---------------------------------------------------------------------------------------------------------------
# predictors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(PERMISSIVE))
def test_recall_is_one_when_the_method_admits_everything(name, causal):
    settings = PERMISSIVE[name]
    q, k = _qk(1)
    keys = _key_mask()
    valid = valid_pairs(keys, L, L, causal, valid_queries=keys)
    gold = _entmax_gold(q, k, keys, causal)
    layer = _layer(settings, q, k, valid)
    pred = predict_pairs(layer, q, k, settings, keys, causal, valid_queries=keys)
    assert torch.equal(pred, valid.expand(B, H, L, L))
    metrics = graph_metrics(pred, gold, valid)
    assert metrics["recall"].tolist() == [1.0] * H
    assert metrics["exact"].tolist() == [1.0] * H
    assert metrics["graph_sparsity"].tolist() == [0.0] * H


def test_every_method_is_exercised():
    assert {s["method"] for s in PERMISSIVE.values()} == set(METHODS)
    assert {s["method"] for s in RESTRICTIVE.values()} == set(METHODS)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(RESTRICTIVE))
def test_predictions_respect_validity_and_always_include_the_window(name, causal):
    settings = RESTRICTIVE[name]
    q, k = _qk(2)
    keys = _key_mask()
    allowed = valid_pairs(keys, L, L, causal).expand(B, H, L, L)
    layer = _layer(settings, q, k, allowed)
    pred = predict_pairs(layer, q, k, settings, keys, causal)
    assert pred.shape == (B, H, L, L) and pred.dtype == torch.bool
    assert not (pred & ~allowed).any()  # no future keys, no padding keys
    window = window_pairs(L, L, settings["window"]) & allowed
    assert not (window & ~pred).any()
    assert pred.sum() < allowed.sum()  # these settings really are restrictive


@pytest.mark.parametrize("name", list(RESTRICTIVE))
def test_incremental_single_query_matches_the_full_sequence(name):
    settings = RESTRICTIVE[name]
    q, k = _qk(3)
    keys = _key_mask()
    layer = _layer(settings, q, k, valid_pairs(keys, L, L, True))
    full = predict_pairs(layer, q, k, settings, keys, causal=True)
    for pos in (0, 4, 9):
        query = q[:, :, pos : pos + 1]
        # keys are the whole sequence: the future must still be masked through query_offset
        step = predict_pairs(layer, query, k, settings, keys, causal=True, query_offset=pos)
        assert not step[..., pos + 1 :].any()
        assert not (step & ~keys[:, None, None, :]).any()
        assert torch.equal(step, full[:, :, pos : pos + 1])
        # keys are the cache up to the query (quantization's buckets depend on the keys present)
        cache = predict_pairs(layer, query, k[:, :, : pos + 1], settings, keys[:, : pos + 1], True, query_offset=pos)
        assert cache.shape == (B, H, 1, pos + 1)
        assert not (cache & ~keys[:, None, None, : pos + 1]).any()
        assert cache[keys[:, pos]][..., max(pos - settings["window"], 0) :].all()  # window, for real queries
        if settings["method"] != "quantization":
            assert torch.equal(cache, full[:, :, pos : pos + 1, : pos + 1])


def test_quantization_buckets_by_hand():
    # one head, r = 1 (projection = the first coordinate), keys 0..5 with values below, bucket_size 2
    layer = SparsefinderLayer({"method": "quantization", "projection_dim": 1, "bucket_size": 2}, 1, 1)
    with torch.no_grad():
        layer.q_weight.fill_(1.0), layer.k_weight.fill_(1.0), layer.q_bias.zero_(), layer.k_bias.zero_()
    k = torch.tensor([5.0, 1.0, 3.0, 0.0, 4.0, 2.0]).view(1, 1, 6, 1)
    # sorted keys 0,1 | 2,3 | 4,5 -> buckets: key0(5)->2, key1(1)->0, key2(3)->1, key3(0)->0, key4(4)->2, key5(2)->1
    q = torch.tensor([0.5, 2.0, 9.0]).view(1, 1, 3, 1)  # lower bounds 2 and 4 -> buckets 0, 1, 2
    settings = {"method": "quantization", "projection_dim": 1, "bucket_size": 2, "window": 0}
    pred = predict_pairs(layer, q, k, settings, None, causal=False, query_offset=100)  # window reaches nothing
    assert pred[0, 0].int().tolist() == [[0, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 1], [1, 0, 0, 0, 1, 0]]
    # with key 0 (value 5) as padding, the buckets are 0,1 | 2,3 | 4 over the valid keys
    keys = torch.tensor([[False, True, True, True, True, True]])
    pred = predict_pairs(layer, q, k, settings, keys, causal=False, query_offset=100)
    assert pred[0, 0].int().tolist() == [[0, 1, 0, 1, 0, 0], [0, 0, 1, 0, 0, 1], [0, 0, 0, 0, 1, 0]]


def test_distance_top_k_keeps_the_nearest_allowed_keys():
    settings = {"method": "distance", "top_k": 2, "window": 0, "projection_dim": 1}
    layer = SparsefinderLayer(settings, 1, 1)
    with torch.no_grad():
        layer.q_weight.fill_(1.0), layer.k_weight.fill_(1.0), layer.q_bias.zero_(), layer.k_bias.zero_()
    k = torch.tensor([0.0, 10.0, 2.9, 3.2, 7.0]).view(1, 1, 5, 1)
    q = torch.tensor([3.0]).view(1, 1, 1, 1)
    pred = predict_pairs(layer, q, k, settings, None, causal=False, query_offset=50)
    assert pred[0, 0, 0].int().tolist() == [0, 0, 1, 1, 0]
    # causal at position 2: only keys 0..2 are allowed, the two nearest of them are 2 and 0
    pred = predict_pairs(layer, q, k, settings, None, causal=True, query_offset=2)
    assert pred[0, 0, 0].int().tolist() == [1, 0, 1, 0, 0]


def test_bigbird_adds_global_tokens_and_a_fixed_number_of_random_keys():
    settings = {"method": "bigbird", "global_tokens": 0, "random_keys": 3, "window": 0}
    q, k = _qk(4, b=1, h=1, n=16)
    pred = predict_pairs(SparsefinderLayer(settings, 1, D), q, k, settings, None, causal=False)[0, 0]
    off_diagonal = pred & ~torch.eye(16, dtype=torch.bool)
    assert ((off_diagonal.sum(-1) >= 2) & (off_diagonal.sum(-1) <= 3)).all()
    settings = {"method": "bigbird", "global_tokens": 2, "random_keys": 0, "window": 0}
    pred = predict_pairs(SparsefinderLayer(settings, 1, D), q, k, settings, None, causal=False)[0, 0]
    expected = (torch.arange(16).view(-1, 1) < 2) | (torch.arange(16).view(1, -1) < 2) | torch.eye(16, dtype=torch.bool)
    assert torch.equal(pred, expected)


def test_predicting_with_state_of_another_method_is_refused():
    q, k = _qk(5)
    layer = SparsefinderLayer({"method": "distance"}, H, D)
    with pytest.raises(ValueError, match="'routing' needs layer state 'centroids'"):
        predict_pairs(layer, q, k, {"method": "routing"}, None, causal=False)
    # the projections serve every projected method
    assert predict_pairs(layer, q, k, {"method": "quantization"}, None, causal=False).any()


# ---------------------------------------------------------------------------------------------------------------
# projection loss
# ---------------------------------------------------------------------------------------------------------------


def _loss_by_loops(qp, kp, gold, valid, negatives, window, margin):
    """REFERENCES.md's loss written per query with Python loops."""
    batch, heads, n, _ = qp.shape
    per_head = []
    for b in range(batch):
        for h in range(heads):
            total, count = 0.0, 0
            for i in range(n):
                if not valid[b, 0, i].any():
                    continue  # padding query
                count += 1
                pos = neg = 0.0
                for j in range(n):
                    sq = ((qp[b, h, i] - kp[b, h, j]) ** 2).sum().item()
                    if gold[b, h, i, j] and valid[b, 0, i, j] and abs(i - j) > window:
                        pos += sq
                    if negatives[b, h, i, j]:
                        neg += sq
                total += max(0.0, margin + pos - neg)
            if count:
                per_head.append(total / count)
    return sum(per_head) / len(per_head)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_negatives", [None, 2])
def test_margin_loss_matches_a_per_query_loop(causal, num_negatives):
    batch, heads, n, r, window, margin = 2, 2, 7, 3, 1, 1.0
    g = _generator(6)
    qp = torch.randn(batch, heads, n, r, generator=g, dtype=torch.float64)
    kp = torch.randn(batch, heads, n, r, generator=g, dtype=torch.float64)
    keys = _key_mask((7, 5), n)
    valid = valid_pairs(keys, n, n, causal, valid_queries=keys)
    gold = (torch.rand(batch, heads, n, n, generator=g) < 0.4) & valid

    negatives = sample_negatives(gold, valid, window, num_negatives, _generator(7))
    inside = window_pairs(n, n, window)
    candidates = valid & ~gold & ~inside
    assert not (negatives & ~candidates).any()
    positives = (gold & ~inside).sum(-1)
    wanted = positives if num_negatives is None else torch.full_like(positives, num_negatives)
    assert torch.equal(negatives.sum(-1), torch.minimum(wanted, candidates.sum(-1)))
    assert negatives.any()

    expected = _loss_by_loops(qp, kp, gold, valid, negatives, window, margin)
    given = margin_loss(qp, kp, gold, valid, window, margin, num_negatives, negatives=negatives)
    seeded = margin_loss(qp, kp, gold, valid, window, margin, num_negatives, generator=_generator(7))
    assert given.item() == pytest.approx(expected, rel=1e-12)
    assert seeded.item() == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# fitting on a problem with hidden low-dimensional structure
# ---------------------------------------------------------------------------------------------------------------


def _clustered_batch(seed: int, batch=4, heads=2, n=24, d=16, groups=4):
    """Tokens belong to hidden groups; each head sees the group through its own random 4-dim subspace plus
    noise in every direction, so entmax keeps (about) the keys of the query's group."""
    g = _generator(seed)
    basis = torch.linalg.qr(torch.randn(heads, d, d, generator=_generator(99), dtype=torch.float64))[0][
        ..., :groups
    ]  # (H, d, groups)
    group = torch.randint(0, groups, (batch, n), generator=g)
    onehot = torch.nn.functional.one_hot(group, groups).double()  # (B, n, groups)
    signal = 4.0 * torch.einsum("bng,hdg->bhnd", onehot, basis)
    q = signal + 0.5 * torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64)
    k = signal + 0.5 * torch.randn(batch, heads, n, d, generator=g, dtype=torch.float64)
    keys = torch.arange(n).view(1, -1) < torch.tensor([n, n - 3, n - 6, n]).view(-1, 1)
    gold = _entmax_gold(q, k, keys, causal=False)
    valid = valid_pairs(keys, n, n, causal=False, valid_queries=keys)
    return FitBatch(q.float(), k.float(), gold, valid), keys


def test_fitting_projections_lowers_the_loss_and_beats_the_window_at_equal_sparsity():
    train = [_clustered_batch(seed)[0] for seed in range(3)]
    test, keys = _clustered_batch(10)
    # groups hold about 6 of the 24 tokens (3 to 10 here): 8 nearest keys per query is a fixed budget
    settings = {"method": "distance", "projection_dim": 4, "window": 1, "top_k": 8}
    layer = SparsefinderLayer(settings, 2, 16, generator=_generator(0))
    assert not layer.fitted

    def held_out_loss() -> float:
        with torch.no_grad():
            qp, kp = layer.project(test.q, test.k)
            return margin_loss(qp, kp, test.gold, test.valid, 1, 1.0, generator=_generator(11)).item()

    before = held_out_loss()
    steps = []
    losses = fit_projections(
        layer, train, settings, epochs=25, lr=1e-2, generator=_generator(12), on_step=lambda i, x: steps.append(i)
    )
    after = held_out_loss()
    assert len(losses) == len(steps) == 75 and layer.fitted
    assert after < 0.5 * before
    assert sum(losses[-3:]) < sum(losses[:3])

    n = test.q.shape[2]
    fitted = graph_metrics(predict_pairs(layer, test.q, test.k, {**settings, "window": 0}, keys, False), *test[2:])
    # the narrowest window that keeps at least as many pairs as the distance predictor
    for w in range(n):
        window_only = {"method": "window", "window": w}
        pred = predict_pairs(layer, test.q, test.k, window_only, keys, False)
        baseline = graph_metrics(pred, test.gold, test.valid)
        if (baseline["graph_sparsity"] <= fitted["graph_sparsity"]).all():
            break
    assert (fitted["recall"] > baseline["recall"] + 0.3).all(), (fitted, baseline)
    assert (fitted["recall"] > 0.9).all()

    # clustering on the learned projections finds the groups too
    clustering = {**settings, "method": "clustering", "num_clusters": 4, "top_clusters": 1, "window": 0}
    clustered = SparsefinderLayer(clustering, 2, 16)
    with torch.no_grad():
        for learned, target in zip(layer.projection_parameters(), clustered.projection_parameters()):
            target.copy_(learned)
    assert not clustered.fitted  # projections alone do not make a clustering predictor
    inertia = fit_centroids(clustered, train, clustering)
    assert clustered.fitted and inertia[-1] <= inertia[0]
    metrics = graph_metrics(predict_pairs(clustered, test.q, test.k, clustering, keys, False), *test[2:])
    assert (metrics["recall"] > 0.9).all() and (metrics["graph_sparsity"] > 0.5).all()


def test_kmeans_recovers_separated_clusters_with_a_fixed_seed():
    g = _generator(13)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (centers.repeat_interleave(20, 0) + 0.1 * torch.randn(60, 2, generator=g)).unsqueeze(0)
    centroids, inertia = kmeans(x, 3, seed=1)
    again, _ = kmeans(x, 3, seed=1)
    assert torch.equal(centroids, again)
    assert all(a >= b - 1e-6 for a, b in zip(inertia, inertia[1:]))
    found = sorted(centroids[0].round().tolist())
    assert found == sorted(centers.tolist())


# ---------------------------------------------------------------------------------------------------------------
# state
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "distance", "threshold": 1.0},
        {"method": "distance", "threshold": 1.0, "share_projections": True},
        {"method": "quantization", "num_buckets": 3},
        {"method": "clustering", "num_clusters": 3},
        {"method": "routing", "num_clusters": 3},
        {"method": "lsh", "num_buckets": 4, "num_hashes": 2},
    ],
    ids=lambda s: "-".join(str(v) for v in s.values()),
)
def test_state_round_trips_through_the_state_dict(settings):
    q, k = _qk(14)
    keys = _key_mask()
    valid = valid_pairs(keys, L, L, causal=False, valid_queries=keys)
    batch = FitBatch(q, k, _entmax_gold(q, k, keys, False), valid)
    layer = SparsefinderLayer(settings, H, D, generator=_generator(0))
    if settings["method"] in ("distance", "quantization"):
        fit_projections(layer, [batch], settings, epochs=2, generator=_generator(1))
    if settings["method"] in ("clustering", "routing"):
        fit_centroids(layer, [batch], settings)
    state = layer.state_dict()
    assert "fitted" in state and bool(state["fitted"])
    assert ("centroids" in state) == (settings["method"] in ("clustering", "routing"))
    assert ("rotations" in state) == (settings["method"] == "lsh")
    assert ("k_weight" in state) == (not settings.get("share_projections", False))

    fresh = SparsefinderLayer({**settings, "seed": 5}, H, D, generator=_generator(3))
    fresh.load_state_dict(state)
    assert bool(fresh.fitted)
    for causal in (False, True):
        expected = predict_pairs(layer, q, k, settings, keys, causal)
        assert torch.equal(predict_pairs(fresh, q, k, settings, keys, causal), expected)


# ---------------------------------------------------------------------------------------------------------------
# predicted-sparse execution
# ---------------------------------------------------------------------------------------------------------------


def _dense_on_pairs(q, k, v, pairs, fn):
    from hf_sparse.attention import AttentionMask, attend

    return attend(q, k, v, AttentionMask("eager", keep=pairs), scaling=0.5, attention_fn=fn, output_attentions=True)


@pytest.mark.parametrize("fn", ["entmax15", "sparsemax", "softmax"])
@pytest.mark.parametrize("settings", [RESTRICTIVE["distance"], RESTRICTIVE["quantization"], {"method": "window"}])
@pytest.mark.parametrize("causal", [False, True])
def test_predicted_attention_equals_dense_attention_on_the_predicted_pairs(settings, causal, fn):
    """Blocks of queries on gathered key tiles (sparse predictions) and on every key (dense ones), with padding,
    at a length that spans several query blocks and key tiles, in float64."""
    from hf_sparse import sparsefinder

    n = 300
    g = _generator(5)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    valid_keys = torch.arange(n)[None] < torch.tensor([[n], [211]])
    layer = _layer(settings, q.float(), k.float(), valid_pairs(valid_keys, n, n, causal))
    layer.fitted.fill_(True)
    layer.double()
    pairs = predict_pairs(layer, q, k, settings, valid_keys, causal)
    for tile_density in (0.0, 1.0):  # every block on all keys, then every block on its gathered tiles
        old, sparsefinder.PREDICTED_MAX_TILE_DENSITY = sparsefinder.PREDICTED_MAX_TILE_DENSITY, tile_density
        try:
            out, probs = sparsefinder.attend_predicted(
                layer,
                q,
                k,
                v,
                settings,
                where="test",
                scaling=0.5,
                attention_fn=fn,
                alpha=1.5,
                valid_keys=valid_keys,
                causal=causal,
                dense_probabilities=True,
            )
        finally:
            sparsefinder.PREDICTED_MAX_TILE_DENSITY = old
        want, want_probs = _dense_on_pairs(q, k, v, pairs, fn)
        assert (out - want).abs().max() < 1e-10, tile_density
        assert (probs - want_probs).abs().max() < 1e-10
        assert (probs[~pairs] == 0).all()


def test_predicted_attention_builds_nothing_of_size_batch_heads_length_squared():
    from test_block_maps import _LargestAllocation

    from hf_sparse.sparsefinder import attend_predicted

    n = 1024
    q, k = _qk(seed=1, b=1, h=4, n=n, d=16)
    v = torch.randn_like(q)
    for settings in (RESTRICTIVE["distance"], RESTRICTIVE["quantization"], RESTRICTIVE["clustering"]):
        layer = _layer(settings, q, k, valid_pairs(None, n, n, False))
        layer.fitted.fill_(True)
        with _LargestAllocation() as seen, torch.no_grad():
            attend_predicted(layer, q, k, v, settings, where="t", scaling=0.25, attention_fn="entmax15", alpha=1.5)
        assert seen.largest <= 4 * n * n // 4, f"{settings['method']}: {seen.largest} elements (B·H·L² = {4 * n * n})"


def test_fitted_flag_is_read_from_the_device_once_per_value():
    layer = SparsefinderLayer({"method": "distance"}, 2, 4)
    assert not layer.is_fitted()
    layer.fitted.fill_(True)
    assert layer.is_fitted()  # a changed buffer is read again
    calls = []
    original = torch.Tensor.__bool__
    torch.Tensor.__bool__ = lambda self: calls.append(1) or original(self)
    try:
        for _ in range(3):
            assert layer.is_fitted()
    finally:
        torch.Tensor.__bool__ = original
    assert calls == []


def test_training_side_names_are_still_found_in_the_forward_module():
    from hf_sparse import sparsefinder, sparsefinder_fit

    assert sparsefinder.fit is sparsefinder_fit.fit and sparsefinder.graph_metrics is sparsefinder_fit.graph_metrics
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        sparsefinder.nothing  # noqa: B018
