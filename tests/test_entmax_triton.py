"""The fused entmax attention kernel (hf_sparse.entmax_triton) against dense float64 entmax attention.

Without CUDA the kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is first
used; it only changes how Triton kernels run, which nothing else in this CPU test suite does). The interpreter is
slow, so sizes are small, with kernel tiles of 16 so that every input crosses several tiles, and tests choose
few candidates per row where the certificate must fail (the fallback path).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton", reason="the fused kernel needs triton (a dev dependency)")

from hf_sparse import entmax_triton  # noqa: E402
from hf_sparse.entmax_topk import entmax15, entmax_alpha, sparsemax  # noqa: E402
from hf_sparse.entmax_triton import entmax_attention, unavailable_reasons  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TILE = 16


def dense_allowed(b, h, lq, lk, causal=False, key_lengths=None, block_mask=None, keep=None, mask_block=TILE):
    """The (B, H, Lq, Lk) pairs the kernel may attend, built the obvious way."""
    allowed = torch.ones(b, h, lq, lk, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    if key_lengths is not None:
        allowed &= (torch.arange(lk)[None, :] < key_lengths.cpu()[:, None])[:, None, None, :]
    if block_mask is not None:
        tiles = block_mask.cpu().repeat_interleave(mask_block, 2).repeat_interleave(mask_block, 3)
        allowed &= tiles[:, :, :lq, :lk]
    if keep is not None:
        allowed &= keep.cpu()
    return allowed


def reference(q, k, v, alpha, allowed, scaling=None):
    """float64 matmul + mask + entmax_topk (pinned to the entmax package by tests/test_entmax_topk.py)."""
    q, k, v = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
    if alpha == 1.5:
        p = entmax15(scores, keep=allowed)
    elif alpha == 2:
        p = sparsemax(scores, keep=allowed)
    else:
        p = entmax_alpha(scores, alpha, keep=allowed)
    return p @ v, p, (q, k, v)


def inputs(b, h, lq, lk, d, dtype=torch.float64, spread=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n: (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) * spread)  # noqa: E731
    return [t.to(DEVICE, dtype).requires_grad_() for t in (make(lq), make(lk), make(lk))]


def check_against_reference(q, k, v, alpha, allowed, tol, **kwargs):
    out = entmax_attention(q, k, v, alpha=alpha, **kwargs)
    ref, p_ref, leaves = reference(q, k, v, alpha, allowed, kwargs.get("scaling"))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out))
    ref_grads = torch.autograd.grad(ref, leaves, grad_out)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.cpu().double(), ref.detach(), atol=tol, rtol=tol)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got.cpu().double(), want, atol=tol * 10, rtol=tol * 10, msg=f"d{name}")
    return p_ref


def probabilities(q, k, alpha, **kwargs):
    """The kernel's probability matrix: attention over the identity as values gives p itself."""
    b, h, lk = k.shape[0], k.shape[1], k.shape[2]
    eye = torch.eye(lk, dtype=q.dtype, device=q.device).expand(b, h, lk, lk)
    with torch.no_grad():
        return entmax_attention(q, k, eye, alpha=alpha, **kwargs).cpu().double()


@pytest.mark.parametrize("threshold_pass", entmax_triton.THRESHOLD_PASSES)
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3])
@pytest.mark.parametrize("causal", [False, True])
def test_outputs_gradients_and_support_equal_dense_float64_entmax(alpha, causal, threshold_pass):
    b, h, lq, lk, d = 2, 1, 20 if causal else 32, 40, 16
    q, k, v = inputs(b, h, lq, lk, d, seed=int(alpha * 10) + causal)
    key_lengths = torch.tensor([lk, 27], device=DEVICE)  # padding: the second sequence has 27 real keys
    allowed = dense_allowed(b, h, lq, lk, causal, key_lengths)
    # 16 candidates: few rows fail
    kwargs = dict(causal=causal, key_lengths=key_lengths, blocks=(16, 16, 16), threshold_pass=threshold_pass)
    p_ref = check_against_reference(q, k, v, alpha, allowed, 1e-9, **kwargs)
    p = probabilities(q, k, alpha, **kwargs)
    assert torch.equal(p > 0, p_ref > 0)
    torch.testing.assert_close(p, p_ref.detach(), atol=1e-12, rtol=0)


def spy_on_kernel(monkeypatch, name, watch):
    """Launch kernel ``name`` through ``watch(launch, grid, args, kwargs)``, which records what it wants and runs it
    (``launch()``, whose result it returns)."""
    kernels = entmax_triton._load_kernels()
    kernel = getattr(kernels, name)

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: watch(lambda: kernel[grid](*args, **kwargs), grid, args, kwargs)

    monkeypatch.setattr(kernels, name, Launcher())


def fallback_launches(monkeypatch) -> list[tuple[torch.Tensor, ...]]:
    """Spy on the fallback kernel's launches: what each was given, copied before it ran: the rows' largest scores
    ``m``, the thresholds it starts from and the rows it was given to solve (``FAIL`` flags at or above the
    launch's ``LEVEL``); and after it ran, the rows each of its programs solved (``ROWS``: ``(B·H, programs, rows
    per program)``, a program's slots past its last row unwritten)."""
    launches = []

    def watch(launch, grid, args, kwargs):
        # (q, k, key lengths, block mask, keep, whole keys, m, tau, FAIL, tile maxima, tile lists, ROWS, ...)
        given = (args[6].clone(), args[7].clone(), (args[8] >= kwargs["LEVEL"]).to(torch.int8))
        result = launch()
        launches.append((*given, args[11].view(grid[1], grid[0], -1).clone()))
        return result

    spy_on_kernel(monkeypatch, "fallback_kernel", watch)
    return launches


def rows_sent(launches) -> list[int]:
    """How many rows each fallback launch was given to solve (:func:`fallback_launches`)."""
    return [int((launch[2] != 0).sum()) for launch in launches]


@pytest.mark.parametrize("threshold_pass", entmax_triton.THRESHOLD_PASSES)
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3, 2.5])
def test_rows_past_their_candidates_take_the_exact_fallback(alpha, threshold_pass, monkeypatch):
    """Two candidates per row: nearly every row fails the certificate and is solved over all its keys (Newton
    from the candidates' threshold for α <= 2, bisection beyond). Tiles with many new candidates are merged by
    sorting here, as on the GPU. ``stream`` (one candidate: four slots per row): rows whose support outgrows the
    slots go to the fallback, which starts from the row's last bound. ``bound`` (two scores per key column of
    three keys; scores scaled down, so that supports are wide for every α) sends exactly the rows with a column
    whose three keys are all in the support: its certificate fails there and only there."""
    monkeypatch.setattr(entmax_triton, "INTERPRETER_SORT_ABOVE", 4)
    launches = fallback_launches(monkeypatch)
    q, k, v = inputs(1, 1, 16, 48, 16, spread=0.5, seed=7)
    allowed = dense_allowed(1, 1, 16, 48)
    candidates = 2 if threshold_pass == "topk" else 1
    held = candidates if threshold_pass == "topk" else candidates * entmax_triton.STREAM_SLOTS
    kwargs = dict(blocks=(16, 16, candidates), threshold_pass=threshold_pass)
    if threshold_pass == "bound":
        kwargs["scaling"] = 0.02
    p_ref = check_against_reference(q, k, v, alpha, allowed, 1e-9, **kwargs)
    support = (p_ref > 0).sum(-1)
    sent = rows_sent(launches)
    assert sent and sent[0] > 0  # so the fallback solved rows
    if threshold_pass == "bound":
        full_column = ((p_ref[0, 0] > 0).view(16, 3, 16).sum(1) == 3).any(-1)  # (rows,): keys c, c + 16, c + 32
        assert sent[0] == int(full_column.sum())
    else:
        assert (support > held).float().mean() > 0.25  # the supports really are larger than what the pass holds
    assert torch.equal(probabilities(q, k, alpha, **kwargs) > 0, p_ref > 0)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3])
