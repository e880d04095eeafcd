"""Block maps: exact against FlexAttention's own create_block_mask and the dense definition, cached, bounded, and
never built from an n x n evaluation of a structured pattern."""

import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import and_masks, create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

from hf_sparse import attention, block_maps, patterns
from hf_sparse.attention import attend, build_mask
from hf_sparse.block_maps import CACHE, MaskCache, build_block_map, cached_block_map
from hf_sparse.patterns import bind_learned, parse
from test_patterns import EVERY_SPEC

MIXED = ["window:4&causal+global:1", "fixed:8,2&window:30", "block_local:16+strided:9", "random:2&window:50"]


def _tiles_of(bm):
    """(full, touched) tile maps of a BlockMask, head by head: ``(B, H, blocks, blocks)`` bool."""
    touched = bm.to_dense().bool()
    full = torch.zeros_like(touched)
    for b in range(touched.shape[0]):
        for h in range(touched.shape[1]):
            counts, indices = bm.full_kv_num_blocks[b, h], bm.full_kv_indices[b, h]
            for row in range(counts.shape[0]):
                full[b, h, row, indices[row, : counts[row]].long()] = True
    return full, touched


def _definition(pattern, n):
    q, k = torch.arange(n).view(1, -1, 1), torch.arange(n).view(1, 1, -1)
    h = torch.arange(pattern.num_heads or 1).view(-1, 1, 1)
    return pattern.mask_mod(n)(torch.zeros((), dtype=torch.long), h, q, k).expand(h.shape[0], n, n)


@pytest.mark.parametrize("spec", EVERY_SPEC + MIXED)
@pytest.mark.parametrize("n, block", [(1, 16), (33, 16), (64, 16), (129, 32), (300, 128)])
def test_block_map_equals_create_block_mask_and_the_definition(spec, n, block):
    pattern = parse(spec)
    got = build_block_map(pattern, n, "cpu", block)
    want = _definition(pattern, n)
    full, touched = _tiles_of(create_block_mask(pattern.mask_mod(n), None, None, n, n, BLOCK_SIZE=block))
    assert torch.equal(got.dense(), want)
    assert torch.equal(got.full, full[0]) and torch.equal(got.full | got.partial, touched[0])
    assert got.kept_pairs() == int(want.sum())
    assert got.block_density() == touched.float().mean().item()


def test_a_learned_mask_gives_a_block_map_per_head():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 200, 200, generator=g) < 0.02
    mask[1, :, :] = True  # one head keeps everything: full tiles
    pattern = bind_learned(parse("learned+window:3"), mask)
    n = 150
    got = build_block_map(pattern, n, "cpu", 32)
    assert torch.equal(got.dense(), mask[:, :n, :n] | patterns.dense_mask("window:3", n))
    full, touched = _tiles_of(create_block_mask(pattern.mask_mod(n), None, 3, n, n, BLOCK_SIZE=32))
    assert torch.equal(got.full, full[0]) and torch.equal(got.full | got.partial, touched[0])


@pytest.mark.parametrize("spec", ["window:20+global:1", "bigbird:8,1,4", "no_diagonal", "block_local:64&causal"])
def test_cached_block_masks_with_padding_equal_freshly_built_ones(spec):
    n = 300
    pattern = parse(spec)
    valid = torch.ones(3, n, dtype=torch.bool)
    valid[1, 190:] = False  # right padding inside a tile
    valid[2, 256:] = False  # exactly the last tile padded
    valid[0, :5] = False  # left padding
    cached = cached_block_map(pattern, n, "cpu").block_mask(valid)
    fresh = create_block_mask(
        and_masks(pattern.mask_mod(n), lambda b, h, q, k: valid[b, k]), 3, None, n, n, BLOCK_SIZE=128
    )
    (full, touched), (fresh_full, fresh_touched) = _tiles_of(cached), _tiles_of(fresh)
    assert torch.equal(full, fresh_full)
    # Padding is applied to the cached tiles per key block, without looking inside them: a tile may stay listed
    # although padding removed all its pairs (computed, then dropped by the mask_mod); never the other way round.
    assert (touched | ~fresh_touched).all()
    q, k = torch.arange(n).view(-1, 1), torch.arange(n).view(1, -1)
    for b in range(3):
        want = _definition(pattern, n)[0] & valid[b][None, :]
        assert torch.equal(cached.mask_mod(torch.tensor(b), torch.tensor(0), q, k), want)
        extra = touched[b, 0] & ~fresh_touched[b, 0]
        tiles = want.new_zeros(3 * 128, 3 * 128)
        tiles[:n, :n] = want
        assert not tiles.view(3, 128, 3, 128).any(dim=(1, 3))[extra].any()


