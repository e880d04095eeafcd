"""Triton kernels of :mod:`hf_sparse.entmax_triton` (read that module's docstring first), and, in the last section,
the row kernel of :mod:`hf_sparse.entmax_rows_triton`, which shares the Newton step and its exactness check.

Imported lazily, on first use, by :mod:`hf_sparse.entmax_triton` only: ``@triton.jit`` decides at definition
time whether a kernel is compiled for the GPU or run by Triton's CPU interpreter (``TRITON_INTERPRET=1``), so the
kernels are defined when the first call needs them, not when the models are imported.

Scale conventions shared by every kernel (one query row, its allowed keys' scores ``s = raw · scale``, where the
kernels hold the unscaled products ``raw = q · k``): ``m`` is the row's largest allowed score (its largest product
times ``scale``), ``x = (α - 1)(s - m)`` (``x <= 0``, up to the rounding of ``m``), and the row's threshold ``τ``
lives on the ``x`` scale: ``p̃ = [x - τ]₊^{1/(α-1)}``. 1.5-entmax: ``x = (s - m)/2``, ``p̃ = [x - τ]₊²``, the ``z`` of
``entmax.entmax15``; sparsemax: ``x = s - m``, ``p̃ = [x - τ]₊``. Every pass computes ``d = x - τ`` of a product
with the same two fused multiply-adds (:func:`_distance`), so all agree on the support. General α: ``p = p̃ / l``
with ``l = Σ p̃`` (``entmax_bisect``'s ``ensure_sum_one``); the closed forms use ``p = p̃``. A row with no allowed
key stores ``m = 0, τ = +inf``: every ``p̃`` is 0.
"""

from __future__ import annotations

try:  # Transformers' remote-code check skips imports inside try: triton is needed only when a kernel runs
    import triton
    import triton.language as tl
except ImportError:  # entmax_triton.unavailable_reasons says so before anything imports this module
    raise

NEG_INF = tl.constexpr(float("-inf"))  # a global a kernel may read
LIST_CHUNK = tl.constexpr(16)  # tiles a tile list's writer tests at once
ROW_CHUNK = tl.constexpr(256)  # rows the fallback's programs scan at once for the rows marked for it

# KIND: 0 = 1.5-entmax (closed form), 1 = sparsemax (closed form), 2 = general α (bisection)


@triton.jit
def _key_limit(KLEN, b, Lk, HAS_KLEN: tl.constexpr):
    """Keys at or beyond this index are padding for batch row ``b``."""
    if HAS_KLEN:
        return tl.minimum(tl.load(KLEN + b).to(tl.int32), Lk)
    return Lk


@triton.jit
def _key_range(KLEN, b, Lk, start_m, OFF, BM: tl.constexpr, HAS_KLEN: tl.constexpr, CAUSAL: tl.constexpr):
    """``(klen, hi)`` of the query rows from ``start_m``: keys at or beyond ``klen`` are padding, and the key sweep
    stops at ``hi`` (``klen``, or the last key the block's causal rows may see)."""
    klen = _key_limit(KLEN, b, Lk, HAS_KLEN)
    hi = klen
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BM + OFF)
    return klen, hi


@triton.jit
def _whole_keys(WHOLE, b, klen, PAIR_TEST: tl.constexpr):
    """Keys below this index are allowed to every query of batch row ``b`` but for causality: ``klen``, and with an
    element mask (``PAIR_TEST == 1``) also below ``WHOLE[b]``, the keys it allows to every query (a padding mask's
    real keys up to the first padded one, :func:`hf_sparse.entmax_triton._element_mask_keys`), so that a
    padded batch's tiles are read without the mask's loads as they are with ``key_lengths``."""
    if PAIR_TEST == 1:
        return tl.minimum(klen, tl.load(WHOLE + b))
    return klen