def test_the_stream_pass_raises_its_bound_as_its_slots_fill_and_stays_exact(alpha, monkeypatch):
    """Sixteen slots per row against 96 keys in tiles of 16: the first tile fills a row's slots, so every row the
    pass solves by itself (not sent to the fallback) raised its bound and dropped the scores below it at least once
    (six tiles: usually more), and still has its exact support."""
    launches = fallback_launches(monkeypatch)
    q, k, v = inputs(2, 1, 16, 96, 16, seed=5)
    key_lengths = torch.tensor([96, 70], device=DEVICE)
    allowed = dense_allowed(2, 1, 16, 96, key_lengths=key_lengths)
    kwargs = dict(blocks=(16, 16, 4), threshold_pass="stream", key_lengths=key_lengths)
    p_ref = check_against_reference(q, k, v, alpha, allowed, 1e-9, **kwargs)
    assert sum(rows_sent(launches)) < 32 // 2  # most of the 32 rows were solved in the pass
    assert torch.equal(probabilities(q, k, alpha, **kwargs) > 0, p_ref > 0)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3])
def test_the_bound_pass_certifies_rows_or_starts_them_from_the_threshold_of_its_column_maxima(alpha, monkeypatch):
    """``bound``: a row's two largest scores in each of the 16 key columns of the tiles (keys c, c + 16, ...) are a
    subset of its scores, so their τ is at most the row's; every other score is at most the row's largest let go
    of, the column's third. Where that lies below their τ, their τ is the row's (certified); elsewhere their τ,
    lowered by the slack, is what the fallback starts from, for the rows with a key (here all rows but the second
    sequence's, which has none); and it is exact either way. (Scores scaled so that both kinds of row occur.)"""
    started = fallback_launches(monkeypatch)
    b, lq, lk = 2, 24, 80
    q, k, v = inputs(b, 1, lq, lk, 16, seed=9)
    key_lengths = torch.tensor([lk, 0], device=DEVICE)
    allowed = dense_allowed(b, 1, lq, lk, key_lengths=key_lengths)
    scaling = {1.5: 0.1, 2.0: 0.03, 1.3: 0.25}[alpha]
    kwargs = dict(blocks=(16, 16, 16), threshold_pass="bound", key_lengths=key_lengths, scaling=scaling)
    p_ref = check_against_reference(q, k, v, alpha, allowed, 1e-9, **kwargs)
    m, bound, fail = (t.cpu().view(b, lq) for t in started[0][:3])
    fail, empty_rows = fail[0] != 0, fail[1]
    assert not empty_rows.any() and torch.isinf(bound[1]).all()

    scores = (q @ k.transpose(-1, -2)).detach().cpu()[:, 0] * scaling  # (B, Lq, Lk)
    row = scores[0]
    torch.testing.assert_close(m[0], row.max(-1).values, atol=1e-12, rtol=0)
    top = row.view(lq, lk // 16, 16).topk(3, dim=1).values  # (Lq, 3, 16): each key column's three largest
    columns = top[:, :2].flatten(1)  # (Lq, 32): the two the pass keeps per column

    def x_threshold(s, p):  # τ on the x scale, x = (α - 1)(s - m), from probabilities p = [x - τ]₊^{1/(α-1)}
        x = (alpha - 1) * (s - s.max(-1, keepdim=True).values)
        return torch.where(p > 0, x - p ** (alpha - 1), torch.inf).amin(-1)

    reference_p = (entmax15 if alpha == 1.5 else sparsemax if alpha == 2 else lambda t: entmax_alpha(t, alpha))
    of_columns = x_threshold(columns, reference_p(columns))
    of_row = x_threshold(row, p_ref[0, 0].detach())
    third = (alpha - 1) * (top[:, 2].amax(-1) - row.max(-1).values)  # the largest let go of, on the x scale
    assert torch.equal(fail, third > of_columns)  # certified: no score let go of enters the columns' support
    assert fail.any() and (~fail).any()  # both kinds of row occur here
    torch.testing.assert_close(bound[0][~fail], of_row[~fail], atol=1e-9, rtol=0)  # certified: the row's τ
    start = bound[0][fail]
    assert (start <= of_row[fail]).all()  # the fallback's start: a lower bound of the row's τ
    if alpha != 1.3:  # the closed forms: the columns' τ itself (bisection: the lower end of its bracket)
        want = of_columns[fail]
        torch.testing.assert_close(start, want - 1e-12 * want.abs().clamp(min=1), atol=1e-9, rtol=0)
    assert (start > of_row[fail] - 0.5).all() and (start < of_row[fail]).all()  # close, and not the row's


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3, 2.5])
@pytest.mark.parametrize("causal", [False, True], ids=["block-mask", "causal"])
def test_the_fallback_solves_the_marked_rows_of_several_blocks_together_and_stays_exact(alpha, causal, monkeypatch):
    """The fallback's programs each take the next 16 of the rows marked for it, in order, from whichever query
    blocks hold them. Those rows differ in what they may see: under a block mask (tiles of 16) each block of 16
    queries has its own row of it; causal, each row its own limit, and a program reads the tiles whole to its
    first row without the tests; the last block is partial, and padding ends inside a tile. A program reads the
    union of its rows' tiles, and each row must still see only its own. A few candidates per row (``topk``; by
    α, so that about a third to two thirds of the rows have a wider support): those rows are marked, in every
    block. The closed forms (α = 1.5, 2) in two launches: one Newton step for every marked row, then the rest for
    the rows it left unsolved, gathered again."""
    launches = fallback_launches(monkeypatch)
    b, h, lq, lk = 2, 1, 70, 80
    q, k, v = inputs(b, h, lq, lk, 16, seed=11)
    g = torch.Generator().manual_seed(12)
    block_mask = torch.rand(1, h, 5, 5, generator=g) < 0.6
    block_mask |= torch.eye(5, dtype=torch.bool)  # (and every query block its own diagonal tile)
    block_mask = None if causal else block_mask.to(DEVICE)
    key_lengths = torch.tensor([lk, 61], device=DEVICE)
    allowed = dense_allowed(b, h, lq, lk, causal, key_lengths, block_mask)
    kwargs = dict(causal=causal, key_lengths=key_lengths, block_mask=block_mask, mask_block=TILE,
                  blocks=(16, 16, {1.5: 4, 2.0: 1, 1.3: 8, 2.5: 1}[alpha]), threshold_pass="topk")
    p_ref = check_against_reference(q, k, v, alpha, allowed, 1e-9, **kwargs)
    launches = list(launches)  # the first call's
    assert torch.equal(probabilities(q, k, alpha, **kwargs) > 0, p_ref > 0)
    assert len(launches) == (2 if alpha in (1.5, 2.0) else 1)
    for _, _, fail, rows in launches:
        marked = (fail != 0).view(b * h, lq)
        for bh in range(b * h):
            want = marked[bh].nonzero()[:, 0]  # the marked rows, in order
            n = len(want)
            got = rows[bh].flatten()[: n + (-n % 16)].view(-1, 16)  # program i: the i-th 16 of them
            for i, program in enumerate(got):
                assert torch.equal(program[: min(16, n - 16 * i)].cpu(), want[16 * i : 16 * (i + 1)].to(program))
    first = (launches[0][2] != 0).view(b * h, lq)
    for bh in range(b * h):
        want = first[bh].nonzero()[:, 0]
        assert 16 < len(want) < lq - 16 and len((want[:16] // 16).unique()) > 1  # fewer programs than blocks
    if alpha in (1.5, 2.0):
        second = (launches[1][2] != 0).view(b * h, lq)
        assert (second <= first).all() and 0 < second.sum() < first.sum()  # some rows took one step, some more


def poison_new_buffers(monkeypatch) -> None:
    """``torch.empty`` returns buffers already written with values that look real (1e3 scores, key index 70): a
    kernel that reads a slot it never wrote then gives a wrong result every time, not only when the allocator
    hands it stale memory."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(1e3) if t.dtype.is_floating_point else t.fill_(70) if t.dtype == torch.int32 else t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize("threshold_pass", entmax_triton.THRESHOLD_PASSES)
def test_no_kernel_reads_memory_it_never_wrote(threshold_pass, monkeypatch):
    """Rows whose support outgrows the stream pass's slots (eight per row here) stop storing scores; their count
    once ran on past what their slots held, and the next raising of the bounds read the unwritten slots: a lower
    bound above the row's τ, and outputs off by up to 4 for such rows, depending on what the allocator returned
    (found by a randomised comparison; 8-28 of 188 rows wrong with these poisoned buffers)."""
    poison_new_buffers(monkeypatch)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g, dtype=torch.float64) for n in (47, 77, 77))
    key_lengths = torch.tensor([35, 27])
    keep = torch.rand(2, 1, 47, 77, generator=g) < 0.8
    allowed = dense_allowed(2, 2, 47, 77, key_lengths=key_lengths, keep=keep)
    kwargs = dict(blocks=(16, 16, 2), threshold_pass=threshold_pass, key_lengths=key_lengths.to(DEVICE))
    q, k, v = (t.to(DEVICE).requires_grad_() for t in (q, k, v))
    check_against_reference(q, k, v, 1.5, allowed, 1e-9, keep=keep.to(DEVICE), **kwargs)


@pytest.mark.parametrize("threshold_pass", entmax_triton.THRESHOLD_PASSES)
def test_block_mask_keep_and_rows_without_keys_give_zeros_and_finite_gradients(threshold_pass):
    b, h, lq, lk, d = 2, 2, 40, 44, 16
    q, k, v = inputs(b, h, lq, lk, d, seed=3)
    g = torch.Generator().manual_seed(4)
    block_mask = torch.rand(1, h, 3, 3, generator=g) < 0.6
    block_mask[0, 0, 1] = False  # queries 16..31 of head 0: no allowed tile
    block_mask[0, 1, 0] = True
    keep = torch.rand(b, 1, lq, lk, generator=g) < 0.7
    keep[1, 0, 5] = False  # one query with no allowed key inside allowed tiles
    key_lengths = torch.tensor([lk, 0], device=DEVICE)  # the second sequence: no key at all
    allowed = dense_allowed(b, h, lq, lk, False, key_lengths, block_mask, keep)
    assert not allowed[0, 0, 16:32].any() and not allowed[1].any()
    kwargs = dict(
        key_lengths=key_lengths, block_mask=block_mask.to(DEVICE), keep=keep.to(DEVICE), mask_block=TILE,
        threshold_pass=threshold_pass,
    )
    check_against_reference(q, k, v, 1.5, allowed, 1e-9, **kwargs)
    out = entmax_attention(q, k, v, **kwargs)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu()))
    assert torch.equal(out[0, 0, 16:32].cpu(), torch.zeros(16, d, dtype=out.dtype))


@pytest.mark.parametrize(
    "case",
    [
        # queries the last 24 of 56 positions: the first block sees keys 0..31 whole (two tiles without the mask
        # tests), the next ones along the diagonal; the second block holds rows 16..23 of 16..31 and reads
        # keys 0..47 whole, the diagonal's tile 48..55 with the tests
        dict(lq=24, lk=56, causal=True),
        # more queries than keys: rows 0..7 see no key at all, later blocks see one whole tile or none
        dict(lq=48, lk=40, causal=True),
        # padding (one sequence's keys end inside a tile) under a block mask: the allowed tiles' list, whose first
        # entries are whole
        dict(lq=32, lk=56, key_lengths=[56, 23], block_mask=True),
        # keys ahead by 14, not a whole tile: dK/dV's key tile 16..31 reads query tiles 0 and 1 with the tests (row
        # 16 sees keys up to 30), the later ones without; its last rows (32, 33) are a partial tile read whole
        dict(lq=34, lk=48, causal=True),
    ],
    ids=["decoder-with-cache", "more-queries-than-keys", "padding-and-block-mask", "keys-ahead-by-part-of-a-tile"],
)
def test_the_sweeps_read_whole_tiles_without_mask_tests_and_stay_exact(case):
    """Each sweep reads the key tiles where every pair is allowed for every row of its block in a loop without the
    mask tests, then the others with them (dK/dV: the query tiles, those needing the tests first). Where the two
    kinds of tile meet (the causal diagonal, a padded sequence's last tile, a block of rows past Lq, the list of a
    block mask), the result is still exact entmax: a tile read without its tests where one was needed would give a
    padded or future key weight. Causal, each key is made the favourite of the last row that may not see it."""
    b, h, d = 2, 1, 16
    lq, lk = case["lq"], case["lk"]
    q, k, v = inputs(b, h, lq, lk, d, seed=lq + lk)
    if case.get("causal"):
        favour_unseen_keys(q, k)
    key_lengths = torch.tensor(case["key_lengths"], device=DEVICE) if "key_lengths" in case else None
    block_mask = None
    if case.get("block_mask"):
        block_mask = torch.ones(1, h, math.ceil(lq / TILE), math.ceil(lk / TILE), dtype=torch.bool)
        block_mask[0, 0, 0, 1] = False  # the first block skips keys 16..31: its list is tiles 0, 2, 3
        block_mask = block_mask.to(DEVICE)
    allowed = dense_allowed(b, h, lq, lk, case.get("causal", False), key_lengths, block_mask)
    kwargs = dict(causal=case.get("causal", False), key_lengths=key_lengths, block_mask=block_mask, mask_block=TILE,
                  blocks=(16, 16, 16))
    p_ref = check_against_reference(q, k, v, 1.5, allowed, 1e-9, **kwargs)
    p = probabilities(q, k, 1.5, **kwargs)
    assert torch.equal(p > 0, p_ref > 0)
    assert not p[~allowed].any()


@pytest.mark.parametrize("threshold_pass", entmax_triton.THRESHOLD_PASSES)
@pytest.mark.parametrize("causal", [False, True])
def test_tile_maxima_are_those_of_real_rows_and_allowed_pairs(threshold_pass, causal):
    """Every threshold pass writes each tile's largest allowed score, from which every later sweep decides which
    tiles to read. A block with rows past Lq (20 rows in tiles of 16) reads its whole tiles without the mask tests;
    those rows must not count: here the real rows of that block score below zero everywhere, where a row of zeros
    would raise its tiles' maxima to 0."""
    b, h, lq, lk, d = 2, 1, 20, 40, 16
    q, k, v = inputs(b, h, lq, lk, d, seed=5)
    with torch.no_grad():
        k.abs_()
        q[:, :, 16:] = -q[:, :, 16:].abs()  # the partial block's rows: every score negative
    key_lengths = torch.tensor([lk, 27], device=DEVICE)
    out = entmax_attention(q, k, v, causal=causal, key_lengths=key_lengths, blocks=(16, 16, 16),
                           threshold_pass=threshold_pass)
    tile_maxima = out.grad_fn.saved_tensors[8].cpu()  # (B·H, query tiles, key tiles)
    allowed = dense_allowed(b, h, lq, lk, causal, key_lengths)
    products = (q @ k.transpose(-1, -2)).detach().cpu().masked_fill(~allowed, float("-inf"))
    padded = torch.full((b, h, 2 * TILE, math.ceil(lk / TILE) * TILE), float("-inf"), dtype=products.dtype)
    padded[:, :, :lq, :lk] = products
    want = padded.unflatten(2, (2, TILE)).unflatten(4, (-1, TILE)).amax((3, 5)).flatten(0, 1)
    assert (want[:, 1, :2] < 0).all()  # the case the test is for
    torch.testing.assert_close(tile_maxima, want, atol=1e-12, rtol=0)


def favour_unseen_keys(q, k):
    """Causal inputs where a sweep reading a tile without the causal test where it needed it shows: each key is
    made the favourite of the last row that may not see it (row ``r`` sees keys up to ``r + Lk - Lq``)."""
    lq, lk = q.shape[2], k.shape[2]
    off = lk - lq
    with torch.no_grad():
        for key in range(max(off + 1, 0), min(lk, lq + off + 1)):
            k[:, :, key] = 2 * q[:, :, key - off - 1]


def padding_masks(b, lq, lk, causal):
    """Element masks as the models hand them to the fused kernel: the real keys of each sequence (causal: and the
    keys each query may see), broadcast over the queries or materialised; here sequence 0 is right-padded at 37
    keys (mid-tile: its 32 first keys are whole), sequence 1 left-padded (no key every query keeps)."""
    valid = torch.ones(b, lk, dtype=torch.bool)
    valid[0, 37:] = False
    valid[1, :5] = False
    broadcast = valid[:, None, None, :].expand(b, 1, lq, lk)
    materialised = broadcast.clone()
    if causal:
        materialised &= torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    return broadcast, materialised


@pytest.mark.parametrize("threshold_pass", entmax_triton.THRESHOLD_PASSES)
@pytest.mark.parametrize("causal", [False, True])
def test_padding_masks_read_their_whole_keys_without_tests_and_stay_exact(causal, threshold_pass, monkeypatch):
    """The models pass padding (and a decoder's causality) to the fused kernel as an element mask. Its leading keys
    that every query keeps are read as with ``key_lengths``, whole tiles without the mask's loads; the tiles past
    them with the mask. The result is exact entmax either way, broadcast or materialised, with a causal decoder's
    favourite unseen keys and a left-padded sequence among them."""
    monkeypatch.setattr(entmax_triton, "ELEMENT_MASK_KEYS_FROM_PAIRS", 0)  # (tiny calls skip the bounds)
    b, h, lq, lk, d = 2, 2, 40, 52, 16
    q, k, v = inputs(b, h, lq, lk, d, seed=37 + causal)
    if causal:
        favour_unseen_keys(q, k)
    for keep in padding_masks(b, lq, lk, causal):
        whole, reach = entmax_triton._element_mask_keys(keep, causal, b)
        assert whole.tolist() == [37, 0] and reach.tolist() == [37, lk]
        allowed = dense_allowed(b, h, lq, lk, causal, keep=keep)
        kwargs = dict(causal=causal, keep=keep.to(DEVICE), blocks=(16, 16, 16), mask_block=16,
                      threshold_pass=threshold_pass)
        p_ref = check_against_reference(q, k, v, 1.5, allowed, 1e-9, **kwargs)
        assert torch.equal(probabilities(q, k, 1.5, **kwargs) > 0, p_ref > 0)


@pytest.mark.parametrize("causal", [False, True])
def test_every_kernel_reads_the_keys_every_query_keeps_without_the_mask(causal, monkeypatch):
    """The whole keys are what the kernels read without the mask: told that every key is one, they read a mask
    that hides a favourite key of each row as if it were absent. The inference forward (threshold pass, fallback,
    output) then gives the output of no mask at all, and dK/dV its dV (the training forward keeps one loop, with the
    tests, so the backward's per-row constant differs); dQ reads the pairs dK/dV reads (Σ q·dq = Σ k·dk, which a dQ
    reading the mask would break at the hidden pairs). Read, the mask changes both. (Scores scaled down: supports
    wide enough that rows go to the fallback.)"""
    monkeypatch.setattr(entmax_triton, "ELEMENT_MASK_KEYS_FROM_PAIRS", 0)
    launches = fallback_launches(monkeypatch)
    b, h, lq, lk, d = 1, 2, 32, 48, 16
    q, k, v = inputs(b, h, lq, lk, d, seed=8)
    keep = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    # head 0's favourite among keys 0..15, a tile that causality leaves whole to every row
    keep[0, 0, torch.arange(lq), (q @ k.transpose(-1, -2))[0, 0, :, :16].argmax(-1)] = False
    if causal:
        keep &= torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    kwargs = dict(causal=causal, blocks=(16, 16, 16), mask_block=16, scaling=0.05)
    grad_out = torch.randn(b, h, lq, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def run(**extra):
        with torch.no_grad():
            out = entmax_attention(q, k, v, **kwargs, **extra)
        trained = entmax_attention(q, k, v, **kwargs, **extra)
        return (out, *torch.autograd.grad(trained, (q, k, v), grad_out.to(trained)))

    masked, free = run(keep=keep.to(DEVICE)), run()
    every = torch.full((b,), lk, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(entmax_triton, "_element_mask_keys", lambda keep, causal, batch: (every, every))
    launches.clear()
    out, dq, dk, dv = run(keep=keep.to(DEVICE))
    assert sum(rows_sent(launches)) > 0  # the fallback solved rows too
    torch.testing.assert_close(out, free[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(dv, free[3], atol=1e-12, rtol=0)
    assert (masked[0] - free[0]).abs().max() > 1e-2 and (masked[3] - free[3]).abs().max() > 1e-2
    torch.testing.assert_close((q * dq).sum((2, 3)), (k * dk).sum((2, 3)), atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_the_keys_an_element_mask_keeps_for_every_query_and_for_some_are_counted_on_every_head(causal):
    """``_element_mask_keys`` against the obvious counts, for masks of every shape the kernel takes: broadcast
    batch, heads and queries, a hole in one head, trailing keys no query keeps, a key no query keeps, causality left
    out of the mask or included."""
    g = torch.Generator().manual_seed(3)
    lq, lk = 6, 9
    hidden = ~torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    for trial in range(60):
        b, h = int(torch.randint(1, 3, (1,), generator=g)), int(torch.randint(1, 3, (1,), generator=g))
        keep = torch.rand(b, h, lq, lk, generator=g) < 0.97
        keep[:, :, :, int(torch.randint(0, lk + 1, (1,), generator=g)):] = False  # padding
        if trial % 3 == 0:
            keep = keep[:, :, :1].expand(b, h, lq, lk)  # one row for every query (padding)
        if trial % 4 == 1:
            keep = keep[:1].expand(2, h, lq, lk)  # one mask for the batch
        if causal and trial % 2:
            keep = keep & ~hidden  # causality included, as a decoder's mask has it
        ok = keep | hidden if causal else keep
        whole = [next((j for j in range(lk) if not ok[i, :, :, j].all()), lk) for i in range(keep.shape[0])]
        reach = [max((j + 1 for j in range(lk) if keep[i, :, :, j].any()), default=0) for i in range(keep.shape[0])]
        got = entmax_triton._element_mask_keys(keep, causal, keep.shape[0])
        assert [t.dtype for t in got] == [torch.int32] * 2, trial
        assert got[0].tolist() == whole and got[1].tolist() == reach, trial
    empty = entmax_triton._element_mask_keys(torch.ones(2, 1, lq, 0, dtype=torch.bool), causal, 2)
    assert [t.tolist() for t in empty] == [[0, 0], [0, 0]]


def test_no_key_past_the_last_one_an_element_mask_keeps_is_read(monkeypatch):
    """Keys past the last one the mask keeps for some query (a padded batch's padding) are the kernels' key lengths,
    given or not: no tile of them is read (here no key lengths given, and given longer). Calls of fewer than
    ``ELEMENT_MASK_KEYS_FROM_PAIRS`` pairs, whose time is their launches, skip the bounds' launches (and read the
    mask in every tile), as do masks that differ by head (predicted pairs, DAM masks: not padding)."""
    given = []

    def watch(launch, grid, args, kwargs):
        given.append(args[2].clone() if kwargs["HAS_KLEN"] else None)  # (q, k, key lengths, ...)
        return launch()

    spy_on_kernel(monkeypatch, "bound_kernel", watch)
    b, h, lq, lk, d = 2, 2, 20, 40, 16
    q, k, v = inputs(b, h, lq, lk, d, seed=4)
    keep, _ = padding_masks(b, lq, lk, False)
    pairs = b * h * lq * lk
    for threshold, key_lengths in [(pairs, None), (pairs + 1, None), (pairs, [39, 12]), (pairs + 1, [39, 12])]:
        monkeypatch.setattr(entmax_triton, "ELEMENT_MASK_KEYS_FROM_PAIRS", threshold)
        key_lengths = None if key_lengths is None else torch.tensor(key_lengths, device=DEVICE)
        allowed = dense_allowed(b, h, lq, lk, keep=keep, key_lengths=key_lengths)
        check_against_reference(q, k, v, 1.5, allowed, 1e-9, keep=keep.to(DEVICE), key_lengths=key_lengths,
                                blocks=(16, 16, 16), mask_block=16)
        if threshold > pairs:  # not taken: the key lengths given, if any
            assert given[-1] is None if key_lengths is None else given[-1].tolist() == [39, 12]
        else:
            assert given[-1].tolist() == ([37, lk] if key_lengths is None else [37, 12])
    monkeypatch.setattr(entmax_triton, "ELEMENT_MASK_KEYS_FROM_PAIRS", 0)
    per_head = keep.expand(b, h, lq, lk).clone()
    per_head[:, 1, 0, 0] = False  # head 1's own mask
    allowed = dense_allowed(b, h, lq, lk, keep=per_head)
    check_against_reference(q, k, v, 1.5, allowed, 1e-9, keep=per_head.to(DEVICE), blocks=(16, 16, 16),
                            mask_block=16)
    assert given[-1] is None


@pytest.mark.parametrize("blocks", [(16, 32, 16), (32, 16, 16)], ids=["wider-key-tiles", "taller-query-tiles"])
@pytest.mark.parametrize(
    "lq, lk",
    [(34, 48), (40, 40), (50, 51)],
    # keys ahead by 1: key tile 32..63 of 32 keys has three query tiles of 16 rows along its diagonal (16, 32, 48)
    ids=["keys-ahead-by-14", "self-attention", "keys-ahead-by-1"],
)
def test_query_and_key_tiles_of_different_sizes_stay_exact(blocks, lq, lk):
    """Rows and keys per tile need not be equal (the GPU benchmark's profile times 64 x 128 and 128 x 64): every
    list, the diagonal's masked tiles (up to three query tiles of 16 rows for a key tile of 32) and padding keys
    inside a causal decoder's tiles still give exact entmax, its support and its gradients."""
    b, h, d = 2, 1, 16
    q, k, v = inputs(b, h, lq, lk, d, seed=lq + blocks[0])
    favour_unseen_keys(q, k)
    key_lengths = torch.tensor([lk, lk - 5], device=DEVICE)
    allowed = dense_allowed(b, h, lq, lk, True, key_lengths)
    kwargs = dict(causal=True, key_lengths=key_lengths, blocks=blocks, mask_block=32)
    p_ref = check_against_reference(q, k, v, 1.5, allowed, 1e-9, **kwargs)
    p = probabilities(q, k, 1.5, **kwargs)
    assert torch.equal(p > 0, p_ref > 0)


@pytest.mark.parametrize("threshold_pass", entmax_triton.THRESHOLD_PASSES)
def test_float32_and_bfloat16_inputs_match_float64_entmax_within_their_precision(threshold_pass, monkeypatch):
    monkeypatch.setattr(entmax_triton, "INTERPRETER_SORT_ABOVE", 4)  # candidates merged by sorting, as on the GPU
    monkeypatch.setattr(entmax_triton, "DEFAULT_THRESHOLD_PASS", threshold_pass)
    q, k, v = inputs(1, 2, 32, 40, 16, seed=11)
    allowed = dense_allowed(1, 2, 32, 40, causal=True)
    ref, p_ref, _ = reference(q, k, v, 1.5, allowed)
    q32, k32, v32 = (t.detach().float() for t in (q, k, v))
    out = entmax_attention(q32, k32, v32, causal=True)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), ref.detach(), atol=1e-5, rtol=1e-5)
    p = probabilities(q32, k32, 1.5, causal=True)
    assert torch.equal(p > 0, p_ref > 0)  # the same support as exact entmax
    assert (p - p_ref).abs().max() < 1e-5
    bf = [t.detach().bfloat16() for t in (q, k, v)]
    out_bf = entmax_attention(*bf, causal=True)
    assert out_bf.dtype == torch.bfloat16
    ref_bf, _, _ = reference(*bf, 1.5, allowed)  # the same rounded inputs
    torch.testing.assert_close(out_bf.cpu().double(), ref_bf.detach(), atol=3e-2, rtol=3e-2)


def dropout_outputs(q, k, v, seed, alpha=1.5, **kwargs):
    """The kernel's output under ``torch.manual_seed(seed)``, and its dropout mask made visible: the same seed
    with the identity as values gives the dropped probability matrix (the draw depends only on the seed and the
    (batch·head, query, key) position, not on the values)."""
    torch.manual_seed(seed)
    out = None if v is None else entmax_attention(q, k, v, alpha=alpha, **kwargs)
    torch.manual_seed(seed)
    return out, probabilities(q, k, alpha, **kwargs)


@pytest.mark.parametrize("alpha", [1.5, 1.3])
def test_dropout_drops_pairs_of_the_support_and_scales_the_rest(alpha):
    q, k, _ = inputs(2, 2, 24, 32, 16, seed=21)
    key_lengths = torch.tensor([32, 25], device=DEVICE)
    p = probabilities(q, k, alpha, key_lengths=key_lengths)  # no dropout
    support = p > 0
    _, dropped = dropout_outputs(q, k, None, seed=3, alpha=alpha, key_lengths=key_lengths, dropout=0.4)
    kept = dropped != 0
    assert not (kept & ~support).any()  # nothing outside entmax's support appears
    torch.testing.assert_close(dropped[kept], p[kept] / 0.6, atol=1e-12, rtol=0)  # kept: scaled by 1/(1-p)
    n = int(support.sum())
    share = float(kept.sum()) / n
    assert n > 200 and abs(share - 0.6) < 4 * (0.6 * 0.4 / n) ** 0.5, (share, n)  # binomial, 4 sigma
    _, again = dropout_outputs(q, k, None, seed=3, alpha=alpha, key_lengths=key_lengths, dropout=0.4)
    _, other = dropout_outputs(q, k, None, seed=4, alpha=alpha, key_lengths=key_lengths, dropout=0.4)
    assert torch.equal(again, dropped) and not torch.equal(other, dropped)  # torch.manual_seed reproduces it
    _, none = dropout_outputs(q, k, None, seed=3, alpha=alpha, key_lengths=key_lengths, dropout=1.0)
    assert not none.any()


def philox4x32_10(counter: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", 2011) of the 64-bit counters
    ``(lo, hi, 0, 0)`` under the 64-bit key ``seed``: four 32-bit words each, written from the paper's round function
    (uint64 products of 32-bit words are exact)."""
    low = np.uint64(0xFFFFFFFF)
    c0, c1 = counter & low, counter >> np.uint64(32)
    c2, c3 = np.zeros_like(counter), np.zeros_like(counter)
    k0, k1 = np.uint64(seed) & low, np.uint64(seed) >> np.uint64(32)
    for _ in range(10):
        p0, p2 = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (p2 >> np.uint64(32)) ^ c1 ^ k0, p2 & low, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & low
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & low, (k1 + np.uint64(0xBB67AE85)) & low
    return c0, c1, c2, c3


@pytest.mark.parametrize(
    ("blocks", "lk", "threshold_pass"),
    [(None, 70, "bound"), ((16, 32, 16), 70, "bound"), ((16, 64, 16), 70, "bound"), (None, 40, "stream")],
)
def test_dropout_keeps_the_pairs_philox_draws_keep_eight_pairs_a_draw(blocks, lk, threshold_pass):
    """Which pairs dropout keeps, whatever the tile width (16 keys: half a block of 32; 32; 64) or the kernel (the
    stream pass's gather draws one key at a time): key ``32 b + 8 n + 2 c + h`` of row ``r`` (batch·head ``bh``) is
    kept when the 16-bit half ``h`` of word ``n`` of Philox draw ``(bh · Lq + r) · 4 ⌈Lk/32⌉ + 4 b + c`` is at least
    the probability times 2^16, rounded: 8 pairs per draw, none drawn twice."""
    b, h, lq, p = 2, 2, 9, 0.3
    zeros = torch.zeros(b, h, lq, 16, device=DEVICE)
    torch.manual_seed(5)  # zero scores: every pair in the support, each kept one shows in the probabilities
    shown = probabilities(zeros, zeros[:, :, :1].expand(b, h, lk, 16), 1.5, dropout=p, blocks=blocks,
                          threshold_pass=threshold_pass)
    torch.manual_seed(5)
    seed = int(torch.randint(2**62, (1,), device=DEVICE))  # the kernel's seed: the call's first draw
    row, key = np.arange(b * h * lq)[:, None], np.arange(lk)[None, :]
    draw = row * 4 * math.ceil(lk / 32) + key // 32 * 4 + key % 8 // 2
    words = np.stack(philox4x32_10(draw.astype(np.uint64), seed))  # (4, rows, keys)
    word = words[key % 32 // 8, row, key]
    half = (word >> (key % 2 * 16).astype(np.uint64)) & np.uint64(0xFFFF)
    want = torch.from_numpy(half >= round(p * 2**16)).reshape(b, h, lq, lk)
    assert torch.equal(shown != 0, want)
    number = draw * 8 + key % 32 // 8 * 2 + key % 2  # (draw, word, half): no two pairs share one; 8 pairs a draw
    assert len(np.unique(number)) == number.size and np.bincount(draw.ravel()).max() == 8


@pytest.mark.parametrize("threshold_pass", entmax_triton.THRESHOLD_PASSES)
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3])
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_outputs_and_gradients_equal_dense_entmax_with_the_same_mask(alpha, causal, threshold_pass):
    """The backward drops the same pairs as the forward and differentiates entmax before dropout:
    d/dp of (dropout(p) v) is dropout(dO vᵀ), then entmax's Jacobian over the undropped support. ``stream``:
    the forward's output is gathered from the held support, the backward sweeps the tiles: the same draws."""
    check_dropout_against_dense_entmax(alpha, causal, threshold_pass, padding="key_lengths")


@pytest.mark.parametrize("threshold_pass", entmax_triton.THRESHOLD_PASSES)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_under_a_padding_mask_reads_whole_tiles_and_equals_dense_entmax(causal, threshold_pass, monkeypatch):
    """Training with attention dropout, padding as the models pass it (an element mask): the training forward reads
    the whole keys' tiles in a loop without the mask's loads and tests, as the sweeps do, and the rest with them."""
    monkeypatch.setattr(entmax_triton, "ELEMENT_MASK_KEYS_FROM_PAIRS", 0)  # (tiny calls skip the bounds)
    check_dropout_against_dense_entmax(1.5, causal, threshold_pass, padding="element mask")


def check_dropout_against_dense_entmax(alpha, causal, threshold_pass, padding):
    """Output and gradients of the kernel with dropout 0.3 equal dense float64 entmax times the kernel's dropout
    mask (made visible by :func:`dropout_outputs`), over two sequences, the second padded from key 21 (tiles of
    16: its first tile whole, its second partly padding), as ``key_lengths`` or as a broadcast element mask. The
    kernels load keys past the padding as zeros: the second sequence's last row scores every real key below zero,
    so that a padded key read without the test would take most of its weight."""
    b, h, lq, lk, d = 2, 1, 20, 28, 16
    q, k, v = inputs(b, h, lq, lk, d, seed=30 + causal)
    key_lengths = torch.tensor([lk, 21], device=DEVICE)
    with torch.no_grad():
        q[1, :, -1] = 0
        q[1, :, -1, 0] = 2.0
        k[1, :, :21, 0] = -k[1, :, :21, 0].abs() - 0.5
    masks = dict(key_lengths=key_lengths)
    if padding == "element mask":
        masks = dict(keep=(torch.arange(lk, device=DEVICE) < key_lengths[:, None])[:, None, None, :].expand(
            b, 1, lq, lk))
    kwargs = dict(alpha=alpha, causal=causal, dropout=0.3, threshold_pass=threshold_pass, **masks)
    out, dropped = dropout_outputs(q, k, v, seed=8, **kwargs)
    allowed = dense_allowed(b, h, lq, lk, causal, key_lengths)
    _, p_ref, (qr, kr, vr) = reference(q, k, v, alpha, allowed)
    kept = (dropped != 0).double()
    assert 0 < kept.sum() < (p_ref > 0).sum()
    ref = (p_ref * kept / 0.7) @ vr
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(out))
    ref_grads = torch.autograd.grad(ref, (qr, kr, vr), grad_out)
    torch.testing.assert_close(out.detach().cpu().double(), ref.detach(), atol=1e-9, rtol=1e-9)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-8, rtol=1e-8, msg=f"d{name}")


def test_float32_products_follow_torchs_matmul_precision_setting():
    """Full float32 by default (exact, as the tests above need); TF32 tensor cores when the user allows them for
    torch's own matmuls; float64 always exact."""
    from hf_sparse.entmax_triton import _matmul_precision

    before = torch.get_float32_matmul_precision()
    try:
        assert _matmul_precision(torch.float32) == "ieee" and before == "highest"
        torch.set_float32_matmul_precision("high")
        assert _matmul_precision(torch.float32) == "tf32"
        assert _matmul_precision(torch.float64) == "ieee"
        assert _matmul_precision(torch.bfloat16) == "tf32"  # the tensor cores' own format; the flag is not read
    finally:
        torch.set_float32_matmul_precision(before)
    assert _matmul_precision(torch.float32) == "ieee"


def test_explicit_scaling_and_value_dim_other_than_key_dim():
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 1, n, 16, generator=g, dtype=torch.float64).to(DEVICE) for n in (17, 33))
    v = torch.randn(1, 1, 33, 24, generator=g, dtype=torch.float64).to(DEVICE)
    for t in (q, k, v):
        t.requires_grad_()
    check_against_reference(q, k, v, 2.0, dense_allowed(1, 1, 17, 33), 1e-9, scaling=0.7)


@pytest.mark.parametrize("threshold_pass", ["bound", "topk"])
def test_each_tunable_kernel_is_launched_with_its_launch_options(threshold_pass, monkeypatch):
    """``LAUNCH_OPTIONS`` (what ``benchmark_kernel_versions.py --launch`` sets) reaches every launch of the kernels
    it names, and only theirs: a benchmark of launch options that did not apply them would time the defaults."""
    options = {name: {"maxnreg": 96 + i} for i, name in enumerate(entmax_triton.TUNABLE_KERNELS)}
    monkeypatch.setattr(entmax_triton, "LAUNCH_OPTIONS", options)
    seen = {}

    def watch(name, launch, grid, args, kwargs):
        seen.setdefault(name, []).append(kwargs.get("maxnreg"))
        return launch()

    for name in ("threshold_kernel", "bound_kernel", "stream_kernel", "fallback_kernel", "forward_kernel",
                 "gather_kernel", "backward_dq_kernel", "tile_columns_kernel", "backward_dkdv_kernel"):
        spy_on_kernel(monkeypatch, name, functools.partial(watch, name))
    q, k, v = inputs(1, 1, 16, 32, 16, seed=2)
    entmax_attention(q, k, v, blocks=(16, 16, 16), threshold_pass=threshold_pass).sum().backward()
    first = "bound_kernel" if threshold_pass == "bound" else "threshold_kernel"
    launched = {first, "fallback_kernel", "forward_kernel", "backward_dq_kernel", "backward_dkdv_kernel"}
    assert seen == {**{name: [options[name]["maxnreg"]] for name in launched}, "tile_columns_kernel": [None]}


def test_every_kernel_asks_for_fused_multiply_adds_whatever_tritons_default(monkeypatch):
    """The kernels were timed and checked compiled with fused multiply-adds, Triton's default up to 3.9; 3.10 turns
    the default off. Every launch of every kernel asks for them (``COMPILE_OPTIONS``), so a Triton upgrade does not
    change the code the GPU runs, and a kernel launched without them fails here."""
    from hf_sparse.entmax_rows_triton import entmax_rows
    from hf_sparse.pair_codes import PairCodes
    from hf_sparse.sparsefinder import _distance_codes

    kernels = entmax_triton._load_kernels()
    asked = {}

    def watch(name, launch, grid, args, kwargs):
        asked.setdefault(name, set()).add(kwargs.get("enable_fp_fusion"))
        return launch()

    for name in vars(kernels):
        spy_on_kernel(monkeypatch, name, functools.partial(watch, name))
    q, k, v = inputs(1, 1, 16, 40, 16, seed=3)
    for threshold_pass in entmax_triton.THRESHOLD_PASSES:  # every sweep, the fallback, the gather, the backward
        entmax_attention(q, k, v, blocks=(16, 16, 16), threshold_pass=threshold_pass).sum().backward()
    points = torch.randn(1, 1, 40, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    codes = PairCodes(*_distance_codes(points[:, :, -16:], points, 1.5), match="distance")
    entmax_attention(q, k, v, blocks=(16, 16, 16), keep=codes)  # distance codes: their tiles' kernel
    entmax_rows(torch.randn(3, 40, dtype=torch.float64, requires_grad=True), None, "entmax15").sum().backward()
    assert asked == {name: {True} for name in vars(kernels)}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(key=torch.zeros(1, 2, 8, 4)), "shapes do not fit"),
        (dict(query=torch.zeros(2, 8, 16)), "query must be a"),
        (dict(value=torch.zeros(1, 2, 8, 16, dtype=torch.float16)), "share dtype"),
        (dict(query=torch.zeros(1, 2, 8, 16, dtype=torch.int64)), "float32, float16"),
        (dict(alpha=1.0), "alpha must be > 1"),
        (dict(alpha="1.5"), "alpha must be a number"),
        (dict(block_mask=torch.ones(1, 2, 2, 1, dtype=torch.bool)), "block_mask must be a bool tensor of shape"),
        (dict(block_mask=torch.ones(1, 2, 1, 1)), "block_mask must be a bool tensor"),
        (dict(keep=torch.ones(1, 2, 8, 9, dtype=torch.bool)), "keep must be a bool tensor of shape"),
        (dict(key_lengths=torch.tensor([1.0])), "key_lengths must be an integer tensor"),
        (dict(mask_block=12), "mask_block must be a multiple of 16"),
        (dict(blocks=(16, 16, 32)), "blocks="),
        (dict(n_iter=0), "n_iter must be"),
        (dict(dropout=1.5), r"dropout must be a probability in \[0, 1\] \(0 in eval\), got 1.5"),
        (dict(dropout=True), "dropout must be a probability"),
        (dict(threshold_pass="sort"), "threshold_pass must be one of topk, stream, bound, got 'sort'"),
    ],
)
def test_bad_input_is_refused_naming_the_value(change, message):
    args = dict(query=torch.zeros(1, 2, 8, 16), key=torch.zeros(1, 2, 8, 16), value=torch.zeros(1, 2, 8, 16))
    args.update(change)
    q, k, v = (args.pop(n).to(DEVICE) for n in ("query", "key", "value"))
    with pytest.raises(ValueError, match=message):
        entmax_attention(q, k, v, **args)


def test_cpu_without_the_interpreter_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reasons = unavailable_reasons("cpu")
    assert reasons and "TRITON_INTERPRET" in reasons[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert unavailable_reasons(DEVICE) == []


def test_empty_inputs():
    q, k, v = inputs(1, 2, 0, 8, 16)
    assert entmax_attention(q, k, v).shape == (1, 2, 0, 16)
    q, k, v = inputs(1, 2, 5, 0, 16)
    out = entmax_attention(q, k, v)
    assert out.shape == (1, 2, 5, 16) and not out.any()
    assert math.isfinite(float(torch.autograd.grad(out.sum(), q)[0].abs().sum()))


# --------------------------------------------------------------------------------------------------------------
# Dispatch: attention_backend="fused" in the models, and what "auto" picks
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn, pattern", [("entmax15", "window:6+global:1"), ("entmax_bisect", "dense")])
def test_sparse_bert_on_the_fused_backend_equals_eager(fn, pattern, monkeypatch):
    """Padding reaches the kernel as an element mask (with the pattern's tiles, and its pairs inside them): each
    sequence's real keys up to its first padded one are read without it (the bounds taken at this tiny size too)."""
    from conftest import random_batch, tiny_kwargs

    monkeypatch.setattr(entmax_triton, "ELEMENT_MASK_KEYS_FROM_PAIRS", 0)
    from hf_sparse import SparseBertConfig, SparseBertForMaskedLM

    torch.manual_seed(0)
    kwargs = tiny_kwargs(
        attention_fn=fn, entmax_alpha=1.3, attention_pattern=pattern, num_attention_heads=2, num_hidden_layers=1
    )
    model = SparseBertForMaskedLM(SparseBertConfig(**kwargs)).double().to(DEVICE).train()
    with torch.no_grad():  # sharper scores: sparse rows at random initialisation
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(8.0)
    ids, mask = random_batch(batch=2, length=24)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    results = {}
    for backend in ("eager", "fused"):
        model.config.attention_backend = backend
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype, device=DEVICE)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = logits.detach(), grads
    (eager, eager_grads), (fused, fused_grads) = results["eager"], results["fused"]
    torch.testing.assert_close(fused, eager, atol=1e-10, rtol=0)
    assert fused_grads.keys() == eager_grads.keys() and len(fused_grads) > 8
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-9, rtol=0, msg=name)


