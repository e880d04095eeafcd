"""Allowed (query, key) pairs given by per-token codes, which the fused kernel compares inside its tiles.

Sparsefinder's predictors decide a pair from two small per-token summaries: the clusters a query and a key belong
to (``clustering``, ``routing``), their buckets per projected dimension (``quantization``) or per hash round
(``lsh``), their projected coordinates (``distance``), and their distance in positions (the window every method
adds). Written out as an element mask that is ``B·H·Lq·Lk`` bytes, built and then read tile by tile: on an H200
the fused kernel on such a mask was 3-5 times slower than on every pair (``benchmarks/gpu.md``, "Sparsefinder's
predicted pairs"). :class:`PairCodes` hands the kernel the summaries instead, ``O((Lq + Lk)·W)`` numbers, and the
kernel tests each pair of a tile it reads from them (:func:`hf_sparse.entmax_triton_kernels._codes_match`); the
tiles that can hold a pair come from per-tile unions of the same summaries (:meth:`PairCodes.tiles`), so nothing
of size ``Lq x Lk`` exists.

A pair ``(i, j)`` is allowed when both tokens are real (position ``>= 0``) and

* some word ``w`` of the codes matches: ``queries[i, w] & keys[j, w] != 0`` (``match="bits"``: membership sets,
  one bit per cluster) or ``queries[i, w] == keys[j, w]`` (``match="equal"``: bucket ids), or
* (``match="distance"``: ``r`` coordinates and a constant per token, floats) the key's constant plus the
  products of the coordinates reaches the query's constant, ``keys[j, r] + Σ_t queries[i, t]·keys[j, t] >=
  queries[i, r]`` (:func:`distance_pairs`: Sparsefinder's ``||q' - k'|| <= t`` as ``[q', |q'|² - t²]`` and
  ``[2k', -|k'|²]``), or
* ``|query_position[i] - key_position[j]| <= window``.

The distance test is exact arithmetic wherever it runs: coordinates are rounded to float32, so each product is
exact in float64 (24 + 24 significant bits), and the sum starts from the key's float64 constant and adds the
products in coordinate order. Torch and the kernel (fused multiply-adds or not: the products are exact) then
compute the same bits, so a pair on the threshold is decided the same way by every execution.

Causality, key lengths and block masks of :func:`hf_sparse.entmax_triton.entmax_attention` apply on top, as for an
element mask. :meth:`PairCodes.pairs` writes the same rule out densely, for tests and small inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

MATCHES = ("bits", "equal", "distance")
# The kernels read at most this many int32 words per token (one compile-time loop; the kernel's pair test packs the
# count with the match kind and the window into one compile-time integer, see PairCodes.pair_test). A distance code
# of r coordinates takes 2 (r + 1): its coordinates and its constant as float64, two words each, so r <= 14.
MAX_WORDS = 31
# Per-tile unions of "equal" codes are sets over code % EQUAL_SET_BINS: a superset of the tile's pairs when codes
# collide, exact for codes below it (quantization's and LSH's buckets usually are); "bits" codes use their 32 bits.
EQUAL_SET_BINS = 256


@dataclass(frozen=True, eq=False)  # eq=False: tensors do not compare to one bool
class PairCodes:
    """Per-token codes of the allowed pairs (module docstring).

    Attributes:
        queries: ``(B|1, H|1, Lq, W)`` integer codes of the queries (int32 range; ``W <=`` :data:`MAX_WORDS`,
            ``W = 0`` for a window alone); for ``match="distance"`` floats, ``W = r + 1`` (``r >= 1`` coordinates,
            then the constant; ``2 (r + 1) <=`` :data:`MAX_WORDS`).
        keys: ``(B|1, H|1, Lk, W)`` codes of the keys.
        match: ``"bits"``, ``"equal"`` or ``"distance"`` (how two tokens' codes match, module docstring).
        window: also allow ``|query_position - key_position| <= window`` (``None``: no window).
        query_positions: ``(B|1, Lq)`` integer absolute positions of the queries, negative for padding (a query
            with no pair: its output is zero). Default: the last ``Lq`` of ``Lk`` positions, as the kernel's
            ``causal`` places them.
        key_positions: ``(B|1, Lk)``, negative for padding keys. Default ``0 .. Lk - 1``.
    """

    queries: torch.Tensor
    keys: torch.Tensor
    match: str = "bits"
    window: int | None = None
    query_positions: torch.Tensor | None = None
    key_positions: torch.Tensor | None = None

    def check(self, batch: int, heads: int, num_queries: int, num_keys: int) -> None:
        """Raises ``ValueError`` naming what does not fit attention of this shape."""
        if self.match not in MATCHES:
            raise ValueError(f"PairCodes.match must be one of {', '.join(MATCHES)}, got {self.match!r}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 0):
            raise ValueError(f"PairCodes.window must be None or a whole number >= 0, got {self.window!r}")
        distance = self.match == "distance"
        kind, words = ("a floating", "r + 1") if distance else ("an integer", "words")
        for name, codes, length in (("queries", self.queries, num_queries), ("keys", self.keys, num_keys)):
            if not _tensor_of(codes, ((1, batch), (1, heads), (length,), None), floating=distance):
                raise ValueError(
                    f"PairCodes.{name} must be {kind} tensor of shape ({batch} or 1, {heads} or 1, {length}, "
                    f"{words}) for match={self.match!r}, got {_described(codes)}"
                )
        if distance and not 2 <= self.queries.shape[3] == self.keys.shape[3] <= MAX_WORDS // 2:
            raise ValueError(
                f"PairCodes.queries and keys of match='distance' must have the same r + 1 columns (r coordinates, "
                f"then the constant), 2 to {MAX_WORDS // 2}, got {self.queries.shape[3]} and {self.keys.shape[3]}"
            )
        if self.queries.shape[3] != self.keys.shape[3] or self.queries.shape[3] > MAX_WORDS:
            raise ValueError(
                f"PairCodes.queries and keys must have the same number of code words, at most {MAX_WORDS}, got "
                f"{self.queries.shape[3]} and {self.keys.shape[3]}"
            )
        for name, positions, length in (
            ("query_positions", self.query_positions, num_queries),
            ("key_positions", self.key_positions, num_keys),
        ):
            if positions is not None and not _tensor_of(positions, ((1, batch), (length,))):
                raise ValueError(
                    f"PairCodes.{name} must be an integer tensor of shape ({batch} or 1, {length}) (negative: "
                    f"padding), got {_described(positions)}"
                )

    @property
    def words(self) -> int:
        """int32 words per token the kernels read before its position (:meth:`packed`): a distance code's columns
        are float64, two words each."""
        return self.queries.shape[3] * (2 if self.match == "distance" else 1)

    def pair_test(self) -> int:
        """The kernels' compile-time ``PAIR_TEST`` for these codes: ``2 + MATCH + 3·WORDS + 96·(WINDOW + 1)``
        (``MATCH`` the index in :data:`MATCHES`; ``WINDOW`` -1 for none). 0 and 1 are the kernels' other tests
        (none; an element mask). One integer, so that every helper of the kernels that tests pairs takes one
        argument."""
        window = -1 if self.window is None else self.window
        return 2 + MATCHES.index(self.match) + 3 * self.words + 96 * (window + 1)

    def _positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key positions, ``(B|1, Lq)`` and ``(B|1, Lk)`` int64 on the codes' device, padding as -1."""
        lq, lk, device = self.queries.shape[2], self.keys.shape[2], self.queries.device
        q = self.query_positions if self.query_positions is not None else torch.arange(lk - lq, lk, device=device)[None]
        k = self.key_positions if self.key_positions is not None else torch.arange(lk, device=device)[None]
        return tuple(p.to(device=device, dtype=torch.int64).clamp_min(-1) for p in (q, k))

    def _batch_and_heads(self, qpos: torch.Tensor, kpos: torch.Tensor) -> tuple[int, int]:
        """``B'`` and ``H'``: the batch and heads the codes and positions broadcast to."""
        b = max(self.queries.shape[0], self.keys.shape[0], qpos.shape[0], kpos.shape[0])
        return b, max(self.queries.shape[1], self.keys.shape[1])

    def packed(self) -> torch.Tensor:
        """int32 ``(B', H', words + 1, T)``, as the kernels read them: word ``w`` of every query then of every key
        (consecutive tokens side by side: a thread's neighbouring key columns load together), then the positions;
        ``T`` is ``Lq + Lk`` rounded up to even, so that every row starts 8-byte aligned. Distance codes are float64
        rows, each the two int32 rows it spans: the float32-rounded coordinates, then the constant."""
        qpos, kpos = self._positions()
        b, h = self._batch_and_heads(qpos, kpos)
        lq, lk = qpos.shape[1], kpos.shape[1]
        pad = (lq + lk) % 2
        positions = torch.cat([qpos.expand(b, -1), kpos.expand(b, -1)], 1)[:, None, None].expand(b, h, 1, -1)
        tokens = torch.cat([c.to(qpos.device).expand(b, h, -1, -1) for c in (self.queries, self.keys)], dim=2)
        if self.match == "distance":
            coordinates, constant = _distance_parts(tokens)
            rows = torch.cat([coordinates.double(), constant], -1).transpose(2, 3)  # (B', H', r + 1, Lq + Lk)
            words = nn.functional.pad(rows, (0, pad)).contiguous().view(torch.int32).reshape(b, h, self.words, -1)
        else:
            words = nn.functional.pad(_as_int32(tokens).transpose(2, 3), (0, pad))
        positions = nn.functional.pad(positions.to(torch.int32), (0, pad), value=-1)
        return torch.cat([words, positions], dim=2).contiguous()

    def pairs(self) -> torch.Tensor:
        """The allowed pairs written out, bool ``(B', H', Lq, Lk)`` (the same rule as the kernels; for tests and
        small inputs)."""
        qpos, kpos = self._positions()
        if self.match == "distance":
            hit = distance_pairs(self.queries.to(qpos.device), self.keys.to(qpos.device))
        else:
            q = _as_int32(self.queries)[..., :, None, :]
            k = _as_int32(self.keys.to(qpos.device))[..., None, :, :]
            hit = (((q & k) != 0) if self.match == "bits" else (q == k)).any(-1)
        if self.window is not None:
            hit = hit | ((qpos[:, None, :, None] - kpos[:, None, None, :]).abs() <= self.window)
        return hit & (qpos[:, None, :, None] >= 0) & (kpos[:, None, None, :] >= 0)

    @torch.no_grad()
    def tiles(self, mask_block: int) -> torch.Tensor:
        """bool ``(B', H', ceil(Lq / mask_block), ceil(Lk / mask_block))``: the tiles that can hold an allowed pair
        (a superset: every tile holding one is True), from per-tile unions, without any ``Lq x Lk`` tensor and
        without reading the device.

        A tile's code sets are the union of its real tokens' (bits: the set bits of each word; equal: each word's
        code modulo :data:`EQUAL_SET_BINS`); two tiles share a code when their sets intersect (a product of the
        0/1 set indicators). Distance codes bound the test over each pair of tiles from their coordinates' boxes
        (:func:`_distance_tiles`: a loose bound, among whose tiles :func:`hf_sparse.entmax_triton.entmax_attention`
        finds those holding a pair with a first kernel). The window holds where the tiles' real positions come within
        ``window`` of each other (their spans, ``min`` to ``max``)."""
        qpos, kpos = self._positions()
        b, h = self._batch_and_heads(qpos, kpos)
        n_q, n_k = math.ceil(qpos.shape[1] / mask_block), math.ceil(kpos.shape[1] / mask_block)
        tiles = torch.zeros(b, h, n_q, n_k, dtype=torch.bool, device=qpos.device)
        if self.match == "distance":
            tiles = tiles | _distance_tiles(self.queries.to(qpos.device), self.keys.to(qpos.device), qpos, kpos,
                                            mask_block)
        elif self.words:
            q_sets = self._tile_sets(self.queries, qpos, mask_block)
            k_sets = self._tile_sets(self.keys.to(qpos.device), kpos, mask_block)
            tiles = tiles | (torch.matmul(q_sets, k_sets.transpose(-1, -2)) > 0)
        if self.window is not None:
            q_low, q_high = _tile_spans(qpos, mask_block)  # (B|1, n_q)
            k_low, k_high = _tile_spans(kpos, mask_block)
            near = (q_low[:, :, None] - k_high[:, None, :] <= self.window) & (
                k_low[:, None, :] - q_high[:, :, None] <= self.window
            )
            tiles = tiles | near[:, None]
        return tiles

    def _tile_sets(self, codes: torch.Tensor, positions: torch.Tensor, mask_block: int) -> torch.Tensor:
        """float ``(B', H', ceil(L / mask_block), S)``: 0/1 indicators of the union of each tile's real tokens' code
        sets (see :meth:`tiles`), written per tile directly (no ``L x S`` one-hot of an ``equal`` code)."""
        words = _as_int32(codes).to(torch.int64)
        real = (positions >= 0)[:, None, :, None].to(torch.float32)  # (B|1, 1, L, 1)
        length = words.shape[2]
        n = math.ceil(length / mask_block)
        if self.match == "bits":
            bits = (words[..., None] >> torch.arange(32, device=words.device)) & 1  # bit 31 of a negative word too
            sets = nn.functional.pad(bits.flatten(-2) * real, (0, 0, 0, n * mask_block - length))
            return sets.view(*sets.shape[:2], n, mask_block, sets.shape[-1]).amax(3)
        b, h = max(words.shape[0], real.shape[0]), words.shape[1]
        size = words.shape[3] * EQUAL_SET_BINS  # S: a block of bins per word
        tile = (torch.arange(length, device=words.device) // mask_block)[:, None]
        word = torch.arange(words.shape[3], device=words.device) * EQUAL_SET_BINS
        slot = (tile * size + word + torch.remainder(words, EQUAL_SET_BINS)).expand(b, h, -1, -1)
        sets = torch.zeros(b, h, n * size, device=words.device)
        sets.scatter_reduce_(2, slot.flatten(2), real.expand(b, h, length, words.shape[3]).flatten(2), "amax")
        return sets.view(b, h, n, size)


def distance_pairs(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """bool ``(..., Lq, Lk)``: the pairs of distance codes ``(..., Lq, r + 1)`` and ``(..., Lk, r + 1)`` that
    match, ``keys[j, r] + Σ_t queries[i, t]·keys[j, t] >= queries[i, r]``, computed as the kernels do (module
    docstring): float32 coordinates, exact float64 products added to the key's float64 constant in coordinate
    order (``addcmul``: whether it fuses the multiply-add changes no bit, the product being exact). ``r`` in-place
    passes over one ``(..., Lq, Lk)`` float64 tensor: for one block of queries at a time."""
    q_coordinates, q_constant = _distance_parts(queries)
    k_coordinates, k_constant = _distance_parts(keys)
    q_coordinates, k_coordinates = q_coordinates.double(), k_coordinates.double()
    total = torch.addcmul(k_constant.transpose(-1, -2), q_coordinates[..., :, 0, None], k_coordinates[..., None, :, 0])
    for t in range(1, q_coordinates.shape[-1]):
        total.addcmul_(q_coordinates[..., :, t, None], k_coordinates[..., None, :, t])
    return total >= q_constant


def _distance_parts(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance codes ``(..., L, r + 1)`` → their float32 coordinates ``(..., L, r)`` and float64 constant
    ``(..., L, 1)``."""
    return codes[..., :-1].float(), codes[..., -1:].double()


def _distance_tiles(
    queries: torch.Tensor, keys: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, mask_block: int
) -> torch.Tensor:
    """bool ``(B', H', n_q, n_k)``: the pairs of tiles where some pair of distance codes can match, from each tile's
    box (the smallest and largest of each coordinate over its real tokens) and its extreme constant: the largest
    ``keys[j, r] + Σ_t q_t k_t - queries[i, r]`` over the boxes is at most the largest key constant, less the
    smallest query constant, plus per coordinate the largest of the four corner products. A margin of 1e-12 of the
    terms' magnitudes covers the rounding of that sum and of the pairs' own (about ``r·2⁻⁵³`` of it)."""

    def boxes(codes: torch.Tensor, positions: torch.Tensor, largest: bool):
        coordinates, constant = _distance_parts(codes)
        coordinates = coordinates.double()
        length = coordinates.shape[2]
        pad = -length % mask_block
        real = (positions >= 0)[:, None, :, None]  # (B|1, 1, L, 1)
        any_real = nn.functional.pad(positions >= 0, (0, pad)).view(positions.shape[0], 1, -1, mask_block).any(-1)

        def per_tile(x: torch.Tensor, empty: float, reduce) -> torch.Tensor:
            x = nn.functional.pad(torch.where(real, x, empty), (0, 0, 0, pad), value=empty)
            return reduce(x.view(*x.shape[:2], -1, mask_block, x.shape[-1]), 3)

        low = per_tile(coordinates, math.inf, torch.amin)
        high = per_tile(coordinates, -math.inf, torch.amax)
        extreme = per_tile(constant, -math.inf if largest else math.inf, torch.amax if largest else torch.amin)
        empty = ~any_real  # a tile of padding: finite stand-ins, left out below
        extreme = extreme.squeeze(-1).masked_fill(empty, 0)
        return low.masked_fill(empty[..., None], 0), high.masked_fill(empty[..., None], 0), extreme, any_real

    q_low, q_high, q_least, q_real = boxes(queries, qpos, largest=False)
    k_low, k_high, k_most, k_real = boxes(keys, kpos, largest=True)
    top = k_most[..., None, :] - q_least[..., :, None]
    size = k_most.abs()[..., None, :] + q_least.abs()[..., :, None]
    for t in range(q_low.shape[-1]):
        ql, qh = q_low[..., :, None, t], q_high[..., :, None, t]
        kl, kh = k_low[..., None, :, t], k_high[..., None, :, t]
        most = torch.maximum(torch.maximum(ql * kl, ql * kh), torch.maximum(qh * kl, qh * kh))
        top = top + most
        size = size + torch.maximum(ql.abs(), qh.abs()) * torch.maximum(kl.abs(), kh.abs())
    return (top + 1e-12 * size >= 0) & q_real[..., :, None] & k_real[..., None, :]


def _tensor_of(t, sizes: tuple, floating: bool = False) -> bool:
    """Whether ``t`` is an integer (``floating``: a floating) tensor with one dimension per entry of ``sizes``, each
    of a size that entry allows (``None``: any)."""
    return (
        isinstance(t, torch.Tensor)
        and t.dtype.is_floating_point == floating
        and t.dtype != torch.bool
        and t.dim() == len(sizes)
        and all(allowed is None or size in allowed for size, allowed in zip(t.shape, sizes))
    )


def _described(t) -> object:
    return (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else t


def _as_int32(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes → their low 32 bits as int32 (two's complement), what the kernels compare."""
    low = torch.remainder(codes.to(torch.int64), 1 << 32)
    return torch.where(low >= 1 << 31, low - (1 << 32), low).to(torch.int32)


def _tile_spans(positions: torch.Tensor, mask_block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest real position per tile, ``(B|1, n)`` each; a tile without one gets an empty span
    (``low`` far above ``high``), which no window reaches."""
    far = 1 << 40
    pad = -positions.shape[1] % mask_block
    real = positions >= 0
    low = torch.where(real, positions, far)
    high = torch.where(real, positions, -far)
    low = nn.functional.pad(low, (0, pad), value=far).view(positions.shape[0], -1, mask_block).amin(-1)
    high = nn.functional.pad(high, (0, pad), value=-far).view(positions.shape[0], -1, mask_block).amax(-1)
    return low, high