class _LargestAllocation(TorchDispatchMode):
    """Records the most elements any single op produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("spec", ["window:64", "longformer:64,1", "strided:128", "dilated:8,4", "block_local:256"])
def test_flex_masks_of_structured_patterns_allocate_nothing_of_size_n_squared(spec):
    """The largest tensor built grows linearly with n (partial tiles along the band), not with n²."""
    largest = {}
    for n in (4096, 8192):
        valid = torch.ones(2, n, dtype=torch.bool)
        valid[1, 3000:] = False
        CACHE.clear()
        with _LargestAllocation() as seen:
            build_mask(parse(spec), valid, n, torch.device("cpu"), "flex")
        largest[n] = seen.largest
        assert seen.largest <= n * n // 8, f"{spec}: an op produced {seen.largest} elements (n² = {n * n})"
    assert largest[8192] <= 2.2 * largest[4096], largest


def test_each_mask_is_built_once_per_spec_and_length_not_per_pattern_object():
    CACHE.clear()
    first = build_mask(parse("window:7+global:1"), None, 256, torch.device("cpu"), "sdpa")
    builds = CACHE.builds
    again = build_mask(parse("window:7+global:1"), None, 256, torch.device("cpu"), "sdpa")  # another object
    assert CACHE.builds == builds and again.keep.data_ptr() == first.keep.data_ptr()
    build_mask(parse("window:7+global:1"), None, 257, torch.device("cpu"), "sdpa")
    assert CACHE.builds > builds


def test_a_learned_mask_changed_in_place_is_not_served_from_the_cache():
    mask = torch.zeros(2, 40, 40, dtype=torch.bool)
    pattern = bind_learned(parse("learned"), mask)
    assert not patterns.dense_mask(pattern, 30).any()
    mask[:, 3, 4] = True  # same tensor, new version
    assert patterns.dense_mask(bind_learned(parse("learned"), mask), 30)[:, 3, 4].all()


def test_a_cached_learned_mask_is_kept_alive_so_no_other_tensor_can_take_its_address():
    """The key names a learned mask by address and version; were the mask freed, a new tensor at the same address
    (same shape, version 0) would be served the old mask. The entry holds it instead."""
    import gc
    import weakref

    CACHE.clear()
    mask = torch.rand(2, 40, 40) > 0.5
    alive = weakref.ref(mask)
    patterns.dense_mask(bind_learned(parse("learned"), mask), 30)
    del mask
    gc.collect()
    assert alive() is not None
    CACHE.clear()
    gc.collect()
    assert alive() is None


def test_the_cache_is_bounded_by_entries_and_bytes_and_drops_the_least_recently_used():
    cache = MaskCache(max_entries=3, max_bytes=1000)
    for i in range(3):
        cache.get(("t", i), lambda: torch.zeros(100, dtype=torch.uint8))
    cache.get(("t", 0), lambda: pytest.fail("entry 0 is still cached"))  # 0 becomes the most recent
    cache.get(("t", 3), lambda: torch.zeros(100, dtype=torch.uint8))  # evicts 1, the least recent
    assert len(cache) == 3
    cache.get(("t", 0), lambda: pytest.fail("entry 0 was evicted instead of 1"))
    cache.get(("t", 1), lambda: torch.zeros(100, dtype=torch.uint8))
    assert cache.builds == 5
    cache.get(("big",), lambda: torch.zeros(950, dtype=torch.uint8))
    assert cache.bytes <= 1000 and len(cache) == 1


def test_random_patterns_at_many_lengths_stay_within_the_cache_bound():
    CACHE.clear()
    for n in range(100, 100 + 300):
        patterns.dense_mask("random:3", n)
    assert len(CACHE) <= CACHE.max_entries and CACHE.bytes <= CACHE.max_bytes


def _flex_round(specs, lengths, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    for i, spec in enumerate(specs):
        n = lengths[i % len(lengths)]
        q, k, v = (torch.randn(2, 2, n, 16, generator=g) for _ in range(3))
        valid = torch.ones(2, n, dtype=torch.bool)
        valid[1, n - 30 :] = False
        valid = valid if i % 2 else None
        with torch.no_grad():
            mask = build_mask(parse(spec), valid, n, torch.device(device), "flex")
            out, _ = attend(*(x.to(device) for x in (q, k, v)), mask, scaling=0.25)
            out = out.cpu()
        keep = (
            patterns.dense_mask(spec, n)[None]
            & (torch.ones(2, n, dtype=torch.bool) if valid is None else valid)[:, None, None]
        )
        scores = (q @ k.transpose(-1, -2) * 0.25).masked_fill(~keep, float("-inf"))
        want = (torch.softmax(scores, -1).nan_to_num() @ v).transpose(1, 2)
        assert torch.allclose(out, want, atol=1e-5), spec


def test_more_patterns_than_dynamos_recompile_limit_never_fall_back_to_the_unfused_kernel_on_cpu():
    """On CPU FlexAttention compiles once per (pattern, length) (static shapes, see compiled_flex_attention); ten
    patterns exceed dynamo's default limit of 8, which would make it give up and run the unfused kernel (an error
    here). The same pattern and length again compiles nothing."""
    from torch._dynamo.utils import counters

    specs = ["window:3", "global:2", "strided:16", "fixed:32,4", "logsparse", "dilated:4,3", "star", "causal"]
    specs += ["no_diagonal", "window:5&causal"]
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*flex_attention called without torch.compile.*")
        _flex_round(specs, [200], seed=0)
        compiles = counters["stats"]["unique_graphs"]
        _flex_round(specs, [200], seed=1)
    assert compiles > torch._dynamo.config.recompile_limit
    assert counters["stats"]["unique_graphs"] == compiles


def test_the_patterns_that_keep_their_own_mask_mod_on_cuda_are_functions_of_the_offset_alone():
    # What lets them skip the tile lookup: their mask_mod reads nothing and holds no length (one compilation per
    # pattern, none per length), so the same offsets give the same answer at any length and any position.
    own = [spec for spec in EVERY_SPEC if not block_maps.tile_lookup_in_kernel(parse(spec), "cuda")]
    assert {"window:3", "causal", "no_diagonal"} <= set(own)
    q, k = torch.arange(64)[:, None], torch.arange(64)[None, :]
    zero = torch.zeros((), dtype=torch.long)
    for spec in own:
        short, long = parse(spec).mask_mod(64), parse(spec).mask_mod(500)
        want = short(zero, zero, q, k).expand(64, 64)
        assert torch.equal(long(zero, zero, q + 300, k + 300).expand(64, 64), want), spec
        assert torch.equal(long(zero, zero + 1, q + 7, k + 7).expand(64, 64), want), spec


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the tile-lookup mask_mod runs in FlexAttention on CUDA")
def test_twenty_patterns_on_cuda_compile_a_bounded_number_of_times_and_new_lengths_nothing():
    # offset-only patterns (9 of these) compile their own closed form once each, the rest reach flex as data
    from torch._dynamo.utils import counters

    specs = [f"window:{w}" for w in (3, 9, 17, 33)] + ["global:2", "strided:16", "fixed:32,4", "logsparse"]
    specs += ["dilated:4,3", "block_local:64", "star", "longformer:8,2", "bigbird:4,1,2", "causal", "no_diagonal"]
    specs += ["window:5&causal", "window:9+global:3", "block_local:32+strided:40", "causal&dilated:5,2", "random:4"]
    assert len(set(specs)) == 20
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*flex_attention called without torch.compile.*")
        _flex_round(specs, [200, 240, 280], seed=0, device="cuda")
        compiles = counters["stats"]["unique_graphs"]
        _flex_round(specs, [310, 350, 390, 420], seed=1, device="cuda")
    assert 1 <= compiles < attention.FLEX_RECOMPILE_LIMIT, compiles
    assert counters["stats"]["unique_graphs"] == compiles, "new patterns or lengths compiled again"


def test_block_density_is_read_from_the_device_once_per_key():
    CACHE.clear()
    first = block_maps.cached_block_density(parse("window:64"), 2048, "cpu")
    hits = CACHE.hits
    assert block_maps.cached_block_density(parse("window:64"), 2048, "cpu") == first
    assert CACHE.hits == hits + 1


@pytest.mark.parametrize("spec", EVERY_SPEC + MIXED)
def test_each_kinds_analytic_tiles_are_exact_and_combinations_never_wrong(spec):
    """The O((n/block)²) tile rules: exact for every kind on its own (so a single structured pattern evaluates its
    mask_mod only on truly partial tiles), conservative for unions and intersections of different kinds."""
    from hf_sparse.block_maps import TileGrid

    n, block = 150, 16
    pattern = parse(spec)
    grid = TileGrid(n, block, torch.device("cpu"))
    touched, full = (t.expand(1, grid.blocks, grid.blocks) for t in pattern.tiles(grid))
    full = full & (grid.tile_sizes() == block * block)
    truth_full, truth_touched = _tiles_of(create_block_mask(pattern.mask_mod(n), None, None, n, n, BLOCK_SIZE=block))
    exact = spec.split(":")[0] not in ("fixed", "star", "longformer", "bigbird") and spec not in MIXED
    if exact:
        assert torch.equal(touched, truth_touched[0]) and torch.equal(full, truth_full[0])
    assert (touched | ~truth_touched[0]).all() and (truth_full[0] | ~full).all()