def kernel_dropout_for_eager(monkeypatch):
    """Make the eager backend drop exactly the pairs the fused kernel drops, call for call.

    The kernel's dropout draws one seed from torch's generator per call and then depends only on the
    (batch·head, query, key) position; with zero queries and keys every allowed pair is in the support, so the
    kernel over identity values shows its whole mask. The eager backend's ``F.dropout`` (in
    ``hf_sparse.attention`` only) is replaced by that mask, drawn in the same order as the fused run draws."""
    import types

    import torch.nn.functional as F

    from hf_sparse import attention

    def dropout(probs, p=0.5, training=True):
        if not training or p == 0:
            return probs
        b, h, lq, lk = probs.shape
        zeros = probs.new_zeros(b, h, lq, 16)
        eye = torch.eye(lk, dtype=probs.dtype, device=probs.device).expand(b, h, lk, lk)
        with torch.no_grad():
            shown = entmax_attention(zeros, zeros[:, :, :1].expand(b, h, lk, 16), eye, dropout=p)
        return probs * (shown != 0) / (1 - p)

    monkeypatch.setattr(attention, "F", types.SimpleNamespace(**{**vars(F), "dropout": dropout}))


def test_sparse_bert_trains_with_attention_dropout_on_the_fused_kernel(monkeypatch):
    """BERT's default attention dropout (0.1) runs in the kernel: the same logits and gradients as eager dropping
    the same pairs, a fresh mask per call, and ``auto``'s reason to leave the kernel in training is gone."""
    from conftest import random_batch, tiny_kwargs
    from hf_sparse import SparseBertConfig, SparseBertForMaskedLM

    torch.manual_seed(0)
    kwargs = tiny_kwargs(attention_fn="entmax15", attention_probs_dropout_prob=0.3, num_attention_heads=2)
    model = SparseBertForMaskedLM(SparseBertConfig(**kwargs)).double().to(DEVICE).train()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(8.0)
    ids, mask = (t.to(DEVICE) for t in random_batch(batch=2, length=20))
    kernel_dropout_for_eager(monkeypatch)

    def forward_backward(backend, seed):
        model.config.attention_backend = backend
        model.zero_grad()
        torch.manual_seed(seed)
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype, device=DEVICE)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads, model.attention_backends_used()

    fused, fused_grads, used = forward_backward("fused", seed=5)
    assert set(used.values()) == {"fused"}
    eager, eager_grads, _ = forward_backward("eager", seed=5)
    torch.testing.assert_close(fused, eager, atol=1e-10, rtol=0)
    assert fused_grads.keys() == eager_grads.keys() and len(fused_grads) > 8
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-9, rtol=0, msg=name)
    assert not torch.allclose(forward_backward("fused", seed=6)[0], fused)  # another draw, other pairs dropped
    model.eval()
    with torch.no_grad():  # no dropout in eval
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, fused)