@triton.jit
def _tile_allowed(
    BMASK, bmask_off, s_bq, s_bk, start_m, start_n, klen, OFF,
    BM: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr, CAUSAL: tl.constexpr, HAS_BMASK: tl.constexpr,
):
    """Whether the (BM x BN) tile at (start_m, start_n) can hold an allowed pair (a scalar)."""
    ok = start_n < klen
    if CAUSAL:
        ok = ok & (start_n <= start_m + BM - 1 + OFF)
    if HAS_BMASK:
        ok = ok & (tl.load(BMASK + bmask_off + (start_m // TQ) * s_bq + (start_n // TK) * s_bk) != 0)
    return ok


@triton.jit
def _scores(
    q, k, KEEP, keep_off, s_eq, s_ek, offs_m, offs_n, Lq, klen, OFF,
    ACC: tl.constexpr, PREC: tl.constexpr, CAUSAL: tl.constexpr, PAIR_TEST: tl.constexpr, MASKED: tl.constexpr,
):
    """Products ``q · k`` of one tile (``k``: its keys, loaded), not yet scaled (:func:`_distance` scales them),
    -inf where the pair is not allowed (padding, causality, the pair test). ``MASKED=False``: a tile every pair of
    which is allowed (:func:`_unmasked_tiles`), whose products are taken as they are: the tests cost two to four
    operations per score, against about ten for the rest of a sweep's work on it.

    ``PAIR_TEST``: 0, none; 1, the element mask ``keep`` at ``KEEP`` (uint8, strides ``s_eq``, ``s_ek``); from 2,
    per-token codes at ``KEEP`` (:mod:`hf_sparse.pair_codes`; ``PairCodes.pair_test`` packs the match kind, the
    number of words and the window into it), tested by :func:`_coded_pairs`."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC)
    if MASKED:
        rows = offs_m < Lq
        cols = offs_n < klen
        if PAIR_TEST >= 2:
            ok = _coded_pairs(KEEP + keep_off, s_eq, s_ek, offs_m, offs_n, rows, cols, PAIR_TEST)
        else:
            ok = rows[:, None] & cols[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + OFF)
        if PAIR_TEST == 1:
            kept = tl.load(KEEP + keep_off + offs_m[:, None] * s_eq + offs_n[None, :] * s_ek, mask=ok, other=0)
            ok = ok & (kept != 0)
        s = tl.where(ok, s, NEG_INF)
    return s


@triton.jit
def _coded_pairs(codes, s_word, s_key, offs_m, offs_n, rows, cols, PAIR_TEST: tl.constexpr):
    """The allowed pairs of a tile by per-token codes (``PAIR_TEST >= 2``, :meth:`hf_sparse.pair_codes.PairCodes.
    pair_test`), bool ``(rows, keys)``: both tokens in range (``rows``, ``cols``) and real (a position >= 0; a
    row's or a column's test, not a pair's), and their codes matching (:func:`_codes_match`). ``codes``: word 0 of
    the first query, word ``w`` of every query then every key (``s_key`` after it) ``w · s_word`` further, the
    positions after the last word."""
    q_at = codes + offs_m
    k_at = codes + s_key + offs_n
    q_pos = tl.load(q_at + (PAIR_TEST - 2) // 3 % 32 * s_word, mask=rows, other=-1)
    k_pos = tl.load(k_at + (PAIR_TEST - 2) // 3 % 32 * s_word, mask=cols, other=-1)
    rows = rows & (q_pos >= 0)
    cols = cols & (k_pos >= 0)
    hit = _codes_match(codes, s_word, s_key, offs_m, offs_n, q_pos, k_pos, rows, cols,
                       (PAIR_TEST - 2) % 3, (PAIR_TEST - 2) // 3 % 32, (PAIR_TEST - 2) // 96 - 1)
    return rows[:, None] & cols[None, :] & hit


@triton.jit
def _codes_match(codes, s_word, s_key, offs_m, offs_n, q_pos, k_pos, rows, cols,
                 MATCH: tl.constexpr, WORDS: tl.constexpr, WINDOW: tl.constexpr):
    """The pairs of a tile whose codes match (:mod:`hf_sparse.pair_codes`): some word matching (``MATCH`` 0: a
    shared set bit; 1: equal), the distance test (``MATCH`` 2: :func:`_distance_test`), or the positions at most
    ``WINDOW`` apart (-1: no window). ``codes``: the first word of the first query (the keys ``s_key`` after it),
    the next word ``s_word`` further (consecutive tokens side by side, so a thread's neighbouring columns load
    together); ``offs_m``, ``offs_n``: the tile's rows and keys; ``rows``, ``cols``: which of them to load.
    ``WORDS`` loads of a tile's rows and of its keys, and per pair about two operations a word and two for the
    window, against a ``BM x BN`` element mask."""
    if WINDOW >= 0:  # |q - k| <= W as one unsigned comparison: 0 <= q + W - k <= 2 W
        hit = ((q_pos + WINDOW)[:, None] - k_pos[None, :]).to(tl.uint32, bitcast=True) <= 2 * WINDOW
    else:
        hit = rows[:, None] & False
    if MATCH == 2:
        hit = hit | _distance_test(codes.to(tl.pointer_type(tl.float64)), s_word, s_key, offs_m, offs_n, rows, cols,
                                   WORDS // 2 - 1)
    else:
        for w in tl.static_range(WORDS):
            a = tl.load(codes + w * s_word + offs_m, mask=rows, other=0)
            c = tl.load(codes + w * s_word + s_key + offs_n, mask=cols, other=0)
            if MATCH == 0:
                hit = hit | ((a[:, None] & c[None, :]) != 0)
            else:
                hit = hit | (a[:, None] == c[None, :])
    return hit


@triton.jit
def _distance_test(codes, s_row, s_key, offs_m, offs_n, rows, cols, R: tl.constexpr):
    """``key constant + Σ_t q_t k_t >= query constant`` for each pair of the tile, as
    :func:`hf_sparse.pair_codes.distance_pairs` computes it: float32 coordinates (stored as float64), whose
    products are exact in float64, added to the key's float64 constant in coordinate order, so whether the sum is
    contracted into fused multiply-adds changes no bit. ``codes``: float64 rows of every query then every key,
    ``s_row`` apart (coordinate ``t`` in row ``t``, the constant in row ``R``)."""
    queries = codes + offs_m
    keys = codes + s_key + offs_n
    # (no `other`: what a masked lane holds does not matter, the caller leaves its rows and columns out)
    total = tl.load(keys + R * s_row, mask=cols)[None, :]
    for t in tl.static_range(R):
        a = tl.load(queries + t * s_row, mask=rows)
        c = tl.load(keys + t * s_row, mask=cols)
        total = total + a[:, None] * c[None, :]
    return total >= tl.load(queries + R * s_row, mask=rows)[:, None]


@triton.jit
def _unmasked_tiles(klen, start_m, OFF, BN: tl.constexpr, CAUSAL: tl.constexpr, PAIR_TEST: tl.constexpr):
    """Key tiles ``[0, n)`` hold only allowed pairs for every row of the block at ``start_m``: keys below ``klen``
    (:func:`_whole_keys`: no padding key, nor one an element mask keeps from some query), no key after a row's
    causal limit, no codes to test. Tile lists are in key order, so the sweeps read these tiles first, in a loop
    without the tests (:func:`_scores`), then the rest with them. An allowed pair's ``d`` (:func:`_distance`) is
    the same number in either loop: a kernel may keep one loop.

    Rows past ``Lq`` (the last block of a length that is not a multiple of ``BM``; the only block when decoding one
    token) need no test either: the output pass and dQ read their τ as +inf, so their weights are 0 and they reach
    no stored value, and the ``bound`` sweep reads them as copies of the last row (:func:`_clamped_rows`), so its
    tile maxima are those of real rows."""
    n = _whole_tiles(klen, start_m, OFF, BN, CAUSAL)
    if PAIR_TEST >= 2:
        n = 0
    return n


@triton.jit
def _whole_tiles(klen, first_row, OFF, BN: tl.constexpr, CAUSAL: tl.constexpr):
    """Key tiles ``[0, n)`` that padding and causality allow whole to every row from ``first_row`` on."""
    limit = klen
    if CAUSAL:
        limit = tl.minimum(limit, first_row + OFF + 1)  # the first row sees keys up to first_row + OFF
    return tl.maximum(limit, 0) // BN


@triton.jit
def _tile_range(n_unmasked, n_tiles, part: tl.constexpr):
    """The list entries a sweep's ``part`` reads (a ``tl.static_range(2)``): 0 its whole tiles, the first
    ``n_unmasked`` (:func:`_unmasked_tiles`), read without the mask tests; 1 the others, with them. Two loops, each
    software-pipelined, with the masking a compile-time choice in each."""
    return n_unmasked * part, n_unmasked + (n_tiles - n_unmasked) * part


@triton.jit
def _shifted(raw, m, tau, scale, am1):
    """``d = x - τ`` of a tile of products ``raw`` ``(BM, W)`` (:func:`_scores`), with row statistics ``m``,
    ``tau`` ``(BM,)``: a score is in its row's support when ``d > 0`` (:func:`_distance`)."""
    return _distance(raw, m[:, None], tau[:, None], scale, am1)


@triton.jit
def _distance(raw, m, tau, scale, am1):
    """``d = x - τ = (α-1)(s - m) - τ`` of scores ``s = raw · scale`` given by their unscaled products ``raw`` (of
    operands that broadcast together): two explicit fused multiply-adds, so that no compiler contracts them one
    way in one pass and another way in the next. Every pass takes a score's ``d`` from here (through
    :func:`_shifted`), and so do the tests on one product standing for many (a tile's largest, in the tile
    lists; the smallest of a candidate support, in :func:`_newton_step`), and the interpreter rounds an ``fma``
    once as the GPU does: all agree on which scores lie above τ, to the last bit."""
    return tl.fma(tl.fma(raw, scale, -m), am1, -tau)


@triton.jit
def _row_maximum(largest, scale):
    """The row statistic ``m`` (on the score scale) from the row's largest product ``largest``: 0 for a row with no
    allowed key (``largest = -inf``), whose τ is then +inf. (``x = (α-1)(s - m)`` of the largest score is then
    the rounding of ``largest · scale`` to ``m``, not 0: at most half a unit in ``m``'s last place.)"""
    return tl.where(largest == NEG_INF, 0.0, largest * scale)


@triton.jit
def _store_thresholds(M, TAU, FAIL, bh, Lq, offs_m, largest, m, tau, fail):
    """What every threshold pass hands on, for its block's rows: ``m`` (:func:`_row_maximum`), τ or a lower bound
    of it, and whether the fallback must solve the row (``fail``). A row with no allowed key (``largest = -inf``)
    stores τ = +inf (every p̃ is 0) and is never sent to the fallback."""
    empty = largest == NEG_INF
    row_ok = offs_m < Lq
    tl.store(M + bh * Lq + offs_m, m, mask=row_ok)
    tl.store(TAU + bh * Lq + offs_m, tl.where(empty, float("inf"), tau), mask=row_ok)
    tl.store(FAIL + bh * Lq + offs_m, (fail & ~empty).to(tl.int8), mask=row_ok)


@triton.jit
def _unnormalised(d, inv_am1, KIND: tl.constexpr):
    """p̃ = [d]₊^{1/(α-1)} for a tile ``d = x - τ`` (:func:`_shifted`)."""
    if KIND == 0:
        d = tl.maximum(d, 0.0)
        return d * d
    elif KIND == 1:
        return tl.maximum(d, 0.0)
    else:
        pos = d > 0
        return tl.where(pos, tl.exp2(tl.log2(tl.where(pos, d, 1.0)) * inv_am1), 0.0)


@triton.jit
def _gppr(d, p, two_minus_alpha, KIND: tl.constexpr):
    """g = p^{2-α} of the normalised p, from ``d = x - τ`` (1.5: sqrt(p) = [d]₊; sparsemax: the support
    indicator)."""
    if KIND == 0:
        return tl.maximum(d, 0.0)
    elif KIND == 1:
        return tl.where(d > 0, 1.0, 0.0).to(d.dtype)  # the accumulator's dtype (the literals are float32)
    else:
        pos = p > 0
        return tl.where(pos, tl.exp2(tl.log2(tl.where(pos, p, 1.0)) * two_minus_alpha), 0.0)


@triton.jit
def _load_rows(Q, q_off, s_qm, s_qd, offs_m, offs_d, Lq, D):
    return tl.load(
        Q + q_off + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
        mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D),
        other=0.0,
    )


@triton.jit
def _clamped_rows(Q, q_off, s_qm, s_qd, offs_m, offs_d, Lq, D):
    """:func:`_load_rows` with every row past ``Lq`` a copy of the last one (``Lq >= 1``: a program has a row):
    read without the mask tests (:func:`_unmasked_tiles`), their scores are some real row's, never a zero row's
    that would raise a tile maximum where every real score is negative."""
    return _load_rows(Q, q_off, s_qm, s_qd, tl.minimum(offs_m, Lq - 1), offs_d, Lq, D)


@triton.jit
def _dropout_draws(SEED, bh, query, draw, Lq, Lk):
    """Philox draw ``draw`` of (batch·head, query) from the seed the forward drew: four 32-bit words, whose 16-bit
    halves decide 8 pairs (:func:`_kept`). Philox is most of dropout's cost (10 rounds of multiplies a draw): with a
    draw per pair, a tile with dropout took 5-7 times the instructions of one without (sm_90)."""
    counter = (bh * Lq + query).to(tl.int64) * (4 * tl.cdiv(Lk, 32)) + draw
    return tl.randint4x(tl.load(SEED), counter)


@triton.jit
def _kept(SEED, bh, query, key, Lq, Lk, drop_below):
    """Which (query, key) pairs attention dropout keeps, for any pairs (``query``, ``key``: broadcastable index
    tensors, e.g. one held key per row). Key ``32 b + 8 n + 2 c + h`` of a row is kept when the 16-bit half ``h`` of
    word ``n`` of the row's draw ``4 b + c`` (:func:`_dropout_draws`) is at least ``drop_below`` (the dropout
    probability times 2^16, rounded). The forward (either output kernel) and both backward kernels draw the same
    words, so they drop the same pairs without storing a mask; kept values are then scaled by ``1/(1 - p)``.

    The order is the tensor cores' (:func:`_kept_tile`): each thread of a ``tl.dot`` result holds two adjacent
    keys of every group of 8 (``c`` fixed), in several groups, so the words it needs come from draws of its own and
    a tile's draws reach its elements without a trip through shared memory (a draw per 8 adjacent keys took one:
    1155 instructions a tile in the output pass against 829 this way, 398 without dropout; sm_90, Triton 3.9)."""
    r0, r1, r2, r3 = _dropout_draws(SEED, bh, query, (key >> 5 << 2) | (key >> 1 & 3), Lq, Lk)  # (keys >= 0)
    n = key >> 3 & 3
    word = tl.where(n == 0, r0, tl.where(n == 1, r1, tl.where(n == 2, r2, r3)))
    return ((word >> ((key & 1) << 4)) & 0xFFFF).to(tl.int32) >= drop_below


@triton.jit
def _kept_tile(SEED, bh, offs_m, start_n, Lq, Lk, drop_below, BN: tl.constexpr):
    """:func:`_kept` for the rows ``offs_m`` and the ``BN`` keys from ``start_n`` (a multiple of ``BN``), drawn once
    per 8 pairs: ``(len(offs_m), BN)``. A draw's words and their halves are laid side by side with ``tl.join`` (a
    new last axis) and put in key order."""
    BLOCKS: tl.constexpr = max(BN // 32, 1)  # of 32 keys: 16 keys are half of one
    draw = (start_n // 32 + tl.arange(0, BLOCKS))[:, None] * 4 + tl.arange(0, 4)[None, :]
    r0, r1, r2, r3 = _dropout_draws(SEED, bh, offs_m[:, None, None], draw[None, :, :], Lq, Lk)  # (rows, b, c)
    if BN >= 32:
        words = tl.join(tl.join(_halves(r0), _halves(r2)), tl.join(_halves(r1), _halves(r3)))  # word 2i + j at (i, j)
        keys = tl.permute(words, (0, 1, 4, 5, 2, 3))  # (rows, b, c, h, i, j) -> (rows, b, i, j, c, h)
    else:  # the two words of the block's half this tile holds
        upper = start_n % 32 != 0
        words = tl.join(_halves(tl.where(upper, r2, r0)), _halves(tl.where(upper, r3, r1)))
        keys = tl.permute(words, (0, 1, 4, 2, 3))  # (rows, 1, c, h, n) -> (rows, 1, n, c, h)
    return tl.reshape(keys, (offs_m.shape[0], BN)) >= drop_below


@triton.jit
def _drop_factor(kept, drop_scale, dtype: tl.constexpr):
    """What dropout multiplies a tile by: ``1/(1 - p)`` where ``kept``, else 0 (a product: ``tl.where(kept, x *
    drop_scale, 0)`` compiled to more instructions), in ``dtype`` (float64 tiles: the scale unrounded)."""
    return tl.where(kept, tl.full(kept.shape, drop_scale, dtype), 0.0)


@triton.jit
def _halves(word):
    """A 32-bit word's two 16-bit halves, side by side on a new last axis."""
    return tl.join((word & 0xFFFF).to(tl.int32), (word >> 16).to(tl.int32))


# --------------------------------------------------------------------------------------------------------------
# Pass 1: each row's threshold from its top-KC candidates, with the certificate
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _first_sweep_tiles(BMASK, ALLOWED, b, h, start_m, hi, unmasked, s_mb, s_mh, s_bq, s_bk, n_kb,
                       BN: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr, HAS_BMASK: tl.constexpr):
    """How many key tiles the threshold pass (``topk`` or ``bound``) sweeps for a block of query rows, and how many
    of the first of them need no masking (those below ``unmasked``, :func:`_unmasked_tiles`): every tile of ``[0,
    hi)`` without a block mask; with one, the allowed tiles, whose list is written to ``ALLOWED`` here first
    (:func:`_write_allowed_list`). No tile test inside the sweep's loop: a branch there keeps Triton from
    prefetching the next tile's keys."""
    n_tiles = tl.cdiv(hi, BN)
    n_unmasked = tl.minimum(unmasked, n_tiles)
    if HAS_BMASK:
        n_tiles, n_unmasked = _write_allowed_list(BMASK, ALLOWED, b, h, start_m, hi, unmasked, s_mb, s_mh, s_bq,
                                                  s_bk, n_kb, BN, TQ, TK)
        tl.debug_barrier()  # the list's entries, written by other threads of the block, are read back in the sweep
    return n_tiles, n_unmasked


@triton.jit
def _first_sweep_tile(ALLOWED, i, BN: tl.constexpr, HAS_BMASK: tl.constexpr):
    """The first key of the threshold pass's ``i``-th tile (:func:`_first_sweep_tiles`)."""
    start_n = i * BN
    if HAS_BMASK:  # (a compile-time branch)
        start_n = tl.load(ALLOWED + i) * BN
    return start_n


@triton.jit
def threshold_kernel(
    Q, K, KLEN, BMASK, KEEP, WHOLE, M, TAU, FAIL, TILEMAX, ALLOWED,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_mb, s_mh, s_bq, s_bk, s_eb, s_eh, s_eq, s_ek,
    H, Lq, Lk, D, OFF, n_qb, n_kb, scale, am1, inv_am1, bracket,
    ACC: tl.constexpr, PREC: tl.constexpr, KIND: tl.constexpr, N_ITER: tl.constexpr, SORT_ABOVE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KC: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, HAS_BMASK: tl.constexpr, PAIR_TEST: tl.constexpr,
):
    """Top-KC scores per row, tile by tile (a tile with more than ``SORT_ABOVE`` newcomers in some row is merged by
    sorting, else its newcomers are inserted one round each: :func:`_threshold_tile`), and the largest score left out
    (``rest``); then the closed form / bisection on the candidates and the certificate ``(α-1)(rest - m) <= τ``.
    Also writes each tile's largest allowed score (what the later passes' tile lists come from)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BM
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    q = _load_rows(Q, b * s_qb + h * s_qh, s_qm, s_qd, offs_m, offs_d, Lq, D)
    klen, hi = _key_range(KLEN, b, Lk, start_m, OFF, BM, HAS_KLEN, CAUSAL)
    buf = tl.full((BM, KC), NEG_INF, ACC)  # the row's KC largest scores so far, in no order
    kth = tl.full((BM,), NEG_INF, ACC)  # the smallest of them
    rest = tl.full((BM,), NEG_INF, ACC)  # the largest score not among them
    cols = tl.arange(0, BN)
    slots = tl.arange(0, KC)
    tiles = TILEMAX + (bh * n_qb + pid_m) * n_kb
    keys = K + b * s_kb + h * s_kh
    keep = KEEP + b * s_eb + h * s_eh
    allowed = ALLOWED + (bh * n_qb + pid_m) * n_kb
    n_tiles, _ = _first_sweep_tiles(BMASK, allowed, b, h, start_m, hi, 0, s_mb, s_mh, s_bq, s_bk, n_kb, BN, TQ,
                                    TK, HAS_BMASK)
    for i in range(0, n_tiles):
        start_n = _first_sweep_tile(allowed, i, BN, HAS_BMASK)
        buf, kth, rest = _threshold_tile(q, keys, keep, tiles, start_n, offs_m, offs_d, cols, slots, buf, kth, rest,
                                         s_kn, s_kd, s_eq, s_ek, Lq, klen, D, OFF, ACC, PREC, SORT_ABOVE,
                                         BM, BN, KC, CAUSAL, PAIR_TEST)
    largest = tl.max(buf, 1)
    m = _row_maximum(largest, scale)
    lower, tau = _candidates_tau(buf, m, scale, am1, inv_am1, bracket, ACC, KIND, N_ITER, KC, False)
    certified = _distance(rest, m, lower, scale, am1) <= 0  # the largest product left out, below τ
    _store_thresholds(M, TAU, FAIL, bh, Lq, offs_m, largest, m, tau, ~certified)


@triton.jit
def _threshold_tile(q, keys, keep, tiles, start_n, offs_m, offs_d, cols, slots, buf, kth, rest,
                    s_kn, s_kd, s_eq, s_ek, Lq, klen, D, OFF, ACC: tl.constexpr, PREC: tl.constexpr,
                    SORT_ABOVE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, KC: tl.constexpr,
                    CAUSAL: tl.constexpr, PAIR_TEST: tl.constexpr):
    """One key tile of :func:`threshold_kernel`: its scores merged into each row's candidates ``buf`` (their
    smallest ``kth``, the largest score left out ``rest``), and its largest allowed score stored at ``tiles``.

    The newcomers of a tile with at most ``SORT_ABOVE`` of them in every row are inserted in ``SORT_ABOVE``
    unrolled rounds, each skipped once no row has one left: a ``while`` loop here would keep Triton from
    software-pipelining the key sweep (prefetching the next tile's keys while this one is merged)."""
    offs_n = start_n + cols
    k = _load_rows(keys, 0, s_kn, s_kd, offs_n, offs_d, klen, D)
    left = _scores(q, k, keep, 0, s_eq, s_ek, offs_m, offs_n, Lq, klen, OFF, ACC, PREC, CAUSAL, PAIR_TEST,
                   True)
    best = tl.max(left, 1)
    tl.store(tiles + start_n // BN, tl.max(best, 0))
    newcomers = tl.max(tl.sum((left > kth[:, None]).to(tl.int32), 1), 0)
    if newcomers > SORT_ABOVE:
        # many (the first tiles): merge sorted runs. The tile's top KC, ascending, against the candidates,
        # descending: their elementwise max is the top KC of the union (a bitonic merge step), the min
        # holds the ones pushed out.
        ascending = tl.sort(left, 1)
        top = tl.max(tl.reshape(ascending, (BM, BN // KC, KC)), 1)  # the last KC (chunks ascend)
        below = tl.max(tl.where(cols[None, :] < BN - KC, ascending, NEG_INF), 1)
        descending = tl.sort(buf, 1, descending=True)
        rest = tl.maximum(rest, tl.maximum(below, tl.max(tl.minimum(descending, top), 1)))
        buf = tl.maximum(descending, top)
        kth = tl.min(buf, 1)
    else:
        # few: insert them largest first, each replacing the current smallest candidate; a row has at most
        # `newcomers` scores above its `kth`, so that many rounds insert them all
        for r in tl.static_range(SORT_ABOVE):
            if newcomers > r:
                take = best > kth
                rest = tl.where(take, tl.maximum(rest, kth), rest)  # the evicted candidate
                out = (slots[None, :] == tl.argmin(buf, 1)[:, None]) & take[:, None]
                buf = tl.where(out, best[:, None], buf)
                used = (cols[None, :] == tl.argmax(left, 1)[:, None]) & take[:, None]
                left = tl.where(used, NEG_INF, left)
                kth = tl.min(buf, 1)
                best = tl.max(left, 1)
        rest = tl.maximum(rest, best)  # the tile's scores left out
    return buf, kth, rest


# --------------------------------------------------------------------------------------------------------------
# Pass 1, bound variant: a lower bound of every row's τ from its largest score per key column, then the fallback
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def bound_kernel(
    Q, K, KLEN, BMASK, KEEP, WHOLE, M, TAU, FAIL, TILEMAX, ALLOWED,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_mb, s_mh, s_bq, s_bk, s_eb, s_eh, s_eq, s_ek,
    H, Lq, Lk, D, OFF, n_qb, n_kb, scale, am1, inv_am1, bracket, slack,
    ACC: tl.constexpr, PREC: tl.constexpr, KIND: tl.constexpr, N_ITER: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, HAS_BMASK: tl.constexpr, PAIR_TEST: tl.constexpr,
):
    """One sweep, one per-row reduction per tile: each row keeps, per key column ``c`` of the tiles (keys ``c``,
    ``c + BN``, ...), its two largest scores there, two elementwise maxima. Those ``2·BN`` scores are some of the
    row's, and the τ of any subset of a row's scores is at most the row's: their τ (:func:`_candidates_tau`),
    lowered by ``slack`` (rounding), is a lower bound from which the fallback's Newton steps find every row's τ
    exactly. (One score per column left the bound looser: about 3 Newton sweeps per 64-row block at L = 8192 on
    the GPU benchmark's inputs, against 2 with two, counted on a CPU.)
    Each row also keeps the largest score it let go of (``dropped``): every score not among the ``2·BN`` is at
    most that, so when it lies below their τ, no other score enters the support and their τ is the row's, exactly
    (the ``topk`` pass's certificate). Only the rows that fail it go to the fallback: 58 % of the rows pass at L =
    8192 on those inputs (``scripts/simulate_threshold_passes.py``). Also writes each tile's largest allowed score,
    as the other passes do (one block-wide reduction per tile, where the ``topk`` pass merges or inserts)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BM
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    q = _clamped_rows(Q, b * s_qb + h * s_qh, s_qm, s_qd, offs_m, offs_d, Lq, D)
    klen, hi = _key_range(KLEN, b, Lk, start_m, OFF, BM, HAS_KLEN, CAUSAL)
    first = tl.full((BM, BN), NEG_INF, ACC)  # each row's largest score per key column so far
    second = tl.full((BM, BN), NEG_INF, ACC)  # and the next
    dropped = tl.full((BM,), NEG_INF, ACC)  # the largest score of the row among neither
    cols = tl.arange(0, BN)
    tiles = TILEMAX + (bh * n_qb + pid_m) * n_kb
    keys = K + b * s_kb + h * s_kh
    keep = KEEP + b * s_eb + h * s_eh
    allowed = ALLOWED + (bh * n_qb + pid_m) * n_kb
    unmasked = _unmasked_tiles(_whole_keys(WHOLE, b, klen, PAIR_TEST), start_m, OFF, BN, CAUSAL, PAIR_TEST)
    n_tiles, n_unmasked = _first_sweep_tiles(BMASK, allowed, b, h, start_m, hi, unmasked, s_mb, s_mh, s_bq, s_bk,
                                             n_kb, BN, TQ, TK, HAS_BMASK)
    for part in tl.static_range(2):
        begin, end = _tile_range(n_unmasked, n_tiles, part)
        for i in range(begin, end):
            first, second, dropped = _bound_tile(q, keys, keep, tiles, _first_sweep_tile(allowed, i, BN, HAS_BMASK),
                                                 first, second, dropped, offs_m, offs_d, cols, s_kn, s_kd, s_eq, s_ek,
                                                 Lq, klen, D, OFF, ACC, PREC, BN, CAUSAL, PAIR_TEST, part == 1)
    largest = tl.max(first, 1)
    m = _row_maximum(largest, scale)
    columns = tl.reshape(tl.join(first, second), (BM, 2 * BN))
    if KIND != 2:  # the closed forms' cumulative sums, in rank order (one sort per block)
        columns = tl.sort(columns, 1, descending=True)
    lower, tau = _candidates_tau(columns, m, scale, am1, inv_am1, bracket, ACC, KIND, N_ITER, 2 * BN, KIND != 2)
    certified = _distance(dropped, m, lower, scale, am1) <= 0  # every score let go of lies below τ
    start = lower - slack * tl.maximum(tl.abs(lower), 1.0)  # the fallback's, from below
    _store_thresholds(M, TAU, FAIL, bh, Lq, offs_m, largest, m, tl.where(certified, tau, start), ~certified)


@triton.jit
def _bound_tile(q, keys, keep, tiles, start_n, first, second, dropped, offs_m, offs_d, cols, s_kn, s_kd, s_eq, s_ek,
                Lq, klen, D, OFF, ACC: tl.constexpr, PREC: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
                PAIR_TEST: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of :func:`bound_kernel`: its products into each row's two largest per column, the one that
    leaves them (the smallest of the three, ``min(second, s)``) into the row's largest let go of, and the tile's
    largest allowed product stored at ``tiles``."""
    offs_n = start_n + cols
    k = _load_rows(keys, 0, s_kn, s_kd, offs_n, offs_d, klen, D)
    s = _scores(q, k, keep, 0, s_eq, s_ek, offs_m, offs_n, Lq, klen, OFF, ACC, PREC, CAUSAL, PAIR_TEST,
                MASKED)
    tl.store(tiles + start_n // BN, tl.max(tl.max(s, 1), 0))
    dropped = tl.maximum(dropped, tl.max(tl.minimum(second, s), 1))
    second = tl.maximum(second, tl.minimum(first, s))
    first = tl.maximum(first, s)
    return first, second, dropped


# --------------------------------------------------------------------------------------------------------------
# Pass 1, streaming variant: every score above a rising lower bound of τ kept, the bound raised when slots run out
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def stream_kernel(
    Q, K, KLEN, BMASK, KEEP, WHOLE, M, TAU, FAIL, TILEMAX, SCRATCH, KEYS, COUNT,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_mb, s_mh, s_bq, s_bk, s_eb, s_eh, s_eq, s_ek,
    H, Lq, Lk, D, OFF, n_qb, n_kb, scale, am1, inv_am1, bracket, slack, tol,
    ACC: tl.constexpr, PREC: tl.constexpr, KIND: tl.constexpr, STEPS: tl.constexpr, SOLVE_STEPS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, CAP: tl.constexpr, CHUNK: tl.constexpr,
    TQ: tl.constexpr, TK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, HAS_BMASK: tl.constexpr, PAIR_TEST: tl.constexpr,
):
    """One sweep, no sort: each row appends every score above ``theta`` to its ``CAP`` slots of ``SCRATCH``, and its
    key's index to ``KEYS`` (ranks by a cumulative sum). ``theta`` is a lower bound of the row's threshold on the
    score scale (``m + τ/(α-1)``, so it does not move with ``m``): the τ of any subset of the row's scores is at
    most the row's, so a score at or below it is outside the support for good. When a tile would overflow some row's
    slots, every row of the block raises ``theta`` to the τ of what it holds (:func:`_held_tau` from the old bound,
    ``STEPS`` Newton steps or halvings) and keeps only the scores above it: the support seen so far and a few near
    it. At the end the slots hold the row's support, whose τ :func:`_held_tau` finds exactly (``SOLVE_STEPS``:
    Newton's limit, or the halvings of ``entmax_bisect``); a row whose support outgrows the slots, or whose check
    does not close, keeps a lower bound and is marked for the fallback. Then each solved row keeps only its
    support, which :func:`gather_kernel` reads (``COUNT``: its size), and each tile's largest allowed score is
    written.

    The held scores are read ``CHUNK`` slots at a time (all 128 of a row at once took 2.3 KB of spills per thread
    on sm_90), and addressed by int32 offsets from the block's first slot (64-bit pointers per score, more)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BM
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    row_ok = offs_m < Lq
    q = _load_rows(Q, b * s_qb + h * s_qh, s_qm, s_qd, offs_m, offs_d, Lq, D)
    klen, hi = _key_range(KLEN, b, Lk, start_m, OFF, BM, HAS_KLEN, CAUSAL)
    cols = tl.arange(0, BN)
    block = SCRATCH + (bh * Lq + start_m).to(tl.int64) * CAP  # this block's slots, then int32 offsets from here
    keys = KEYS + (bh * Lq + start_m).to(tl.int64) * CAP
    first = tl.arange(0, BM)[:, None] * CAP  # each row's first slot
    count = tl.zeros((BM,), tl.int32)  # scores held
    largest = tl.full((BM,), NEG_INF, ACC)  # the largest product so far (always held: it is above every bound)
    theta = tl.full((BM,), NEG_INF, ACC)  # on the products' scale
    lost = tl.zeros((BM,), tl.int32)  # 1: the support outgrew the slots (the fallback solves the row)
    for start_n in range(0, hi, BN):
        if _tile_allowed(BMASK, b * s_mb + h * s_mh, s_bq, s_bk, start_m, start_n, klen, OFF, BM, TQ, TK, CAUSAL,
                         HAS_BMASK):
            offs_n = start_n + cols
            k = _load_rows(K, b * s_kb + h * s_kh, s_kn, s_kd, offs_n, offs_d, klen, D)
            s = _scores(q, k, KEEP, b * s_eb + h * s_eh, s_eq, s_ek, offs_m, offs_n, Lq, klen, OFF, ACC, PREC,
                        CAUSAL, PAIR_TEST, True)
            best = tl.max(s, 1)
            tl.store(TILEMAX + (bh * n_qb + pid_m) * n_kb + start_n // BN, tl.max(best, 0))
            take = s > theta[:, None]
            new = tl.sum(take.to(tl.int32), 1)
            # one reduction over the block decides both: BN + 1 when some row's slots would overflow
            todo = tl.max(tl.where((count + new > CAP) & (lost == 0), BN + 1, new), 0)
            if todo > 0:
                if todo > BN:
                    # the scores appended so far, by other threads of this program, are read next
                    tl.debug_barrier()
                    seen = largest > NEG_INF
                    m_held = _row_maximum(largest, scale)
                    # x = 0 (the largest) has Σ p̃ >= 1 at -1
                    start = tl.maximum((theta * scale - m_held) * am1, -1.0)
                    lower, _, _ = _held_tau(block, first, tl.minimum(count, CAP), m_held, start, scale, am1,
                                            inv_am1, bracket, tol, ACC, KIND, STEPS, CHUNK)
                    lower = lower - slack * tl.maximum(tl.abs(lower), 1.0)
                    theta = tl.where(seen, (m_held + lower / am1) / scale, theta)
                    count = _keep_above(block, keys, first, tl.minimum(count, CAP), m_held, lower, scale, am1,
                                        CHUNK)
                    take = s > theta[:, None]
                    new = tl.sum(take.to(tl.int32), 1)
                    lost = tl.where(count + new > CAP, 1, lost)
                at = count[:, None] + tl.cumsum(take.to(tl.int32), 1) - 1
                into = take & (at < CAP) & (lost == 0)[:, None]
                tl.store(block + (first + at), s, mask=into)
                tl.store(keys + (first + at), offs_n[None, :] + tl.zeros((BM, BN), tl.int32), mask=into)
                # a lost row stores nothing more, so its count stays what its slots hold: a later raising of the
                # bounds reads them (the τ of a subset of the row's scores, still a lower bound of its τ), and
                # counting past them would read slots never written
                count += tl.where(lost == 0, new, 0)
            largest = tl.maximum(largest, best)
    tl.debug_barrier()  # the appended scores, written by other threads of this program, are read below
    m = _row_maximum(largest, scale)
    start = tl.maximum((theta * scale - m) * am1, -1.0)
    _, tau, solved = _held_tau(block, first, tl.minimum(count, CAP), m, start, scale, am1, inv_am1, bracket, tol,
                               ACC, KIND, SOLVE_STEPS, CHUNK)
    fail = (lost != 0) | ~solved
    # what gather_kernel reads: the support alone (p > 0: the same test as its own), not the scores held above
    # the last bound; a failed row's slots are not read
    count = _keep_above(block, keys, first, tl.minimum(count, CAP), m, tau, scale, am1, CHUNK)
    bound = tl.where(lost != 0, start, tau - slack * tl.maximum(tl.abs(tau), 1.0))
    _store_thresholds(M, TAU, FAIL, bh, Lq, offs_m, largest, m, tl.where(fail, bound, tau), fail)
    tl.store(COUNT + bh * Lq + offs_m, count, mask=row_ok)


@triton.jit
def _keep_above(block, keys, first, count, m, tau, scale, am1, CHUNK: tl.constexpr):
    """Keep, in place, each row's held scores (and their keys) with ``x = (α-1)(s - m) > τ``; returns how many
    each row keeps. A kept score moves only to a lower slot, so the chunks are rewritten in order, each after
    every thread has read it; only the chunks some row of the block uses are visited."""
    chunk = tl.arange(0, CHUNK)
    kept_count = tl.zeros(count.shape, tl.int32)
    for c0 in range(0, tl.max(count, 0), CHUNK):
        slot = first + c0 + chunk[None, :]
        in_use = (c0 + chunk)[None, :] < count[:, None]
        held = tl.load(block + slot, mask=in_use, other=NEG_INF)
        key = tl.load(keys + slot, mask=in_use, other=0)
        tl.debug_barrier()  # every thread has read this chunk (and what came before) before any slot is rewritten
        kept = _shifted(held, m, tau, scale, am1) > 0
        to = first + kept_count[:, None] + tl.cumsum(kept.to(tl.int32), 1) - 1
        tl.store(block + to, held, mask=kept)
        tl.store(keys + to, key, mask=kept)
        kept_count += tl.sum(kept.to(tl.int32), 1)
    return kept_count


@triton.jit
def _held_sums(block, first, count, m, tau, scale, am1, inv_am1, ACC: tl.constexpr, KIND: tl.constexpr,
               CHUNK: tl.constexpr):
    """:func:`_add_sums` over each row's ``count`` held scores (from ``block + first``)."""
    chunk = tl.arange(0, CHUNK)
    f, slope, n, smallest = _no_sums(m, ACC)
    for c0 in range(0, tl.max(count, 0), CHUNK):  # the chunks some row of the block uses
        held = tl.load(block + (first + c0 + chunk[None, :]), mask=(c0 + chunk)[None, :] < count[:, None],
                       other=NEG_INF)
        f, slope, n, smallest = _add_sums(held, _shifted(held, m, tau, scale, am1), f, slope, n, smallest,
                                          inv_am1, ACC, KIND)
    return f, slope, n, smallest


@triton.jit
def _no_sums(m, ACC: tl.constexpr):
    """The sums of :func:`_add_sums` over no score, one per row of ``m``: ``f``, ``-f'``, ``|S|`` and S's smallest."""
    return tl.zeros(m.shape, ACC), tl.zeros(m.shape, ACC), tl.zeros(m.shape, ACC), tl.full(m.shape, float("inf"), ACC)


@triton.jit
def _add_sums(raw, d, f, slope, n, smallest, inv_am1, ACC: tl.constexpr, KIND: tl.constexpr):
    """Adds a tile of products ``raw`` ``(BM, W)`` (-inf: no score), with their ``d = x - τ`` (:func:`_shifted`), to
    each row's Newton sums at τ: ``f = Σ p̃(τ)`` and ``-f'(τ)``, and for the closed forms (1.5-entmax, sparsemax)
    the size of ``S = {d > 0}`` and its smallest product. Over S, 1.5-entmax's ``f = Σ d²`` and ``-f' = 2 Σ d``,
    sparsemax's ``f = Σ d`` and ``-f' = |S|``: the sums the closed form on S takes (:func:`_closed_form`), so four
    reductions per tile (three for sparsemax), not Σ x and Σ x² besides. The smallest product, not its ``d``:
    :func:`_newton_step` puts it through the operations every pass applies to a product. The fallback adds tiles of
    recomputed scores, the streaming pass chunks of held ones."""
    pos = d > 0
    if KIND != 2:
        smallest = tl.minimum(smallest, tl.min(tl.where(pos, raw, float("inf")), 1))
    if KIND == 0:
        d = tl.maximum(d, 0.0)
        f += tl.sum(d * d, 1)
        slope += 2 * tl.sum(d, 1)
        n += tl.sum(pos.to(ACC), 1)
    elif KIND == 1:
        f += tl.sum(tl.maximum(d, 0.0), 1)
        size = tl.sum(pos.to(ACC), 1)
        slope += size
        n += size
    else:
        power = _unnormalised(d, inv_am1, KIND)
        f += tl.sum(power, 1)
        slope += tl.sum(tl.where(pos, power / tl.where(pos, d, 1.0), 0.0), 1) * inv_am1
    return f, slope, n, smallest


@triton.jit
def _newton_step(f, slope, n, smallest, m, tau, active, solved, scale, am1, tol, KIND: tl.constexpr):
    """One step towards each active row's τ from its sums at ``tau`` (:func:`_add_sums`; ``m``: the row's
    statistic of :func:`_row_maximum`; ``smallest``: the smallest product in S); returns ``(tau, active,
    solved)``. Closed forms first: ``S = {x > τ}`` holds the support (τ <= the row's), and τ_S, the closed form on
    S, is the row's τ exactly when S's smallest score lies above it (its ``d`` at τ_S, by :func:`_distance`, is
    positive: the output pass keeps it); such a row is solved and stops. Then Newton on ``Σ p̃ = 1``; a row whose
    step falls below ``tol`` stops unsolved."""
    if KIND != 2:
        closed = _closed_form(f, slope, n, tau, KIND)
        exact = active & (_distance(smallest, m, closed, scale, am1) > 0)
        tau = tl.where(exact, closed, tau)
        solved = solved | exact
        active = active & ~exact
    step = tl.where(active & (slope > 0), (f - 1) / tl.where(slope > 0, slope, 1.0), 0.0)
    tau = tau + step
    active = active & (tl.abs(step) > tol * tl.maximum(tl.abs(tau), 1.0))
    return tau, active, solved


@triton.jit
def _held_tau(block, first, count, m, tau, scale, am1, inv_am1, bracket, tol, ACC: tl.constexpr, KIND: tl.constexpr,
              STEPS: tl.constexpr, CHUNK: tl.constexpr):
    """τ (x scale) of a row's held scores from a lower bound ``tau``. Returns ``(lower, tau, solved)``.
    1.5-entmax and sparsemax: Newton steps (at most ``STEPS``), each after the closed form on ``S = {x > τ}``,
    which is exact, and solves the row, once ``S``'s smallest score lies above it; an unsolved row (out of steps,
    or its steps below ``tol`` without the check closing: a score tied with τ) keeps a Newton iterate, a lower
    bound (``f`` is convex, so from the left the steps stay left), as both ``lower`` and ``tau``. General α:
    ``entmax_bisect``'s bisection (``STEPS`` halvings of ``[-1, -bracket]``, as :func:`_candidates_tau`):
    ``lower`` its bracket's lower end, ``tau`` the last midpoint, always solved."""
    if KIND == 2:
        lower = tl.zeros_like(m) - 1.0
        dm = tl.zeros_like(m) + (1.0 - bracket)
        mid = lower
        for _ in range(STEPS):
            dm = dm / 2
            mid = lower + dm
            total, _, _, _ = _held_sums(block, first, count, m, mid, scale, am1, inv_am1, ACC, KIND, CHUNK)
            lower = tl.where(total >= 1, mid, lower)
        return lower, mid, mid == mid
    solved = tau != tau  # all False
    active = ~solved
    steps = 0
    while (tl.max(active.to(tl.int32), 0) > 0) & (steps < STEPS):
        f, slope, n, smallest = _held_sums(block, first, count, m, tau, scale, am1, inv_am1, ACC, KIND, CHUNK)
        tau, active, solved = _newton_step(f, slope, n, smallest, m, tau, active, solved, scale, am1, tol, KIND)
        steps += 1
    return tau, tau, solved


@triton.jit
def _candidates_tau(buf, m, scale, am1, inv_am1, bracket, ACC: tl.constexpr, KIND: tl.constexpr, N_ITER: tl.constexpr,
                    KC: tl.constexpr, SORTED: tl.constexpr):
    """τ (on the x scale) of each row's candidate scores ``buf`` ``(BM, KC)`` (-inf: no candidate; ``m``: the
    row's largest score, 0 for a row without any; ``SORTED``: each row descending). Returns ``(lower, tau)``: the
    closed forms of ``entmax.entmax15`` / ``entmax.sparsemax`` by rank (:func:`_ranked_sums`), where both are τ;
    for general α
    ``entmax_bisect``'s bisection with the bracket of a KC-element problem, where ``lower`` is the bracket's lower
    end (``Σ p̃(lower) >= 1``: a lower bound of the candidates' τ) and ``tau`` its midpoint."""
    valid = buf > NEG_INF
    if KIND == 0:
        z = tl.where(valid, tl.fma(buf, scale, -m[:, None]) / 2, 0.0)
        rho, zsum, zsq = _ranked_sums(buf, z, ACC, KC, True, SORTED)
        mean = zsum / rho
        mean_sq = zsq / rho
        ss = rho * (mean_sq - mean * mean)
        delta = (1 - ss) / rho
        tau_rho = mean - tl.sqrt(tl.maximum(delta, 0.0))
        size = tl.sum(((tau_rho <= z) & valid).to(ACC), 1)
        tau = tl.sum(tl.where(rho == size[:, None], tau_rho, 0.0), 1)
        lower = tau
    elif KIND == 1:
        z = tl.where(valid, tl.fma(buf, scale, -m[:, None]), 0.0)
        rho, cs, _ = _ranked_sums(buf, z, ACC, KC, False, SORTED)
        cs = cs - 1
        size = tl.sum(((rho * z > cs) & valid).to(ACC), 1)
        tau = tl.sum(tl.where(rho == size[:, None], cs, 0.0), 1) / tl.maximum(size, 1.0)
        lower = tau
    else:
        lower = tl.zeros_like(m) - 1.0
        dm = tl.zeros_like(m) + (1.0 - bracket)  # bracket = (1/KC)^(α-1): at most KC positive entries
        tau = lower
        for _ in range(N_ITER):
            dm = dm / 2
            tau = lower + dm
            total = tl.sum(_unnormalised(_shifted(buf, m, tau, scale, am1), inv_am1, KIND), 1)  # -inf: d -inf
            lower = tl.where(total >= 1, tau, lower)
    return lower, tau


@triton.jit
def _ranked_sums(buf, z, ACC: tl.constexpr, KC: tl.constexpr, SQUARES: tl.constexpr, SORTED: tl.constexpr):
    """For each candidate ``i`` of each row (``buf`` ``(BM, KC)``, descending rank with ties by slot): its rank
    ``ρ_i`` (1 = largest) and the sums of ``z`` (and ``z²`` if ``SQUARES``) over the candidates ranked at or above
    it: the closed forms' cumulative sums. Rows already sorted (``SORTED``, descending): the slot is the rank, and
    the sums are cumulative sums. Otherwise without a sort: one candidate ``j`` against all at a time, in a loop
    that is not unrolled. All pairs at once, as a ``(BM, KC, KC)`` comparison, the registers ran out: 255 per
    thread and 2 KB spilled in the threshold pass (``KC = 32``; 128 and none this way), and LLVM worked for minutes
    on the collect pass (``KC = 64``); ``scripts/kernel_resources.py`` reports both."""
    slots = tl.arange(0, KC)
    rho = tl.zeros(buf.shape, ACC)
    zsum = tl.zeros(buf.shape, ACC)
    zsq = tl.zeros(buf.shape, ACC)
    if SORTED:
        rho += (slots + 1).to(ACC)[None, :]
        zsum = tl.cumsum(z, 1)
        if SQUARES:
            zsq = tl.cumsum(z * z, 1)
    else:
        for j in range(KC):
            other = tl.max(tl.where(slots[None, :] == j, buf, NEG_INF), 1)  # candidate j of each row
            other_z = tl.sum(tl.where(slots[None, :] == j, z, 0.0), 1)
            ahead = (other[:, None] > buf) | ((other[:, None] == buf) & (j <= slots[None, :]))
            rho += ahead.to(ACC)
            zsum += tl.where(ahead, other_z[:, None], 0.0)
            if SQUARES:
                zsq += tl.where(ahead, (other_z * other_z)[:, None], 0.0)
    return rho, zsum, zsq


@triton.jit
def _row_tile_maxima(TILEMAX, bh, offs_m, Lq, n_qb, n_kb, BM: tl.constexpr):
    """Where each of the rows ``offs_m`` (gathered from several query blocks, :func:`_marked_rows`) finds its own
    block's tile maxima: ``(BM,)`` pointers to their rows of ``TILEMAX`` (a slot past the last row: the last
    block's)."""
    return TILEMAX + (bh * n_qb + tl.minimum(offs_m, Lq - 1) // BM) * n_kb


@triton.jit
def _marked_rows(FAIL, ROWS, bh, pid_m, Lq, n_qb, LEVEL: tl.constexpr, BM: tl.constexpr):
    """The rows program ``pid_m`` of the fallback solves: the ``pid_m``-th ``BM`` of the rows marked ``LEVEL`` or more
    in ``FAIL``, in order, from whichever query blocks hold them. Per block, a block with one marked row swept all
    its keys for it, and its other rows waited; gathered, every program but the last holds ``BM`` marked rows, and
    the rest return at once. (The ``bound`` pass marks 42 % of the rows at L = 8192 on the GPU benchmark's
    inputs, spread over every block; ``scripts/simulate_threshold_passes.py``.) Returns ``(rows, count)``, ``Lq``
    in each slot past the last marked row: the program writes its rows to its ``BM`` slots at ``ROWS`` while it
    scans the flags (a chunk at a time, ranks by a cumulative sum, stopping once its rows are found) and reads them
    back after a barrier, as the tile lists are."""
    chunk = tl.arange(0, ROW_CHUNK)
    first = pid_m * BM
    slots = ROWS + (bh * n_qb + pid_m) * BM
    before = 0  # marked rows in the chunks scanned
    start = 0
    while (start < Lq) & (before < first + BM):
        rows = start + chunk
        marked = (tl.load(FAIL + bh * Lq + rows, mask=rows < Lq, other=0) >= LEVEL).to(tl.int32)
        rank = before + tl.cumsum(marked, 0) - 1 - first  # the row's place among this program's
        tl.store(slots + rank, rows, mask=(marked != 0) & (rank >= 0) & (rank < BM))
        before += tl.sum(marked, 0)
        start += ROW_CHUNK
    count = tl.minimum(tl.maximum(before - first, 0), BM)
    tl.debug_barrier()  # the slots, written by other threads of the block, are read back
    slot = tl.arange(0, BM)
    return tl.load(slots + slot, mask=slot < count, other=Lq), count


@triton.jit
def fallback_kernel(
    Q, K, KLEN, BMASK, KEEP, WHOLE, M, TAU, FAIL, TILEMAX, TILES, ROWS,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_mb, s_mh, s_bq, s_bk, s_eb, s_eh, s_eq, s_ek,
    H, Lq, Lk, D, OFF, n_qb, n_kb, scale, am1, inv_am1, bracket, tol, slack,
    ACC: tl.constexpr, PREC: tl.constexpr, KIND: tl.constexpr, N_ITER: tl.constexpr, BISECT: tl.constexpr,
    LEVEL: tl.constexpr, MARK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, HAS_BMASK: tl.constexpr, PAIR_TEST: tl.constexpr,
):
    """Rows whose support outgrew the candidates: solve ``f(τ) = Σ_j [x_j - τ]₊^{1/(α-1)} = 1`` over all their
    keys, a pass over the key tiles per step. Program ``i`` solves the ``i``-th ``BM`` of the rows marked ``LEVEL``
    or more in ``FAIL``, gathered from every query block (:func:`_marked_rows`); the programs past the last one
    return at once. The closed forms (1.5-entmax, sparsemax) run in two launches: the first (``MARK``) takes one
    step for every marked row, which solves most, and marks the rows it leaves unsolved ``LEVEL + 1``, with their
    step's τ (still a lower bound); the second gathers only those. In one launch, a program of 64 rows with one
    that needs a second step sweeps all its keys again for it, and nearly every program holds one: on the GPU
    benchmark's inputs at L = 8192 the ``bound`` pass's marked rows cost 1.00 sweeps per 64-row block of the input
    in one launch, 0.56 in two (``scripts/simulate_threshold_passes.py``). General α takes several steps in every
    row: one launch.

    α <= 2: Newton's method from the candidates' threshold, which is a lower bound of the row's (more scores only
    raise it). ``f`` is convex and decreasing there, so from the left every step stays left of the root and the
    steps shrink monotonically (sparsemax: Michelot's algorithm, finite); at most ``N_ITER`` steps, until a step is
    below ``tol`` relative. α > 2 (``BISECT``): ``f`` is concave; bisection, ``N_ITER`` halvings of the bracket
    ``[-1, -(1/Lk)^(α-1)]``. The closed forms then take τ from the support found (``Σ x``, ``Σ x²`` over it),
    which is exact whenever that support is. Each pass reads the block's list of key tiles, which it first writes
    (:func:`_write_tile_list`: those with a failed row's score above its lower bound of τ, lowered by ``slack``;
    every allowed one for the bisection: the union of its rows' lists, each row's from its own query block's tile
    maxima; under a block mask each row also masks the tiles its own block may not read)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m, count = _marked_rows(FAIL, ROWS, bh, pid_m, Lq, n_qb, LEVEL, BM)
    if count > 0:
        row_ok = offs_m < Lq  # the marked rows (a slot past the last one holds Lq)
        offs_d = tl.arange(0, BD)
        q = _load_rows(Q, b * s_qb + h * s_qh, s_qm, s_qd, offs_m, offs_d, Lq, D)
        m = tl.load(M + bh * Lq + offs_m, mask=row_ok, other=0.0)
        klen = _key_limit(KLEN, b, Lk, HAS_KLEN)
        keys = K + b * s_kb + h * s_kh
        keep = KEEP + b * s_eb + h * s_eh
        tiles = TILES + (bh * n_qb + pid_m) * n_kb
        row_tiles = _row_tile_maxima(TILEMAX, bh, offs_m, Lq, n_qb, n_kb, BM)
        # whole tiles from the first (smallest) row on; an empty slot's row (q = 0) is never solved nor stored
        unmasked = _whole_tiles(_whole_keys(WHOLE, b, klen, PAIR_TEST), tl.min(offs_m, 0), OFF, BN, CAUSAL)
        if PAIR_TEST >= 2 or HAS_BMASK:  # (rows of several blocks: block-mask rows of their own)
            unmasked = 0
        n_tiles, n_unmasked = _write_tile_list(TILEMAX, M, TAU, FAIL, FAIL, TILES, bh, pid_m, offs_m, Lq, n_qb,
                                               n_kb, scale, am1, slack, unmasked, 2 if BISECT else 0, False, True,
                                               BM)
        tl.debug_barrier()  # the list's entries, written by other threads of the block, are read back below
        cols = tl.arange(0, BN)
        if BISECT:
            lo = tl.full((BM,), -1.0, ACC)
            dm = tl.full((BM,), 1.0 - bracket, ACC)  # τ <= -(1/Lk)^(α-1): at most Lk positive entries
            tau = lo
            for _ in range(N_ITER):
                dm = dm / 2
                tau = lo + dm
                total = tl.zeros((BM,), ACC)
                for i in range(0, n_tiles):  # (α > 2, rare: every tile masked, one loop)
                    start_n = tl.load(tiles + i) * BN
                    s = _marked_scores(q, keys, keep, row_tiles, start_n, offs_m, offs_d, cols, s_kn, s_kd, s_eq,
                                       s_ek, Lq, klen, D, OFF, ACC, PREC, BN, CAUSAL, HAS_BMASK, PAIR_TEST, True)
                    total += tl.sum(_unnormalised(_shifted(s, m, tau, scale, am1), inv_am1, KIND), 1)
                lo = tl.where(total >= 1, tau, lo)
        else:
            tau = tl.load(TAU + bh * Lq + offs_m, mask=row_ok, other=0.0)
            active = row_ok
            solved = ~row_ok  # rows whose τ is the closed form on their exact support
            steps = 0
            while (tl.max(active.to(tl.int32), 0) > 0) & (steps < N_ITER):
                f, slope, n, smallest = _sweep_sums(q, keys, keep, tiles, row_tiles, n_unmasked, n_tiles, m, tau,
                                                    offs_m, offs_d, cols, s_kn, s_kd, s_eq, s_ek, Lq, klen, D, OFF,
                                                    scale, am1, inv_am1, ACC, PREC, KIND, BN, CAUSAL, HAS_BMASK,
                                                    PAIR_TEST)
                tau, active, solved = _newton_step(f, slope, n, smallest, m, tau, active, solved, scale, am1, tol,
                                                   KIND)
                steps += 1
        if MARK:  # (the closed forms only) the rows left to the next launch
            tl.store(FAIL + bh * Lq + offs_m, tl.full((BM,), LEVEL + 1, tl.int8), mask=row_ok & ~solved)
        elif KIND != 2:  # (never BISECT: that is α > 2)
            if tl.max((~solved).to(tl.int32), 0) > 0:  # Newton stopped short: τ from the support {x > τ}
                f, slope, n, smallest = _sweep_sums(q, keys, keep, tiles, row_tiles, n_unmasked, n_tiles, m, tau,
                                                    offs_m, offs_d, cols, s_kn, s_kd, s_eq, s_ek, Lq, klen, D, OFF,
                                                    scale, am1, inv_am1, ACC, PREC, KIND, BN, CAUSAL, HAS_BMASK,
                                                    PAIR_TEST)
                tau = tl.where(solved, tau, _closed_form(f, slope, n, tau, KIND))
        tl.store(TAU + bh * Lq + offs_m, tau, mask=row_ok)


@triton.jit
def _sweep_sums(q, keys, keep, tiles, row_tiles, n_unmasked, n_tiles, m, tau, offs_m, offs_d, cols, s_kn, s_kd, s_eq,
                s_ek, Lq, klen, D, OFF, scale, am1, inv_am1, ACC: tl.constexpr, PREC: tl.constexpr,
                KIND: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, HAS_BMASK: tl.constexpr,
                PAIR_TEST: tl.constexpr):
    """One sweep of the fallback over its list of key tiles (``tiles``, the first ``n_unmasked`` of them without
    masking): each row's :func:`_add_sums` at ``tau``."""
    f, slope, n, smallest = _no_sums(m, ACC)
    for part in tl.static_range(2):
        begin, end = _tile_range(n_unmasked, n_tiles, part)
        for i in range(begin, end):
            s = _marked_scores(q, keys, keep, row_tiles, tl.load(tiles + i) * BN, offs_m, offs_d, cols, s_kn, s_kd,
                               s_eq, s_ek, Lq, klen, D, OFF, ACC, PREC, BN, CAUSAL, HAS_BMASK, PAIR_TEST, part == 1)
            f, slope, n, smallest = _add_sums(s, _shifted(s, m, tau, scale, am1), f, slope, n, smallest, inv_am1,
                                              ACC, KIND)
    return f, slope, n, smallest


@triton.jit
def _marked_scores(q, keys, keep, row_tiles, start_n, offs_m, offs_d, cols, s_kn, s_kd, s_eq, s_ek, Lq, klen, D, OFF,
                   ACC: tl.constexpr, PREC: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_BMASK: tl.constexpr, PAIR_TEST: tl.constexpr, MASKED: tl.constexpr):
    """:func:`_scores` of one key tile for the fallback's rows (:func:`_marked_rows`). They may come from several
    query blocks, whose block-mask rows differ: under a block mask a row's scores in a tile its own block never
    read (tile maximum -inf, at ``row_tiles``) are masked too."""
    offs_n = start_n + cols
    k = _load_rows(keys, 0, s_kn, s_kd, offs_n, offs_d, klen, D)
    s = _scores(q, k, keep, 0, s_eq, s_ek, offs_m, offs_n, Lq, klen, OFF, ACC, PREC, CAUSAL, PAIR_TEST, MASKED)
    if HAS_BMASK:
        s = tl.where(tl.load(row_tiles + start_n // BN)[:, None] > NEG_INF, s, NEG_INF)
    return s


@triton.jit
def _closed_form(f, slope, n, tau, KIND: tl.constexpr):
    """τ of the closed forms on ``S = {x > tau}`` from :func:`_add_sums`' sums over it (``n = |S|``, ``d = x -
    tau``): 1.5-entmax ``mean - sqrt((1 - ss) / n)`` with ``mean = tau + Σ d / n`` and ``ss = Σ d² - (Σ d)² / n``
    (the spread of S about its mean, the same about any origin); sparsemax ``tau + (Σ d - 1) / n``."""
    n = tl.maximum(n, 1.0)
    if KIND == 0:
        mean_d = slope / 2 / n
        delta = (1 - (f - slope / 2 * mean_d)) / n
        return tau + mean_d - tl.sqrt(tl.maximum(delta, 0.0))
    else:
        return tau + (f - 1) / n


# --------------------------------------------------------------------------------------------------------------
# Pass 2: output (and what the backward needs), skipping tiles with no score above the threshold
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _append(LIST, count, keep, values):
    """Appends ``values`` where ``keep`` (a chunk, in order) to the list at ``LIST`` that holds ``count``; returns
    the new count. Every tile list is built this way."""
    at = count + tl.cumsum(keep.to(tl.int32), 0) - 1
    tl.store(LIST + at, values, mask=keep)
    return count + tl.sum(keep.to(tl.int32), 0)


@triton.jit
def _write_allowed_list(BMASK, TILES, b, h, start_m, hi, unmasked, s_mb, s_mh, s_bq, s_bk, n_kb,
                        BN: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr):
    """Writes the key tiles a block of query rows may attend to under a block mask (and causality, padding, through
    ``hi``), in order, to ``TILES`` (the block's ``n_kb`` slots), and returns their count and how many of them lie
    below ``unmasked`` (:func:`_unmasked_tiles`): the threshold pass's loops (:func:`_tile_allowed`, for a chunk of
    tiles). The caller reads the list back after a barrier."""
    chunk = tl.arange(0, LIST_CHUNK)
    count = 0
    below = 0
    for start in range(0, n_kb, LIST_CHUNK):
        kb = start + chunk
        ok = (kb < n_kb) & (kb * BN < hi)
        tile = BMASK + b * s_mb + h * s_mh + (start_m // TQ) * s_bq + (kb * BN // TK) * s_bk
        ok = ok & (tl.load(tile, mask=ok, other=0) != 0)
        below += tl.sum((ok & (kb < unmasked)).to(tl.int32), 0)
        count = _append(TILES, count, ok, kb)
    return count, below


@triton.jit
def _write_tile_list(TILEMAX, M, TAU, FAIL, NEED, TILES, bh, pid_m, offs_m, Lq, n_qb, n_kb, scale, am1, slack,
                     unmasked, ROWS: tl.constexpr, WRITE_NEED: tl.constexpr, GATHERED: tl.constexpr,
                     BM: tl.constexpr):
    """Writes the key tiles a block of ``BM`` query rows must read, in order, to ``TILES[bh, qb, :]`` and returns
    their count and how many of them lie below ``unmasked`` (:func:`_unmasked_tiles`: the sweep reads those first,
    without masking). Each sweep over a list (fallback, output pass, dQ) writes its own block's list first, then
    reads it back after a barrier: one launch, not a list kernel and then the sweep.

    A tile is needed when some row has a score above its threshold there, ``max_r d_r(tilemax) > 0`` (the
    per-score test of :func:`_distance` on the tile's largest product, and ``d`` is monotone in the product, so a
    tile left out holds only zeros); tiles the threshold pass never read (block mask, causality, padding) keep
    ``tilemax = -inf`` and are never needed.
    ``ROWS``: 0 every row, 1 only the rows marked in ``FAIL``, 2 the marked rows with any allowed score (τ = -inf:
    the bisection's sweeps, which start below every threshold). ``slack`` lowers each τ by ``slack · max(|τ|, 1)``
    (the fallback's lists, from lower bounds of τ). With ``WRITE_NEED`` the dense ``(n_qb, n_kb)`` map is written
    too, which :func:`tile_columns_kernel` turns into the backward's lists per key tile. ``offs_m``: the rows,
    block ``pid_m``'s, or with ``GATHERED`` the fallback's from several blocks (:func:`_marked_rows`), each then
    tested against its own block's tile maxima.

    The passes over keys then loop over a list without a branch: a tile test inside the loop keeps Triton from
    software-pipelining it (prefetching the next tile's keys and values while this one is computed)."""
    row_ok = offs_m < Lq
    m = tl.load(M + bh * Lq + offs_m, mask=row_ok, other=0.0)
    tau = tl.load(TAU + bh * Lq + offs_m, mask=row_ok, other=float("inf"))
    tau = tau - slack * tl.maximum(tl.abs(tl.where(tau < float("inf"), tau, 0.0)), 1.0)  # +inf (no key) stays
    rows = row_ok
    if ROWS != 0:
        rows = rows & (tl.load(FAIL + bh * Lq + offs_m, mask=row_ok, other=0) != 0)
    tau = tl.where(rows, tau, float("inf"))
    base = (bh * n_qb + pid_m) * n_kb
    chunk = tl.arange(0, LIST_CHUNK)
    count = 0
    below = 0
    for start in range(0, n_kb, LIST_CHUNK):
        kb = start + chunk
        ok = kb < n_kb
        if GATHERED:  # (BM, chunk): each row's own block's
            tmax = tl.load(_row_tile_maxima(TILEMAX, bh, offs_m, Lq, n_qb, n_kb, BM)[:, None] + kb[None, :],
                           mask=ok[None, :], other=float("-inf"))
        else:  # (1, chunk): the block's
            tmax = tl.load(TILEMAX + base + kb, mask=ok, other=float("-inf"))[None, :]
        if ROWS == 2:
            need = tl.max(tl.where(rows[:, None], tmax, float("-inf")), 0) > float("-inf")
        else:
            need = tl.max(_distance(tmax, m[:, None], tau[:, None], scale, am1), 0) > 0
        need = need & ok
        if WRITE_NEED:
            tl.store(NEED + base + kb, need.to(tl.int8), mask=ok)
        below += tl.sum((need & (kb < unmasked)).to(tl.int32), 0)
        count = _append(TILES + base, count, need, kb)
    return count, below


@triton.jit
def tile_columns_kernel(NEED, TILES, NTILES, n_qb, n_kb):
    """The query blocks reading each key tile, from the map :func:`backward_dq_kernel` wrote: ``TILES[bh, kb,
    :NTILES[bh, kb]]`` (the backward's dK/dV loop)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    chunk = tl.arange(0, LIST_CHUNK)
    base = (bh * n_kb + pid_n) * n_qb
    count = 0
    for start in range(0, n_qb, LIST_CHUNK):
        qb = start + chunk
        ok = qb < n_qb
        need = (tl.load(NEED + (bh * n_qb + qb) * n_kb + pid_n, mask=ok, other=0) != 0) & ok
        count = _append(TILES + base, count, need, qb)
    tl.store(NTILES + bh * n_kb + pid_n, count)


@triton.jit
def code_tiles_kernel(CODES, CANDIDATES, OUT, s_cb, s_ch, s_word, s_key, s_tb, s_th, s_tq, s_tk, H, Lq, Lk, n_qb, n_kb,
                      PAIR_TEST: tl.constexpr, TILE: tl.constexpr, SUB: tl.constexpr):
    """``OUT[bh, i, j]``: whether the ``TILE x TILE`` tile ``(i, j)`` holds a pair the codes allow, for the tiles
    ``CANDIDATES`` lets through (a superset, from :meth:`hf_sparse.pair_codes.PairCodes.tiles`; the others are
    left out unread). The exact tiles where the per-tile bound is loose (distance codes: boxes), tested ``SUB x
    SUB`` at a time with the attention kernels' own pair test, so that their first sweep reads no tile without a
    pair."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    codes = CODES + b * s_cb + h * s_ch
    part = tl.arange(0, SUB)
    for kb in range(0, n_kb):
        found = tl.zeros([], dtype=tl.int32)
        if tl.load(CANDIDATES + b * s_tb + h * s_th + pid_m * s_tq + kb * s_tk) != 0:
            for sm in tl.static_range(TILE // SUB):
                offs_m = pid_m * TILE + sm * SUB + part
                for sn in tl.static_range(TILE // SUB):
                    offs_n = kb * TILE + sn * SUB + part
                    hit = _coded_pairs(codes, s_word, s_key, offs_m, offs_n, offs_m < Lq, offs_n < Lk, PAIR_TEST)
                    found = found | tl.max(hit.to(tl.int32))
        tl.store(OUT + (bh * n_qb + pid_m) * n_kb + kb, found.to(tl.int8))


@triton.jit
def forward_kernel(
    Q, K, V, KLEN, BMASK, KEEP, WHOLE, M, TAU, FAIL, TILEMAX, TILES, OUT, LSUM, G, GSUM, SEED,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_om, s_od,
    s_mb, s_mh, s_bq, s_bk, s_eb, s_eh, s_eq, s_ek,
    H, Lq, Lk, D, DV, OFF, n_qb, n_kb, scale, am1, inv_am1, two_minus_alpha, drop_below, drop_scale,
    ACC: tl.constexpr, PREC: tl.constexpr, KIND: tl.constexpr, NEED_G: tl.constexpr, DROPOUT: tl.constexpr,
    ONLY_FAILED: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, HAS_BMASK: tl.constexpr, PAIR_TEST: tl.constexpr,
):
    """O = Σ p v flash-style (with ``ONLY_FAILED``, for the rows marked in ``FAIL`` only: the streaming pass's
    :func:`gather_kernel` writes the others; blocks without one sweep no key). With ``NEED_G`` also Σ g̃ v and Σ g̃
    (g̃ = p̃^{2-α}), from which the backward's per-row constant ``Σ g dP / Σ g = dO · (Σ g̃ v) / Σ g̃`` follows
    without another pass over the keys. With ``DROPOUT``, O = Σ dropout(p) v, and ``Σ g̃ v`` takes the same dropout
    (dP of the pre-dropout p is ``dropout(dO · v)``), while ``Σ p̃`` and ``Σ g̃`` do not. The key tiles are those of
    the block's list, which it first writes (:func:`_write_tile_list`: a tile with no score above its rows'
    thresholds holds only zeros)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BM
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    row_ok = offs_m < Lq
    q = _load_rows(Q, b * s_qb + h * s_qh, s_qm, s_qd, offs_m, offs_d, Lq, D)
    m = tl.load(M + bh * Lq + offs_m, mask=row_ok, other=0.0)
    tau = tl.load(TAU + bh * Lq + offs_m, mask=row_ok, other=float("inf"))
    klen = _key_limit(KLEN, b, Lk, HAS_KLEN)
    if ONLY_FAILED:  # (the list holds only these rows' tiles)
        row_ok = row_ok & (tl.load(FAIL + bh * Lq + offs_m, mask=row_ok, other=0) != 0)
    cols = tl.arange(0, BN)
    acc = tl.zeros((BM, BDV), ACC)
    lsum = tl.zeros((BM,), ACC)
    gacc = tl.zeros((BM, BDV), ACC)
    gsum = tl.zeros((BM,), ACC)
    keys = K + b * s_kb + h * s_kh
    values = V + b * s_vb + h * s_vh
    keep = KEEP + b * s_eb + h * s_eh
    tiles = TILES + (bh * n_qb + pid_m) * n_kb
    unmasked = _unmasked_tiles(_whole_keys(WHOLE, b, klen, PAIR_TEST), start_m, OFF, BN, CAUSAL, PAIR_TEST)
    n_tiles, n_unmasked = _write_tile_list(TILEMAX, M, TAU, FAIL, FAIL, TILES, bh, pid_m, offs_m, Lq, n_qb, n_kb,
                                           scale, am1, 0.0, unmasked, 1 if ONLY_FAILED else 0, False, False, BM)
    tl.debug_barrier()  # the list's entries, written by other threads of the block, are read back below
    ONE_LOOP: tl.constexpr = NEED_G and not DROPOUT
    if ONE_LOOP:
        # one loop: with two (and Σ g̃ v) this kernel took 183 registers per thread on sm_90, two programs per SM;
        # with one, 164 and three (scripts/kernel_resources.py). Dropout's draws take it past 168 with one loop too
        # (202): there two cost no program per SM and save the tests (792 instructions a whole tile against 829)
        n_unmasked = 0
    for part in tl.static_range(1 if ONE_LOOP else 0, 2):
        begin, end = _tile_range(n_unmasked, n_tiles, part)
        for i in range(begin, end):
            acc, lsum, gacc, gsum = _output_tile(
                q, keys, values, keep, tl.load(tiles + i) * BN, m, tau, acc, lsum, gacc, gsum, SEED, bh, offs_m,
                offs_d, offs_dv, cols, s_kn, s_kd, s_vn, s_vd, s_eq, s_ek, Lq, Lk, klen, D, DV, OFF, scale, am1,
                inv_am1, two_minus_alpha, drop_below, drop_scale, ACC, PREC, KIND, NEED_G, DROPOUT, CAUSAL, PAIR_TEST,
                part == 1,
            )
    _store_output(OUT, LSUM, G, GSUM, acc, lsum, gacc, gsum, b, h, bh, offs_m, offs_dv, row_ok,
                  s_ob, s_oh, s_om, s_od, Lq, DV, KIND, NEED_G)


@triton.jit
def _output_tile(q, keys, values, keep, start_n, m, tau, acc, lsum, gacc, gsum, SEED, bh, offs_m, offs_d, offs_dv,
                 cols, s_kn, s_kd, s_vn, s_vd, s_eq, s_ek, Lq, Lk, klen, D, DV, OFF, scale, am1, inv_am1,
                 two_minus_alpha, drop_below, drop_scale, ACC: tl.constexpr, PREC: tl.constexpr, KIND: tl.constexpr,
                 NEED_G: tl.constexpr, DROPOUT: tl.constexpr, CAUSAL: tl.constexpr, PAIR_TEST: tl.constexpr,
                 MASKED: tl.constexpr):
    """One key tile of :func:`forward_kernel`. ``Σ p̃`` only for general α, whose output it normalises (the closed
    forms' rows sum to 1)."""
    offs_n = start_n + cols
    k = _load_rows(keys, 0, s_kn, s_kd, offs_n, offs_d, klen, D)
    s = _scores(q, k, keep, 0, s_eq, s_ek, offs_m, offs_n, Lq, klen, OFF, ACC, PREC, CAUSAL, PAIR_TEST, MASKED)
    kept = _kept_tile(SEED, bh, offs_m, start_n, Lq, Lk, drop_below, cols.shape[0]) if DROPOUT else None
    p, pv, g, gv = _output_weights(_shifted(s, m, tau, scale, am1), kept, inv_am1, two_minus_alpha, drop_scale, KIND,
                                   NEED_G, DROPOUT)
    v = _load_rows(values, 0, s_vn, s_vd, offs_n, offs_dv, klen, DV)
    acc += tl.dot(pv.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
    if KIND == 2:
        lsum += tl.sum(p, 1)
    if NEED_G:
        gacc += tl.dot(gv.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
        gsum += tl.sum(g, 1)
    return acc, lsum, gacc, gsum


@triton.jit
def _output_weights(d, kept, inv_am1, two_minus_alpha, drop_scale, KIND: tl.constexpr, NEED_G: tl.constexpr,
                    DROPOUT: tl.constexpr):
    """What both output kernels weigh the values by, from ``d = x - τ`` (:func:`_shifted`): ``(p, pv, g, gv)``:
    ``p = p̃``, ``g = p̃^{2-α}`` (``p`` when not ``NEED_G``), and the same after attention dropout (``pv``, ``gv``:
    the pairs not ``kept`` 0, kept ones scaled)."""
    p = _unnormalised(d, inv_am1, KIND)
    pv = p
    if DROPOUT:
        factor = _drop_factor(kept, drop_scale, p.dtype)
        pv = p * factor
    g = p
    gv = pv
    if NEED_G:
        g = _gppr(d, p, two_minus_alpha, KIND)
        gv = g
        if DROPOUT:
            gv = g * factor
    return p, pv, g, gv


@triton.jit
def _store_output(OUT, LSUM, G, GSUM, acc, lsum, gacc, gsum, b, h, bh, offs_m, offs_dv, row_ok,
                  s_ob, s_oh, s_om, s_od, Lq, DV, KIND: tl.constexpr, NEED_G: tl.constexpr):
    """Both output kernels' last step: O (normalised by Σ p̃ for general α, which also stores Σ p̃ for the
    backward), and with ``NEED_G`` Σ g̃ v and Σ g̃ for the backward, for the rows in ``row_ok``."""
    if KIND == 2:
        acc = acc / tl.where(lsum > 0, lsum, 1.0)[:, None]
        tl.store(LSUM + bh * Lq + offs_m, lsum, mask=row_ok)
    out_mask = row_ok[:, None] & (offs_dv[None, :] < DV)
    tl.store(
        OUT + b * s_ob + h * s_oh + offs_m[:, None] * s_om + offs_dv[None, :] * s_od,
        acc.to(OUT.dtype.element_ty),
        mask=out_mask,
    )
    if NEED_G:
        tl.store(G + (bh * Lq + offs_m[:, None]) * DV + offs_dv[None, :], gacc, mask=out_mask)
        tl.store(GSUM + bh * Lq + offs_m, gsum, mask=row_ok)


@triton.jit
def gather_kernel(
    V, M, TAU, FAIL, SCRATCH, KEYS, COUNT, OUT, LSUM, G, GSUM, SEED,
    s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_om, s_od,
    H, Lq, Lk, DV, scale, am1, inv_am1, two_minus_alpha, drop_below, drop_scale,
    ACC: tl.constexpr, KIND: tl.constexpr, NEED_G: tl.constexpr, DROPOUT: tl.constexpr,
    BM: tl.constexpr, BDV: tl.constexpr, CAP: tl.constexpr,
):
    """The streaming pass's output: what :func:`forward_kernel` writes, from the scores :func:`stream_kernel` kept
    (the row's support) and their keys' values, one slot of every row at a time. No score is recomputed and no other
    key is read: the output costs the support's size, not the row's length. Rows marked in ``FAIL`` (their support
    outgrew the slots) are left to :func:`forward_kernel`."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_dv = tl.arange(0, BDV)
    row_ok = offs_m < Lq
    row_ok = row_ok & (tl.load(FAIL + bh * Lq + offs_m, mask=row_ok, other=1) == 0)
    m = tl.load(M + bh * Lq + offs_m, mask=row_ok, other=0.0)
    tau = tl.load(TAU + bh * Lq + offs_m, mask=row_ok, other=float("inf"))
    count = tl.load(COUNT + bh * Lq + offs_m, mask=row_ok, other=0)
    slots = (bh * Lq + offs_m).to(tl.int64) * CAP
    acc = tl.zeros((BM, BDV), ACC)
    lsum = tl.zeros((BM,), ACC)
    gacc = tl.zeros((BM, BDV), ACC)
    gsum = tl.zeros((BM,), ACC)
    for j in range(0, tl.max(count, 0)):
        held = j < count
        s = tl.load(SCRATCH + slots + j, mask=held, other=NEG_INF)
        key = tl.load(KEYS + slots + j, mask=held, other=0)
        d = _shifted(s[:, None], m, tau, scale, am1)  # (BM, 1): the tile helpers' shape
        kept = _kept(SEED, bh, offs_m[:, None], key[:, None], Lq, Lk, drop_below) if DROPOUT else None
        p, pv, g, gv = _output_weights(d, kept, inv_am1, two_minus_alpha, drop_scale, KIND, NEED_G, DROPOUT)
        v = tl.load(V + b * s_vb + h * s_vh + key[:, None] * s_vn + offs_dv[None, :] * s_vd,
                    mask=held[:, None] & (offs_dv[None, :] < DV), other=0.0).to(ACC)
        acc += pv * v
        if KIND == 2:
            lsum += tl.sum(p, 1)
        if NEED_G:
            gacc += gv * v
            gsum += tl.sum(g, 1)
    _store_output(OUT, LSUM, G, GSUM, acc, lsum, gacc, gsum, b, h, bh, offs_m, offs_dv, row_ok,
                  s_ob, s_oh, s_om, s_od, Lq, DV, KIND, NEED_G)


# --------------------------------------------------------------------------------------------------------------
# Backward: dS = g ⊙ (dP - c) with c = Σ g dP / Σ g per row; dQ by query blocks, dK and dV by key blocks
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _probabilities(s, m, tau, lsum, scale, am1, inv_am1, two_minus_alpha, KIND: tl.constexpr):
    """Normalised p and g = p^{2-α} of a recomputed tile (``lsum``: Σ p̃, read for general α only)."""
    d = _shifted(s, m, tau, scale, am1)
    p = _unnormalised(d, inv_am1, KIND)
    if KIND == 2:
        p = p / tl.where(lsum > 0, lsum, 1.0)[:, None]
    return p, _gppr(d, p, two_minus_alpha, KIND)


@triton.jit
def backward_dq_kernel(
    Q, K, V, DO, DQ, KLEN, BMASK, KEEP, WHOLE, M, TAU, LSUM, C, TILEMAX, NEED, TILES, SEED,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_om, s_od,
    s_mb, s_mh, s_bq, s_bk, s_eb, s_eh, s_eq, s_ek,
    H, Lq, Lk, D, DV, OFF, n_qb, n_kb, scale, am1, inv_am1, two_minus_alpha, drop_below, drop_scale,
    ACC: tl.constexpr, PREC: tl.constexpr, KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, HAS_BMASK: tl.constexpr, PAIR_TEST: tl.constexpr,
):
    """dQ = scale · Σ_j dS_ij k_j for one block of queries, over its list of key tiles, which it first writes
    (:func:`_write_tile_list`), with the block's row of the dense map ``NEED`` that :func:`tile_columns_kernel`
    turns into the dK/dV lists (dO and dQ share q's (B, H, L, D) strides)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_m = pid_m * BM
    offs_m = start_m + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    row_ok = offs_m < Lq
    q = _load_rows(Q, b * s_qb + h * s_qh, s_qm, s_qd, offs_m, offs_d, Lq, D)
    do = _load_rows(DO, b * s_ob + h * s_oh, s_om, s_od, offs_m, offs_dv, Lq, DV)
    m = tl.load(M + bh * Lq + offs_m, mask=row_ok, other=0.0)
    tau = tl.load(TAU + bh * Lq + offs_m, mask=row_ok, other=float("inf"))
    lsum = _normaliser(LSUM, bh, Lq, offs_m, row_ok, KIND)
    c = tl.load(C + bh * Lq + offs_m, mask=row_ok, other=0.0)
    klen = _key_limit(KLEN, b, Lk, HAS_KLEN)
    cols = tl.arange(0, BN)
    dq = tl.zeros((BM, BD), ACC)
    keys = K + b * s_kb + h * s_kh
    values = V + b * s_vb + h * s_vh
    keep = KEEP + b * s_eb + h * s_eh
    tiles = TILES + (bh * n_qb + pid_m) * n_kb
    unmasked = _unmasked_tiles(_whole_keys(WHOLE, b, klen, PAIR_TEST), start_m, OFF, BN, CAUSAL, PAIR_TEST)
    n_tiles, n_unmasked = _write_tile_list(TILEMAX, M, TAU, TAU, NEED, TILES, bh, pid_m, offs_m, Lq, n_qb, n_kb,
                                           scale, am1, 0.0, unmasked, 0, True, False, BM)
    tl.debug_barrier()  # the list's entries, written by other threads of the block, are read back below
    for part in tl.static_range(2):
        begin, end = _tile_range(n_unmasked, n_tiles, part)
        for i in range(begin, end):
            dq = _dq_tile(q, do, keys, values, keep, tl.load(tiles + i) * BN, m, tau, lsum, c, dq, SEED, bh, offs_m,
                          offs_d, offs_dv, cols, s_kn, s_kd, s_vn, s_vd, s_eq, s_ek, Lq, Lk, klen, D, DV, OFF, scale,
                          am1, inv_am1, two_minus_alpha, drop_below, drop_scale, ACC, PREC, KIND, DROPOUT, CAUSAL,
                          PAIR_TEST, part == 1)
    tl.store(
        DQ + b * s_qb + h * s_qh + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd,
        (dq * scale).to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d[None, :] < D),
    )


@triton.jit
def _dq_tile(q, do, keys, values, keep, start_n, m, tau, lsum, c, dq, SEED, bh, offs_m, offs_d, offs_dv, cols, s_kn,
             s_kd, s_vn, s_vd, s_eq, s_ek, Lq, Lk, klen, D, DV, OFF, scale, am1, inv_am1, two_minus_alpha, drop_below,
             drop_scale, ACC: tl.constexpr, PREC: tl.constexpr, KIND: tl.constexpr, DROPOUT: tl.constexpr,
             CAUSAL: tl.constexpr, PAIR_TEST: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of :func:`backward_dq_kernel`: ``Σ_j dS_ij k_j`` over it, added to ``dq``."""
    offs_n = start_n + cols
    k = _load_rows(keys, 0, s_kn, s_kd, offs_n, offs_d, klen, D)
    s = _scores(q, k, keep, 0, s_eq, s_ek, offs_m, offs_n, Lq, klen, OFF, ACC, PREC, CAUSAL, PAIR_TEST, MASKED)
    p, g = _probabilities(s, m, tau, lsum, scale, am1, inv_am1, two_minus_alpha, KIND)
    v = _load_rows(values, 0, s_vn, s_vd, offs_n, offs_dv, klen, DV)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
    if DROPOUT:
        kept = _kept_tile(SEED, bh, offs_m, start_n, Lq, Lk, drop_below, offs_n.shape[0])
        dp = dp * _drop_factor(kept, drop_scale, dp.dtype)
    ds = g * (dp - c[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _normaliser(LSUM, bh, Lq, offs_m, row_ok, KIND: tl.constexpr):
    """Σ p̃ of each row, which the output pass stores for general α only (the closed forms' rows sum to 1)."""
    lsum = tl.full(offs_m.shape, 1.0, tl.float32)
    if KIND == 2:
        lsum = tl.load(LSUM + bh * Lq + offs_m, mask=row_ok, other=1.0)
    return lsum


@triton.jit
def backward_dkdv_kernel(
    Q, K, V, DO, DK, DV_OUT, KLEN, BMASK, KEEP, WHOLE, M, TAU, LSUM, C, TILES, NTILES, SEED,
    s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_om, s_od,
    s_mb, s_mh, s_bq, s_bk, s_eb, s_eh, s_eq, s_ek,
    H, Lq, Lk, D, DV, OFF, n_qb, n_kb, scale, am1, inv_am1, two_minus_alpha, drop_below, drop_scale,
    ACC: tl.constexpr, PREC: tl.constexpr, KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KLEN: tl.constexpr, HAS_BMASK: tl.constexpr, PAIR_TEST: tl.constexpr,
):
    """dK = scale · Σ_i dS_ij q_i and dV = Σ_i p_ij dO_i (p after dropout) for one block of keys, over the query
    blocks that read it (:func:`tile_columns_kernel`) (dK, dV share k's, v's strides). As the other sweeps, in two
    loops: the query tiles that need the mask tests (:func:`_masked_query_tiles`), then the others without them."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    start_n = pid_n * BN
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    klen = _key_limit(KLEN, b, Lk, HAS_KLEN)
    dk = tl.zeros((BN, BD), ACC)
    dv = tl.zeros((BN, BDV), ACC)
    k = _load_rows(K, b * s_kb + h * s_kh, s_kn, s_kd, offs_n, offs_d, klen, D)
    v = _load_rows(V, b * s_vb + h * s_vh, s_vn, s_vd, offs_n, offs_dv, klen, DV)
    listed = bh * n_kb + pid_n
    n_tiles = tl.load(NTILES + listed)
    n_masked = _masked_query_tiles(TILES + listed * n_qb, n_tiles, start_n, _whole_keys(WHOLE, b, klen, PAIR_TEST),
                                   OFF, BM, BN, CAUSAL, PAIR_TEST)
    for part in tl.static_range(2):  # the tiles that need the mask tests (first in the list), then the others
        if (part == 0 and (CAUSAL or PAIR_TEST != 0)) or (part == 1 and PAIR_TEST <= 1):  # (compiled where used)
            begin, end = _tile_range(n_masked, n_tiles, part)
            for i in range(begin, end):
                dk, dv = _dkdv_tile(tl.load(TILES + listed * n_qb + i), k, v, dk, dv, Q, DO, KEEP, M, TAU, LSUM, C,
                                    SEED, b, h, bh, start_n, offs_n, offs_d, offs_dv, s_qb, s_qh, s_qm, s_qd, s_ob,
                                    s_oh, s_om, s_od, s_eb, s_eh, s_eq, s_ek, Lq, Lk, klen, D, DV, OFF, scale, am1,
                                    inv_am1, two_minus_alpha, drop_below, drop_scale, ACC, PREC, KIND, DROPOUT, BM,
                                    CAUSAL, PAIR_TEST, part == 0)
    # A padding key's scores were taken without the tests where they were left out (its k and v read as zeros, so
    # they are finite): its gradients are zero, and no other key's depend on them.
    real = offs_n < klen
    dk = tl.where(real[:, None], dk, 0.0)
    dv = tl.where(real[:, None], dv, 0.0)
    key_ok = offs_n < Lk
    tl.store(
        DK + b * s_kb + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
        (dk * scale).to(DK.dtype.element_ty),
        mask=key_ok[:, None] & (offs_d[None, :] < D),
    )
    tl.store(
        DV_OUT + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_dv[None, :] * s_vd,
        dv.to(DV_OUT.dtype.element_ty),
        mask=key_ok[:, None] & (offs_dv[None, :] < DV),
    )


@triton.jit
def _masked_query_tiles(LIST, n_tiles, start_n, whole, OFF, BM: tl.constexpr, BN: tl.constexpr,
                        CAUSAL: tl.constexpr, PAIR_TEST: tl.constexpr):
    """How many of the first query tiles in a key tile's list (in query order, :func:`tile_columns_kernel`) dK/dV
    reads with the mask tests (:func:`_scores`): every one with codes, or with an element mask where the tile has a
    key at or past ``whole`` (:func:`_whole_keys`: one the mask keeps from some query); causal, those with a row
    that may not see every key of the tile (row ``r`` sees keys up to ``r + OFF``: at most ``(BN + BM - 2) // BM +
    1`` tiles along the diagonal); else none. The others need no test. Rows past ``Lq`` are read with τ = +inf, so
    their weights are zero; a padding key's gradients are zeroed after the loop; each key's gradients depend on its
    own scores only, so a padding key's unmasked scores reach no other."""
    n = n_tiles * 0
    if PAIR_TEST >= 2:
        n = n_tiles
    else:
        if CAUSAL:
            whole_from = start_n + BN - 1 - OFF  # the first row that sees every key of the tile
            chunk = tl.arange(0, LIST_CHUNK)
            for first in range(0, tl.minimum(n_tiles, (BN + BM - 2) // BM + 1), LIST_CHUNK):
                at = first + chunk
                listed = at < n_tiles
                n += tl.sum((listed & (tl.load(LIST + at, mask=listed, other=0) * BM < whole_from)).to(tl.int32), 0)
        if PAIR_TEST == 1:
            n = tl.where(start_n + BN > whole, n_tiles, n)
    return n


@triton.jit
def _dkdv_tile(q_tile, k, v, dk, dv, Q, DO, KEEP, M, TAU, LSUM, C, SEED, b, h, bh, start_n, offs_n, offs_d, offs_dv,
               s_qb, s_qh, s_qm, s_qd, s_ob, s_oh, s_om, s_od, s_eb, s_eh, s_eq, s_ek, Lq, Lk, klen, D, DV, OFF, scale,
               am1, inv_am1, two_minus_alpha, drop_below, drop_scale, ACC: tl.constexpr, PREC: tl.constexpr,
               KIND: tl.constexpr, DROPOUT: tl.constexpr, BM: tl.constexpr, CAUSAL: tl.constexpr,
               PAIR_TEST: tl.constexpr, MASKED: tl.constexpr):
    """One query tile of :func:`backward_dkdv_kernel`: ``dV += pᵀ dO`` and ``dK += dSᵀ q`` (unscaled)."""
    offs_m = q_tile * BM + tl.arange(0, BM)
    row_ok = offs_m < Lq
    m = tl.load(M + bh * Lq + offs_m, mask=row_ok, other=0.0)
    tau = tl.load(TAU + bh * Lq + offs_m, mask=row_ok, other=float("inf"))
    q = _load_rows(Q, b * s_qb + h * s_qh, s_qm, s_qd, offs_m, offs_d, Lq, D)
    do = _load_rows(DO, b * s_ob + h * s_oh, s_om, s_od, offs_m, offs_dv, Lq, DV)
    lsum = _normaliser(LSUM, bh, Lq, offs_m, row_ok, KIND)
    c = tl.load(C + bh * Lq + offs_m, mask=row_ok, other=0.0)
    s = _scores(q, k, KEEP, b * s_eb + h * s_eh, s_eq, s_ek, offs_m, offs_n, Lq, klen, OFF, ACC, PREC, CAUSAL,
                PAIR_TEST, MASKED)
    p, g = _probabilities(s, m, tau, lsum, scale, am1, inv_am1, two_minus_alpha, KIND)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
    if DROPOUT:
        kept = _kept_tile(SEED, bh, offs_m, start_n, Lq, Lk, drop_below, offs_n.shape[0])
        factor = _drop_factor(kept, drop_scale, p.dtype)
        p = p * factor
        dp = dp * factor
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC, out_dtype=ACC)
    ds = g * (dp - c[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC, out_dtype=ACC)
    return dk, dv


# --------------------------------------------------------------------------------------------------------------
# Row-wise entmax of materialised scores (hf_sparse.entmax_rows_triton): one launch forward, one backward
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_chunk(X, KEEP, rows, cols, R, L, s_xr, s_kr, s_kc, ACC: tl.constexpr, HAS_KEEP: tl.constexpr):
    """Scores ``(ROWS, CHUNK)`` of rows ``rows`` at columns ``cols``, -inf where there is none (past ``R`` or
    ``L``) or ``KEEP`` masks it: a masked score is never in a support."""
    ok = (rows[:, None] < R) & (cols[None, :] < L)
    if HAS_KEEP:
        ok = ok & (tl.load(KEEP + rows[:, None] * s_kr + cols[None, :] * s_kc, mask=ok, other=0) != 0)
    return tl.load(X + rows[:, None] * s_xr + cols[None, :], mask=ok, other=NEG_INF).to(ACC)


@triton.jit
def _candidates_newton(first, second, m, am1, inv_am1, tol, ACC: tl.constexpr, KIND: tl.constexpr,
                       STEPS: tl.constexpr, TWO: tl.constexpr):
    """τ of each row's candidates (``first``, and ``second`` if ``TWO``; -inf: none), held in registers, for the
    closed forms: Newton from -1 (the τ of the largest score alone, which every row's τ is at least), with the
    closed form on ``S = {x > τ}`` checked at each step (:func:`_newton_step`). Returns ``(tau, solved)``; an
    unsolved row keeps a Newton iterate, a lower bound."""
    tau = tl.zeros_like(m) - 1.0
    solved = tau != tau  # all False
    active = ~solved
    steps = 0
    while (tl.max(active.to(tl.int32), 0) > 0) & (steps < STEPS):
        f, slope, n, smallest = _no_sums(m, ACC)
        f, slope, n, smallest = _add_sums(first, _shifted(first, m, tau, 1.0, am1), f, slope, n, smallest, inv_am1,
                                          ACC, KIND)
        if TWO:
            f, slope, n, smallest = _add_sums(second, _shifted(second, m, tau, 1.0, am1), f, slope, n, smallest,
                                              inv_am1, ACC, KIND)
        tau, active, solved = _newton_step(f, slope, n, smallest, m, tau, active, solved, 1.0, am1, tol, KIND)
        steps += 1
    return tau, solved


@triton.jit
def _candidates_bisect(first, second, m, am1, inv_am1, bracket, n_iter, TWO: tl.constexpr):
    """``entmax_bisect``'s bisection on the candidates (general α): ``n_iter`` halvings of ``[-1, -bracket]``.
    Returns ``(lower, mid, total)``: the bracket's lower end (a lower bound of the candidates' τ), the last
    midpoint and ``Σ p̃`` there (the normaliser)."""
    lower = tl.zeros_like(m) - 1.0
    dm = tl.zeros_like(m) + (1.0 - bracket)
    mid = lower
    total = tl.zeros_like(m)
    for _ in range(n_iter):
        dm = dm / 2
        mid = lower + dm
        total = tl.sum(_unnormalised(_shifted(first, m, mid, 1.0, am1), inv_am1, 2), 1)
        if TWO:
            total += tl.sum(_unnormalised(_shifted(second, m, mid, 1.0, am1), inv_am1, 2), 1)
        lower = tl.where(total >= 1, mid, lower)
    return lower, mid, total


@triton.jit
def rows_forward_kernel(
    X, KEEP, OUT, R, L, s_xr, s_kr, s_kc, am1, inv_am1, bracket, row_bracket, tol, n_iter,
    ACC: tl.constexpr, KIND: tl.constexpr, HAS_KEEP: tl.constexpr, ENSURE_SUM_ONE: tl.constexpr,
    ROWS: tl.constexpr, CHUNK: tl.constexpr, WHOLE: tl.constexpr, STEPS: tl.constexpr,
):
    """α-entmax of ``ROWS`` rows of the ``(R, L)`` scores ``X`` (row stride ``s_xr``, contiguous rows), written to
    ``OUT`` (same layout). ``WHOLE`` (``L <= CHUNK``): each row is loaded once, its τ found in registers (Newton with
    the closed forms' check, or the bisection), and written. Longer rows: a first sweep keeps each row's two largest
    scores per column of the chunks, as the attention kernel's ``bound`` pass does, and the largest one it let go
    of; their τ, found in registers, is a lower bound of the row's, and the row's own where that score lies below
    it (the certificate of :mod:`hf_sparse.entmax_topk`); only rows that fail it sweep their scores again, a
    Newton step (a bisection halving) per sweep. Then one sweep writes ``p``. No host read, one launch."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # R·L may pass 2^31
    cols = tl.arange(0, CHUNK)
    if WHOLE:
        first = _row_chunk(X, KEEP, rows, cols, R, L, s_xr, s_kr, s_kc, ACC, HAS_KEEP)
        second = first
        dropped = tl.full((ROWS,), float("-inf"), ACC)
        nan = tl.max((first != first).to(tl.int32), 1)
    else:
        first = tl.full((ROWS, CHUNK), float("-inf"), ACC)
        second = first
        dropped = first  # per column until the sweep ends: one row reduction each, not one per chunk
        nan = tl.zeros((ROWS, CHUNK), tl.int32)
        for c0 in range(0, L, CHUNK):
            s = _row_chunk(X, KEEP, rows, c0 + cols, R, L, s_xr, s_kr, s_kc, ACC, HAS_KEEP)
            nan = tl.maximum(nan, (s != s).to(tl.int32))
            dropped = tl.maximum(dropped, tl.minimum(second, s))  # what leaves its column's top two
            second = tl.maximum(second, tl.minimum(first, s))
            first = tl.maximum(first, s)
        dropped = tl.max(dropped, 1)
        nan = tl.max(nan, 1)
    m = _row_maximum(tl.max(first, 1), 1.0)
    if KIND == 2:
        lower, tau, total = _candidates_bisect(first, second, m, am1, inv_am1, bracket, n_iter, not WHOLE)
    else:
        tau, _ = _candidates_newton(first, second, m, am1, inv_am1, tol, ACC, KIND, STEPS, not WHOLE)
        lower = tau
    if not WHOLE:
        redo = _distance(dropped, m, lower, 1.0, am1) > 0  # some score let go of may enter the support
        if tl.max(redo.to(tl.int32), 0) > 0:
            if KIND == 2:  # entmax_bisect's own bisection, with the whole row's bracket
                lower = tl.where(redo, -1.0, lower)
                dm = tl.zeros_like(m) + (1.0 - row_bracket)
                for _ in range(n_iter):
                    dm = dm / 2
                    mid = lower + dm
                    row_total = tl.zeros_like(m)
                    for c0 in range(0, L, CHUNK):
                        s = _row_chunk(X, KEEP, rows, c0 + cols, R, L, s_xr, s_kr, s_kc, ACC, HAS_KEEP)
                        row_total += tl.sum(_unnormalised(_shifted(s, m, mid, 1.0, am1), inv_am1, KIND), 1)
                    lower = tl.where(redo & (row_total >= 1), mid, lower)
                    tau = tl.where(redo, mid, tau)
                    total = tl.where(redo, row_total, total)
            else:  # Newton over the whole row from the candidates' τ
                solved = ~redo
                active = redo
                steps = 0
                while (tl.max(active.to(tl.int32), 0) > 0) & (steps < STEPS):
                    f, slope, n, smallest = _no_sums(m, ACC)
                    for c0 in range(0, L, CHUNK):
                        s = _row_chunk(X, KEEP, rows, c0 + cols, R, L, s_xr, s_kr, s_kc, ACC, HAS_KEEP)
                        f, slope, n, smallest = _add_sums(s, _shifted(s, m, tau, 1.0, am1), f, slope, n, smallest,
                                                          inv_am1, ACC, KIND)
                    tau, active, solved = _newton_step(f, slope, n, smallest, m, tau, active, solved, 1.0, am1, tol,
                                                       KIND)
                    steps += 1
    if KIND != 2:
        total = m  # unused: the closed forms' p̃ sum to one
    # a row holding a NaN score gives NaN, as the top-k path does (the GPU's max and min pass NaN over: the row would
    # otherwise be solved without it)
    tau = tl.where(nan > 0, float("nan"), tau)
    out_ok = rows[:, None] < R
    if WHOLE:
        p = _row_probabilities(first, m, tau, total, am1, inv_am1, KIND, ENSURE_SUM_ONE)
        tl.store(OUT + rows[:, None] * s_xr + cols[None, :], p.to(OUT.dtype.element_ty),
                 mask=out_ok & (cols[None, :] < L))
    else:
        for c0 in range(0, L, CHUNK):
            s = _row_chunk(X, KEEP, rows, c0 + cols, R, L, s_xr, s_kr, s_kc, ACC, HAS_KEEP)
            p = _row_probabilities(s, m, tau, total, am1, inv_am1, KIND, ENSURE_SUM_ONE)
            tl.store(OUT + rows[:, None] * s_xr + (c0 + cols)[None, :], p.to(OUT.dtype.element_ty),
                     mask=out_ok & ((c0 + cols)[None, :] < L))


@triton.jit
def _row_probabilities(s, m, tau, total, am1, inv_am1, KIND: tl.constexpr, ENSURE_SUM_ONE: tl.constexpr):
    """p of a chunk of scores ``s`` from the row's ``m`` and τ; general α with ``ENSURE_SUM_ONE`` divided by ``total``
    (``Σ p̃``, as ``entmax_bisect`` does). A NaN τ (a row holding a NaN score) gives NaN everywhere in the row."""
    p = _unnormalised(_shifted(s, m, tau, 1.0, am1), inv_am1, KIND)
    if KIND == 2:
        if ENSURE_SUM_ONE:
            p = p / _positive(total)[:, None]
    return tl.where((tau != tau)[:, None], float("nan"), p)


@triton.jit
def _row_gppr(p, two_minus_alpha, KIND: tl.constexpr):
    """g = p^{2-α} of output probabilities, 0 off the support: :func:`_gppr` with sqrt(p) as 1.5-entmax's ``d``
    (sparsemax and general α read ``p`` there; a NaN p stays NaN for 1.5)."""
    if KIND == 0:
        return tl.sqrt(p)
    return _gppr(p, p, two_minus_alpha, KIND)


@triton.jit
def _backward_chunk(P, DY, rows, cols, R, L, s_pr, s_dr, two_minus_alpha, ACC: tl.constexpr, KIND: tl.constexpr):
    """``(g, dY, ok)`` of rows ``rows`` at columns ``cols`` (0 where there is no entry): what the backward sums and
    writes."""
    ok = (rows[:, None] < R) & (cols[None, :] < L)
    p = tl.load(P + rows[:, None] * s_pr + cols[None, :], mask=ok, other=0.0).to(ACC)
    dy = tl.load(DY + rows[:, None] * s_dr + cols[None, :], mask=ok, other=0.0).to(ACC)
    return _row_gppr(p, two_minus_alpha, KIND), dy, ok


@triton.jit
def rows_backward_kernel(
    P, DY, DX, R, L, s_pr, s_dr, s_gr, two_minus_alpha,
    ACC: tl.constexpr, KIND: tl.constexpr, ROWS: tl.constexpr, CHUNK: tl.constexpr, WHOLE: tl.constexpr,
):
    """``dX = g ⊙ dY - (Σ g dY / Σ g) g`` with ``g = p^{2-α}`` (entmax's Jacobian over the support; zero off it and on
    rows without any), from the forward's output ``P``: one sweep for the two sums and one for ``dX``, or one in
    all when the row fits a chunk (``WHOLE``)."""
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # R·L may pass 2^31
    cols = tl.arange(0, CHUNK)
    if WHOLE:  # one load
        g, dy, ok = _backward_chunk(P, DY, rows, cols, R, L, s_pr, s_dr, two_minus_alpha, ACC, KIND)
        c = tl.sum(g * dy, 1) / _positive(tl.sum(g, 1))
        tl.store(DX + rows[:, None] * s_gr + cols[None, :], (g * (dy - c[:, None])).to(DX.dtype.element_ty), mask=ok)
    else:
        gdy_sum = tl.zeros((ROWS,), ACC)
        g_sum = tl.zeros((ROWS,), ACC)
        for c0 in range(0, L, CHUNK):
            g, dy, _ = _backward_chunk(P, DY, rows, c0 + cols, R, L, s_pr, s_dr, two_minus_alpha, ACC, KIND)
            gdy_sum += tl.sum(g * dy, 1)
            g_sum += tl.sum(g, 1)
        c = gdy_sum / _positive(g_sum)
        for c0 in range(0, L, CHUNK):
            g, dy, ok = _backward_chunk(P, DY, rows, c0 + cols, R, L, s_pr, s_dr, two_minus_alpha, ACC, KIND)
            tl.store(DX + rows[:, None] * s_gr + (c0 + cols)[None, :], (g * (dy - c[:, None])).to(DX.dtype.element_ty),
                     mask=ok)


@triton.jit
def _positive(total):
    """``total`` where it is positive, else 1: a row without a support divides zeros by it."""
    return tl.where(total > 0, total, 1.0)
