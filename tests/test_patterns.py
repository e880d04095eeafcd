import pytest
import torch

from hf_sparse import patterns
from hf_sparse.patterns import PATTERN_KINDS, dense_mask, parse, sparsity

EVERY_SPEC = [
    "dense",
    "no_diagonal",
    "window:3",
    "global:2",
    "strided:4",
    "fixed:4,1",
    "logsparse",
    "dilated:2,3",
    "random:3",
    "random:3,7",
    "block_local:8",
    "star",
    "longformer:2,1",
    "bigbird:2,1,2",
    "causal",
]


def test_every_registered_kind_is_exercised():
    assert {s.split(":")[0] for s in EVERY_SPEC} | {"learned"} == set(PATTERN_KINDS)


@pytest.mark.parametrize(
    "spec, expected_percent", [("strided:4", 70.39), ("logsparse", 89.83), ("star", 96.13), ("fixed:4,1", 72.66)]
)
def test_sparsity_at_128_reproduces_sparsebert_table(spec, expected_percent):
    assert round(100 * sparsity(spec, 128), 2) == expected_percent


def _brute_force(spec: str, n: int) -> torch.Tensor:
    """The definitions of REFERENCES.md written as plain Python loops."""
    name, _, arg = spec.partition(":")
    a = [int(x) for x in arg.split(",")] if arg else []
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            d = abs(i - j)
            out[i, j] = {
                "dense": True,
                "no_diagonal": i != j,
                "window": d <= (a[0] if a else 0),
                "global": i < (a[0] if a else 0) or j < (a[0] if a else 0),
                "strided": d <= (a[0] if a else 1) or (i - j) % (a[0] if a else 1) == 0,
                "fixed": (i // a[0] == j // a[0] or j % a[0] >= a[0] - a[1]) if len(a) == 2 else False,
                "logsparse": d == 0 or (d & (d - 1)) == 0,
                "dilated": (d <= a[0] * a[1] and d % a[1] == 0) if len(a) == 2 else False,
                "block_local": i // a[0] == j // a[0] if a else False,
                "star": d <= 1 or i == 0 or j == 0,
                "longformer": (d <= a[0] or i < a[1] or j < a[1]) if len(a) == 2 else False,
                "causal": j <= i,
            }[name]
    return out


@pytest.mark.parametrize(
    "spec",
    [s for s in EVERY_SPEC if not s.startswith(("random", "bigbird"))],
)
@pytest.mark.parametrize("n", [1, 7, 33])
def test_dense_mask_matches_the_definition(spec, n):
    assert torch.equal(dense_mask(spec, n)[0], _brute_force(spec, n))


def test_no_diagonal_removes_only_self_attention():
    mask = dense_mask("no_diagonal", 50)[0]
    assert not mask.diagonal().any()
    assert mask.sum() == 50 * 50 - 50


@pytest.mark.parametrize("n", [5, 64])
def test_random_keeps_exactly_r_keys_per_query_reproducibly(n):
    a = dense_mask("random:3,11", n)[0]
    assert (a.sum(-1) == 3).all()
    assert torch.equal(a, dense_mask("random:3,11", n)[0])
    assert not torch.equal(a, dense_mask("random:3,12", n)[0])


def test_bigbird_is_window_global_random_union():
    n = 40
    got = dense_mask("bigbird:2,1,3", n)
    want = dense_mask("window:2", n) | dense_mask("global:1", n) | dense_mask("random:3", n)
    assert torch.equal(got, want)


def test_union_and_intersection_compose_and_bind_precedence():
    n = 30
    w, g, c = (dense_mask(s, n) for s in ("window:4", "global:1", "causal"))
    assert torch.equal(dense_mask("window:4+global:1", n), w | g)
    assert torch.equal(dense_mask("window:4&causal", n), w & c)
    # '&' binds tighter than '+'
    assert torch.equal(dense_mask("window:4&causal+global:1", n), (w & c) | g)
    assert str(parse("window:4&causal+global:1")) == "window:4&causal+global:1"


@pytest.mark.parametrize("spec", ["window:5+global:1", "bigbird:3,1,2", "no_diagonal", "causal&window:9"])
def test_block_mask_agrees_with_dense_mask(spec):
    n = 300
    bm = patterns.block_mask(spec, n, block_size=128)
    from_blocks = bm.to_dense()[0, 0].bool()  # (blocks, blocks) tile map
    dense = dense_mask(spec, n)[0]
    padded = torch.zeros(384, 384, dtype=torch.bool)
    padded[:n, :n] = dense
    tiles = padded.view(3, 128, 3, 128).any(dim=(1, 3))
    assert torch.equal(from_blocks, tiles)
    # the mask_mod inside the BlockMask is the pattern itself
    q = torch.arange(n).view(-1, 1)
    k = torch.arange(n).view(1, -1)
    assert torch.equal(bm.mask_mod(torch.tensor(0), torch.tensor(0), q, k), dense)


def test_block_mask_includes_padding_per_batch_row():
    valid = torch.ones(2, 256, dtype=torch.bool)
    valid[1, 100:] = False
    bm = patterns.block_mask("dense", 256, key_valid=valid)
    tiles = bm.to_dense()[:, 0].bool()
    assert tiles[0].all()
    assert tiles[1][:, 0].all() and not tiles[1][:, 1].any()


def test_block_density_counts_tiles_with_any_kept_pair():
    assert patterns.block_density("dense", 256) == 1.0
    assert patterns.block_density("block_local:128", 512) == 4 / 16
    assert patterns.block_density("window:1", 512) == (4 + 2 * 3) / 16


@pytest.mark.parametrize(
    "spec, words",
    [
        ("windw:3", ["unknown pattern 'windw'", "window:W", "bigbird:W,G,R"]),
        ("window", ["'window'", "takes 1 argument", "window:W"]),
        ("window:x", ["non-integer", "window:W"]),
        ("fixed:4", ["takes 2 argument", "fixed:L,C"]),
        ("fixed:4,9", ["out-of-range argument 9"]),
        ("strided:0", ["out-of-range argument 0"]),
        ("window:3+starr", ["unknown pattern 'starr'", "in attention pattern 'window:3+starr'"]),
        ("", ["non-empty"]),
        ("dense:1", ["takes 0 argument"]),
        ("window:999999999999999999999", ["out-of-range argument 999999999999999999999", "up to 2147483647"]),
    ],
)
def test_bad_specs_raise_value_error_naming_the_problem(spec, words):
    with pytest.raises(ValueError) as info:
        parse(spec)
    for word in words:
        assert word in str(info.value)


def test_learned_without_a_mask_explains_what_is_missing():
    with pytest.raises(ValueError, match="needs a frozen DAM mask"):
        dense_mask("learned", 8)


def test_learned_bound_mask_is_used_per_head():
    mask = torch.rand(3, 16, 16) > 0.5
    pattern = patterns.bind_learned(parse("learned&window:4"), mask)
    got = dense_mask(pattern, 10)
    assert got.shape == (3, 10, 10)
    assert torch.equal(got, mask[:, :10, :10] & dense_mask("window:4", 10))