def test_gradient_checkpointing_recomputes_the_same_dropout():
    """Checkpointed layers run their forward again in the backward; torch.utils.checkpoint restores the RNG
    state, so the kernel draws the same seed and drops the same pairs: the gradients equal an unchecked run's."""
    from conftest import random_batch, tiny_kwargs
    from hf_sparse import SparseBertConfig, SparseBertForMaskedLM

    kwargs = tiny_kwargs(
        attention_fn="entmax15", attention_probs_dropout_prob=0.3, num_attention_heads=2, attention_backend="fused"
    )
    ids, mask = (t.to(DEVICE) for t in random_batch(batch=2, length=18))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SparseBertForMaskedLM(SparseBertConfig(**kwargs)).double().to(DEVICE).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        torch.manual_seed(7)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[1].items():
        torch.testing.assert_close(grad, grads[0][name], atol=1e-12, rtol=0, msg=name)


def test_auto_picks_fused_for_entmax_on_cuda_only_and_explicit_requests_name_what_blocks_them(monkeypatch):
    from hf_sparse.attention import choose_backend
    from hf_sparse.patterns import parse

    dense, cuda, cpu = parse("dense"), torch.device("cuda"), torch.device("cpu")
    for fn in ("entmax15", "sparsemax", "entmax_bisect"):
        assert choose_backend("auto", pattern=dense, n=512, device=cuda, attention_fn=fn) == "fused"
        assert choose_backend("auto", pattern=dense, n=512, device=cpu, attention_fn=fn) == "eager"  # interpreter on
    assert choose_backend("auto", pattern=dense, n=512, device=cuda, attention_fn="softmax") == "sdpa"
    # the kernel draws attention dropout itself (FlexAttention has none: softmax with dropout stays on SDPA)
    assert choose_backend("auto", pattern=dense, n=512, device=cuda, attention_fn="entmax15", dropout=0.1) == "fused"
    assert choose_backend("fused", pattern=dense, n=512, device=cuda, attention_fn="entmax15", dropout=0.1) == "fused"
    probs = dict(pattern=dense, n=512, device=cuda, attention_fn="entmax15", output_attentions=True)
    assert choose_backend("auto", **probs) == "eager"
    with pytest.raises(ValueError, match="output_attentions=True needs the probabilities"):
        choose_backend("fused", **probs)
    with pytest.raises(ValueError, match="'softmax' is not an entmax"):
        choose_backend("fused", pattern=dense, n=512, device=cuda, attention_fn="softmax")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="fused' is not possible here: .*TRITON_INTERPRET"):
        choose_backend("fused", pattern=dense, n=512, device=cpu, attention_fn="entmax15")


def test_auto_runs_eager_for_full_precision_entmax_on_cuda_from_the_measured_length_while_it_fits(monkeypatch):
    """Full float32 products (torch's default precision) make the fused kernel 2-4x slower than eager from
    L = 2048 on (benchmarks/gpu.md): auto takes eager there, unless eager's L x L tensors would crowd the GPU."""
    from hf_sparse import attention
    from hf_sparse.attention import FULL_PRECISION_EAGER_MIN_LENGTH, choose_backend, compute_dtype
    from hf_sparse.patterns import parse

    monkeypatch.setattr(attention, "device_memory", lambda device: 80 * 2**30)
    n = FULL_PRECISION_EAGER_MIN_LENGTH

    def auto(dtype, n=n, batch=1, needs_grad=True, requested="auto", pattern="dense", predicted=False):
        pairs = batch * 12 * n * n
        return choose_backend(requested, pattern=parse(pattern), n=n, device=torch.device("cuda"),
                              attention_fn="entmax15", needs_grad=needs_grad, dtype=dtype, pairs=pairs,
                              predicted=predicted)

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert auto(torch.float32) == "eager" and auto(torch.float64) == "eager"
        assert auto(torch.float32, n=n - 1) == "fused"  # below the measured crossover
        assert auto(torch.float32, requested="fused") == "fused"  # an explicit request is kept
        # training: 8 float32 copies of batch x 12 x 4096^2 scores, 6.4 GB per sequence, against 20 GiB
        assert auto(torch.float32, n=4096, batch=3) == "eager" and auto(torch.float32, n=4096, batch=4) == "fused"
        # a forward alone keeps 4: L = 8192 fits once (12.9 GB), L = 16384 (51.5 GB) does not
        assert auto(torch.float32, n=8192, needs_grad=False) == "eager" and auto(torch.float32, n=8192) == "fused"
        assert auto(torch.float32, n=16384, needs_grad=False) == "fused"
        assert auto(torch.bfloat16) == "fused" and auto(torch.float16) == "fused" and auto(None) == "fused"
        # a sparse pattern shrinks the fused kernel's work (skipped tiles), not eager's: it stays fused
        assert auto(torch.float32, n=4096, pattern="window:64") == "fused"  # 3 of 32 tiles per row
        assert auto(torch.float32, n=4096, pattern="window:1800") == "eager"  # more than a third of the tiles
        # Sparsefinder's predicted attention runs on the fused kernel or by gathering, never dense eager
        assert auto(torch.float32, predicted=True) == "fused"
        torch.set_float32_matmul_precision("high")  # TF32: the fused kernel wins at every length
        assert auto(torch.float32) == "fused" and auto(torch.float64) == "eager"
    finally:
        torch.set_float32_matmul_precision(before)

    cpu = torch.device("cpu")
    assert compute_dtype(cpu, torch.float32) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(cpu, torch.float32) == torch.bfloat16


def test_the_models_tell_auto_their_compute_dtype_and_pair_count(monkeypatch):
    """What auto's full-precision rule reads comes from the models: SparseBERT's dtype (autocast's under
    autocast) and batch x heads x L x L; Marian's query dtype and each attention's own query and key lengths."""
    from conftest import tiny_kwargs
    from hf_sparse import (
        EntmaxSparsefinderMarianConfig,
        EntmaxSparsefinderMarianMTModel,
        SparseBertConfig,
        SparseBertForMaskedLM,
        attention,
        modeling_entmax_marian,
        modeling_sparse_bert,
    )
    from test_modeling_entmax_marian import MARIAN

    seen = []

    def spy(requested, **kw):
        seen.append((kw["dtype"], kw["pairs"], kw["n"]))
        return attention.choose_backend(requested, **kw)

    monkeypatch.setattr(modeling_sparse_bert, "choose_backend", spy)
    monkeypatch.setattr(modeling_entmax_marian, "choose_backend", spy)
    bert = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(attention_fn="entmax15", num_attention_heads=2)))
    ids = torch.randint(5, bert.config.vocab_size, (3, 10))
    bert(input_ids=ids)
    assert seen and set(seen) == {(torch.float32, 3 * 2 * 10 * 10, 10)}
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bert(input_ids=ids)
    assert {dtype for dtype, _, _ in seen} == {torch.bfloat16}

    seen.clear()
    marian = EntmaxSparsefinderMarianMTModel(EntmaxSparsefinderMarianConfig(**MARIAN)).double().eval()
    src, tgt = torch.randint(5, 25, (3, 11)), torch.randint(5, 25, (3, 7))
    marian(input_ids=src, decoder_input_ids=tgt)
    heads = MARIAN["encoder_attention_heads"]
    # encoder self (11 x 11), decoder self (7 x 7), cross (7 queries x 11 keys); n is the key count
    assert set(seen) == {
        (torch.float64, 3 * heads * 11 * 11, 11), (torch.float64, 3 * heads * 7 * 7, 7),
        (torch.float64, 3 * heads * 7 * 11, 11),
    }
