"""Attention patterns as data: parse a spec string into a pattern, then ask it for a mask.

The registry :data:`PATTERN_KINDS` holds everything about a kind in one entry: how it is written (its usage string
gives the argument count), the least valid value of each argument, and what it keeps, either as a function of the
offset ``i - j`` alone (``window``, ``strided``, ...) or as a ``mask_mod`` plus its *tiles*, i.e. which
``block x block`` tiles of the attention matrix it can touch and which it fills completely, computed from
O((n / block)²) work. Composite kinds (``star``, ``longformer``, ``bigbird``) are written in the other kinds.

A parsed pattern answers three questions, and the block-sparse machinery in :mod:`hf_sparse.block_maps` does the
rest (one cached, exact tile map per pattern and length, from which the FlexAttention ``BlockMask``, the dense
boolean mask and the sparsity figures all derive, without evaluating the pattern on the whole ``n x n`` grid):

* ``mask_mod(n, device)``: the pure function ``(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's convention);
* ``offsets(d)``: the kept offsets ``d = i - j``, for patterns that depend on nothing else (``offset_only``);
* ``tiles(grid)``: ``(touched, full)`` tile maps, exact for every kind on its own and conservative (never wrong
  about what a tile may hold) for mixed unions and intersections; :mod:`hf_sparse.block_maps` makes them exact.

Specs (definitions follow SparseBERT's table) are combined with ``+`` (union) and ``&`` (intersection, binds
tighter): ``"window:64&learned+global:1"`` is ``(window ∩ learned) ∪ global``.

This module is imported by remote code, so it depends on torch, the standard library and siblings only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.attention.flex_attention import BlockMask, and_masks, or_masks

from .block_maps import TileGrid, cached, cached_block_map, cached_dense_mask, flex_block_mask, tiles_from_mask

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Tiles = tuple[torch.Tensor, torch.Tensor]  # (touched, full), bool, broadcastable to (H, blocks, blocks)


# --------------------------------------------------------------------------------------------------------------
# Tiles of the kinds that are not a function of the offset alone
# --------------------------------------------------------------------------------------------------------------


def _offset_tiles(keep_offset: Callable[[torch.Tensor], torch.Tensor], grid: TileGrid) -> Tiles:
    """Tiles of a pattern that depends on ``d = i - j`` only: a tile spans every offset between
    ``q_lo - k_hi`` and ``q_hi - k_lo``, so a prefix sum over the ``2n - 1`` offsets answers each tile in O(1)."""
    n = grid.n
    kept = keep_offset(torch.arange(-(n - 1), n, device=grid.device))
    kept = kept.expand(*kept.shape[:-1], 2 * n - 1) if kept.dim() else kept.expand(2 * n - 1)
    prefix = torch.nn.functional.pad(kept.long().cumsum(-1), (1, 0))  # prefix[..., i] = kept[..., :i].sum()
    lo = grid.q_lo[:, None] - grid.k_hi[None, :] + (n - 1)  # index of the smallest offset in each tile
    hi = grid.q_hi[:, None] - grid.k_lo[None, :] + (n - 1)
    count = prefix[..., hi + 1] - prefix[..., lo]
    touched = count > 0
    return touched, count == (hi - lo + 1)


def _global_tiles(a: tuple[int, ...], grid: TileGrid) -> Tiles:
    g = a[0]
    touched = (grid.q_lo[:, None] < g) | (grid.k_lo[None, :] < g)
    return touched, (grid.q_hi[:, None] < g) | (grid.k_hi[None, :] < g)


def _block_local_tiles(a: tuple[int, ...], grid: TileGrid) -> Tiles:
    s = a[0]
    q_first, q_last = grid.q_lo // s, grid.q_hi // s  # the pattern's blocks a tile row spans
    k_first, k_last = grid.k_lo // s, grid.k_hi // s
    touched = (q_first[:, None] <= k_last[None, :]) & (k_first[None, :] <= q_last[:, None])
    one_block = (q_first == q_last)[:, None] & (k_first == k_last)[None, :] & (q_first[:, None] == k_first[None, :])
    return touched, one_block


def _column_tiles(column_kept: torch.Tensor, grid: TileGrid) -> Tiles:
    """Tiles of a pattern that keeps whole key columns (``column_kept``: ``(n,)`` bool)."""
    prefix = torch.nn.functional.pad(column_kept.long().cumsum(0), (1, 0))
    count = prefix[grid.k_hi + 1] - prefix[grid.k_lo]
    width = grid.k_hi - grid.k_lo + 1
    rows = torch.ones_like(grid.q_lo, dtype=torch.bool)[:, None]
    return rows & (count > 0)[None, :], rows & (count == width)[None, :]


def _fixed_tiles(a: tuple[int, ...], grid: TileGrid) -> Tiles:
    """``fixed:L,C`` = ``block_local:L`` ∪ the summary columns ``j mod L >= L - C``."""
    block, columns = (
        _block_local_tiles(a[:1], grid),
        _column_tiles(torch.remainder(torch.arange(grid.n, device=grid.device), a[0]) >= a[0] - a[1], grid),
    )
    return union_tiles([block, columns])


def _random_tiles(a: tuple[int, ...], grid: TileGrid) -> Tiles:
    keys = random_keys(grid.n, a[0], a[1] if len(a) > 1 else 0, grid.device)  # (n, R)
    rows = torch.arange(grid.n, device=grid.device)[:, None].expand_as(keys) // grid.block
    counts = torch.zeros(grid.blocks, grid.blocks, dtype=torch.long, device=grid.device)
    counts.index_put_((rows.reshape(-1), (keys // grid.block).reshape(-1)), torch.ones_like(rows.reshape(-1)), True)
    return counts > 0, counts == grid.tile_sizes()


def union_tiles(parts: list[Tiles]) -> Tiles:
    """A tile is touched if any part touches it; it is surely full if any part fills it (maybe full otherwise)."""
    touched = torch.stack(torch.broadcast_tensors(*(t for t, _ in parts))).any(0)
    return touched, torch.stack(torch.broadcast_tensors(*(f for _, f in parts))).any(0)


def intersection_tiles(parts: list[Tiles]) -> Tiles:
    """A tile is full if every part fills it; it may be touched only if every part touches it."""
    touched = torch.stack(torch.broadcast_tensors(*(t for t, _ in parts))).all(0)
    return touched, torch.stack(torch.broadcast_tensors(*(f for _, f in parts))).all(0)


# --------------------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------------------


def _logsparse(d: torch.Tensor) -> torch.Tensor:
    d = d.abs()
    return (d & (d - 1)) == 0  # true for 0 and every power of two


@dataclass(frozen=True)
class Kind:
    """One registry entry: how it is written and what it keeps.

    ``usage`` is the spec's grammar (``"random:R[,SEED]"``: one required and one optional argument); ``minimum``
    the least valid value of each argument; ``check`` a further rule on the arguments (the bad value and why,
    or ``None``).
    What the kind keeps is given by exactly one of: ``offsets(args, d)`` (kept offsets ``d = i - j``),
    ``mask_mod(args, n, device)`` with ``tiles(args, grid)``, or ``spec(args)`` (a composite written in other
    kinds).
    """

    usage: str
    meaning: str
    minimum: tuple[int, ...] = ()
    check: Callable[[tuple[int, ...]], str | None] | None = None
    offsets: Callable[[tuple[int, ...], torch.Tensor], torch.Tensor] | None = None
    mask_mod: Callable[[tuple[int, ...], int, torch.device | str], MaskMod] | None = None
    tiles: Callable[[tuple[int, ...], TileGrid], Tiles] | None = None
    spec: Callable[[tuple[int, ...]], str] | None = None

    @property
    def arity(self) -> tuple[int, int]:
        """(fewest, most) arguments, read off the usage string."""
        _, _, args = self.usage.partition(":")
        required, _, optional = args.partition("[")
        low = len([a for a in required.split(",") if a])
        return low, low + len([a for a in optional.strip("]").split(",") if a])


PATTERN_KINDS: dict[str, Kind] = {
    "dense": Kind("dense", "every pair", offsets=lambda a, d: torch.ones((), dtype=torch.bool, device=d.device)),
    "no_diagonal": Kind("no_diagonal", "every pair except a token with itself (i != j)", offsets=lambda a, d: d != 0),
    "window": Kind("window:W", "|i-j| <= W", (0,), offsets=lambda a, d: d.abs() <= a[0]),
    "global": Kind(
        "global:G",
        "the first G tokens attend to and are attended by all",
        (0,),
        mask_mod=lambda a, n, device: lambda b, h, q, k: (q < a[0]) | (k < a[0]),
        tiles=_global_tiles,
    ),
    "strided": Kind(
        "strided:L",
        "|i-j| <= L or (i-j) mod L == 0",
        (1,),
        offsets=lambda a, d: (d.abs() <= a[0]) | (torch.remainder(d, a[0]) == 0),
    ),
    "fixed": Kind(
        "fixed:L,C",
        "same block of L (i//L == j//L) or j mod L >= L-C",
        (1, 0),
        check=lambda a: f"{a[1]} (C must be at most L={a[0]})" if a[1] > a[0] else None,
        mask_mod=lambda a, n, device: (
            lambda b, h, q, k: (q // a[0] == k // a[0]) | (torch.remainder(k, a[0]) >= a[0] - a[1])
        ),
        tiles=_fixed_tiles,
    ),
    "logsparse": Kind("logsparse", "|i-j| in {0, 1, 2, 4, 8, ...}", offsets=lambda a, d: _logsparse(d)),
    "dilated": Kind(
        "dilated:W,D",
        "|i-j| <= W*D and (i-j) mod D == 0",
        (0, 1),
        offsets=lambda a, d: (d.abs() <= a[0] * a[1]) & (torch.remainder(d, a[1]) == 0),
    ),
    "random": Kind(
        "random:R[,SEED]",
        "R random keys per query, drawn with SEED (default 0)",
        (0, 0),
        mask_mod=lambda a, n, device: _random_mask_mod(
            random_keys(n, a[0], a[1] if len(a) > 1 else 0, device)
        ),
        tiles=_random_tiles,
    ),
    "block_local": Kind(
        "block_local:B",
        "same block of B tokens (i//B == j//B)",
        (1,),
        mask_mod=lambda a, n, device: lambda b, h, q, k: q // a[0] == k // a[0],
        tiles=_block_local_tiles,
    ),
    "star": Kind("star", "|i-j| <= 1, plus the first token global", spec=lambda a: "window:1+global:1"),
    "longformer": Kind("longformer:W,G", "window:W + global:G", (0, 0), spec=lambda a: f"window:{a[0]}+global:{a[1]}"),
    "bigbird": Kind(
        "bigbird:W,G,R",
        "window:W + global:G + random:R",
        (0, 0, 0),
        spec=lambda a: f"window:{a[0]}+global:{a[1]}+random:{a[2]}",
    ),
    "causal": Kind("causal", "j <= i", offsets=lambda a, d: d >= 0),
    "learned": Kind("learned", "the frozen DAM mask stored in the checkpoint"),
}


def describe() -> str:
    """A table of every pattern spec, for error messages and ``hf-sparse patterns``."""
    rows = [f"  {kind.usage:<18} {kind.meaning}" for kind in PATTERN_KINDS.values()]
    return "\n".join(rows) + "\n  combine with '+' (union) and '&' (intersection), e.g. 'window:64+global:1'"


# --------------------------------------------------------------------------------------------------------------
# Random keys: per (seed, query position), among the sequence's own tokens
# --------------------------------------------------------------------------------------------------------------


def hash_uniform(a: torch.Tensor, b: torch.Tensor, seed: int) -> torch.Tensor:
    """A reproducible pseudo-random number in [0, 1) per pair of integers ``(a, b)`` (broadcast), from ``seed``:
    no generator state, so the number for a pair never depends on what else is drawn."""
    mask = 0xFFFFFFFF
    x = ((a * 73856093) ^ (b * 19349663) ^ ((seed + 1) * 83492791)) & mask
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & mask
    x = (x >> 16) ^ x
    return x.double() / float(1 << 32)


def draw_random_keys(
    lengths: torch.Tensor, n: int, keys_per_query: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``R`` distinct keys among ``lengths[b]`` for each of ``n`` queries of each row: ``(B, n, R)`` indices into
    the row's real tokens, and which slots hold a key (all but where the row has fewer than ``R`` tokens).

    Floyd's sampling, each step's uniform number a hash of (seed, query position, step): a query's keys depend on
    the seed, its position and the length of its own sequence, never on how far the batch is padded.
    """
    r = keys_per_query
    device = lengths.device
    ell = lengths.view(-1, 1).long()  # (B, 1)
    uniform = hash_uniform(torch.arange(n, device=device)[:, None], torch.arange(r, device=device)[None], seed)
    chosen = torch.zeros(ell.shape[0], n, r, dtype=torch.long, device=device)
    for step in range(r):
        top = ell - r + step  # draw from [0, top]; Floyd takes ``top`` itself if the draw was taken before
        pick = torch.floor(uniform[:, step][None] * (top + 1).clamp(min=1)).long()
        if step:
            pick = torch.where((chosen[..., :step] == pick[..., None]).any(-1), top.expand_as(pick), pick)
        chosen[..., step] = pick
    slots = torch.arange(r, device=device).view(1, 1, r)
    short = ell.view(-1, 1, 1) < r  # fewer tokens than R: every token
    chosen = torch.where(short, slots.expand_as(chosen), chosen)
    return chosen, (~short | (slots < ell.view(-1, 1, 1))).expand_as(chosen)


def random_keys(n: int, keys_per_query: int, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(n, min(R, n))`` distinct random key positions per query of an unpadded length-``n`` sequence
    (:func:`draw_random_keys`), cached in the bounded mask cache."""

    def draw() -> torch.Tensor:
        keys, _ = draw_random_keys(torch.tensor([n], device=device), n, keys_per_query, seed)
        return keys[0, :, : min(keys_per_query, n)]

    return cached(("random_keys", n, keys_per_query, seed, str(torch.device(device))), draw)


def _random_mask_mod(keys: torch.Tensor) -> MaskMod:
    """Query ``q`` keeps key ``k`` iff ``k`` is one of its drawn keys (``keys``: ``(n, R)``)."""
    return lambda b, h, q, k: (keys[q] == k.unsqueeze(-1)).any(-1)


# --------------------------------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------------------------------


class Pattern:
    """Base class: a pattern knows its spec, its ``mask_mod`` and its tiles for a sequence length."""

    #: number of heads the pattern distinguishes (``None``: the same mask for every head)
    num_heads: int | None = None

    def mask_mod(self, n: int, device: torch.device | str = "cpu") -> MaskMod:
        raise NotImplementedError

    @property
    def offset_only(self) -> bool:
        """True when what the pattern keeps depends on the offset ``i - j`` alone (see :meth:`offsets`)."""
        return False

    def offsets(self, d: torch.Tensor) -> torch.Tensor:
        """Kept offsets ``d = i - j`` (bool, broadcastable to ``d``), for an :attr:`offset_only` pattern."""
        raise NotImplementedError(f"pattern {self} does not depend on the offset alone")

    def tiles(self, grid: TileGrid) -> Tiles:
        raise NotImplementedError

    def cache_key(self) -> tuple:
        """What determines the pattern's masks (with the length and device): its spec, and for a learned part the
        identity and version of the mask tensor it is bound to."""
        return (str(self),)

    @property
    def cacheable(self) -> bool:
        """False for a pattern bound to a mask that changes at every step (the DAM search's): never cached."""
        return True

    def anchors(self) -> tuple:
        """Tensors :meth:`cache_key` names by address; a cache entry keeps them alive (no address reuse)."""
        return ()

    @property
    def has_random(self) -> bool:
        """True when a part draws random keys, which depend on each sequence's own length (:func:`bind_rows`)."""
        return False

    @property
    def per_row(self) -> bool:
        """True for a pattern bound to a batch's rows (:func:`bind_rows`): evaluated per batch, never cached."""
        return False

    @property
    def needs_learned_mask(self) -> bool:
        return False

    @property
    def is_dense(self) -> bool:
        """True when the pattern keeps every pair, so no mask needs to be built at all."""
        return False

    def __add__(self, other: Pattern) -> Pattern:
        return Union((self, other))

    def __and__(self, other: Pattern) -> Pattern:
        return Intersection((self, other))


@dataclass(frozen=True)
class Fixed(Pattern):
    """A parsed registry pattern such as ``window:64``."""

    name: str
    args: tuple[int, ...] = ()

    def __str__(self) -> str:
        return self.name + (":" + ",".join(map(str, self.args)) if self.args else "")

    @property
    def kind(self) -> Kind:
        return PATTERN_KINDS[self.name]

    @property
    def expanded(self) -> Pattern | None:
        """The pattern a composite kind stands for (``star`` → ``window:1+global:1``), else ``None``."""
        return _combine(self.kind.spec(self.args)) if self.kind.spec is not None else None

    @property
    def is_dense(self) -> bool:
        return self.name == "dense"

    @property
    def has_random(self) -> bool:
        return self.name == "random" or (self.expanded is not None and self.expanded.has_random)

    @property
    def offset_only(self) -> bool:
        return self.expanded.offset_only if self.expanded is not None else self.kind.offsets is not None

    def offsets(self, d: torch.Tensor) -> torch.Tensor:
        return self.expanded.offsets(d) if self.expanded is not None else self.kind.offsets(self.args, d)

    def mask_mod(self, n: int, device: torch.device | str = "cpu") -> MaskMod:
        kind, a = self.kind, self.args
        if self.expanded is not None:
            return self.expanded.mask_mod(n, device)
        if kind.offsets is not None:
            return lambda b, h, q, k: kind.offsets(a, q - k)
        return kind.mask_mod(a, n, device)

    def tiles(self, grid: TileGrid) -> Tiles:
        if self.expanded is not None:
            return self.expanded.tiles(grid)
        if self.kind.offsets is not None:
            return _offset_tiles(self.offsets, grid)
        return self.kind.tiles(self.args, grid)


@dataclass(frozen=True)
class Learned(Pattern):
    """A frozen DAM mask: ``mask`` is a bool tensor ``(H, n_max, n_max)``; ``None`` until one is bound.

    ``cacheable=False`` for a mask that lives one step (the DAM search's evaluation mask): caching it would only
    fill the cache with masks never seen again.
    """

    mask: torch.Tensor | None = field(default=None, compare=False)
    cache: bool = field(default=True, compare=False)

    @property
    def cacheable(self) -> bool:
        # a mask made under torch.inference_mode() has no version counter to key it by (and is not one a later
        # training step may keep for its backward)
        return self.cache and not (self.mask is not None and self.mask.is_inference())

    def __str__(self) -> str:
        return "learned"

    @property
    def needs_learned_mask(self) -> bool:
        return True

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        return None if self.mask is None else self.mask.shape[0]

    def cache_key(self) -> tuple:
        m = self._bound()
        version = -1 if m.is_inference() else m._version  # (not cacheable then)
        return ("learned", m.data_ptr(), tuple(m.shape), tuple(m.stride()), version, str(m.device))

    def anchors(self) -> tuple:
        return (self._bound(),)

    def _bound(self, n: int | None = None) -> torch.Tensor:
        if self.mask is None:
            raise ValueError(
                "attention_pattern 'learned' needs a frozen DAM mask, but none is stored: train with a `dam` "
                "config and call model.freeze_dam(), or load a checkpoint that was saved after freezing"
            )
        if n is not None and n > self.mask.shape[-1]:
            raise ValueError(f"the learned mask covers {self.mask.shape[-1]} positions; got a sequence of {n}")
        return self.mask

    def mask_mod(self, n: int, device: torch.device | str = "cpu") -> MaskMod:
        table = self._bound(n).to(device=device, dtype=torch.bool)
        return lambda b, h, q, k: table[h, q, k]

    def tiles(self, grid: TileGrid) -> Tiles:
        return tiles_from_mask(self._bound(grid.n)[:, : grid.n, : grid.n].to(grid.device, torch.bool), grid)


@dataclass(frozen=True)
class RowRandom(Pattern):
    """``random:R[,SEED]`` drawn for the rows of one batch (:func:`bind_rows`): ``keys`` ``(B, n, R)`` key
    positions, ``slots`` which of them hold a key."""

    spec: str
    keys: torch.Tensor = field(compare=False)
    slots: torch.Tensor = field(compare=False)

    def __str__(self) -> str:
        return self.spec

    @property
    def per_row(self) -> bool:
        return True

    @property
    def cacheable(self) -> bool:
        return False

    def mask_mod(self, n: int, device: torch.device | str = "cpu") -> MaskMod:
        keys, slots = self.keys.to(device), self.slots.to(device)
        return lambda b, h, q, k: ((keys[b, q] == k.unsqueeze(-1)) & slots[b, q]).any(-1)

    def tiles(self, grid: TileGrid) -> Tiles:
        raise ValueError(f"pattern {self.spec!r} bound to a batch's rows has no tile map: it runs on eager or sdpa")


@dataclass(frozen=True)
class Union(Pattern):
    parts: tuple[Pattern, ...]

    def __str__(self) -> str:
        return "+".join(map(str, self.parts))

    @property
    def is_dense(self) -> bool:
        return any(p.is_dense for p in self.parts)

    @property
    def needs_learned_mask(self) -> bool:
        return any(p.needs_learned_mask for p in self.parts)

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        return max((p.num_heads for p in self.parts if p.num_heads), default=None)

    def cache_key(self) -> tuple:
        return (type(self).__name__, *(p.cache_key() for p in self.parts))

    @property
    def cacheable(self) -> bool:
        return all(p.cacheable for p in self.parts)

    @property
    def has_random(self) -> bool:
        return any(p.has_random for p in self.parts)

    @property
    def per_row(self) -> bool:
        return any(p.per_row for p in self.parts)

    def anchors(self) -> tuple:
        return tuple(a for p in self.parts for a in p.anchors())

    @property
    def offset_only(self) -> bool:
        return all(p.offset_only for p in self.parts)

    def offsets(self, d: torch.Tensor) -> torch.Tensor:
        return torch.stack(torch.broadcast_tensors(d, *(p.offsets(d) for p in self.parts))[1:]).any(0)

    def mask_mod(self, n: int, device: torch.device | str = "cpu") -> MaskMod:
        return or_masks(*(p.mask_mod(n, device) for p in self.parts))

    def tiles(self, grid: TileGrid) -> Tiles:
        if self.offset_only:  # exact, where combining the parts' tiles is only conservative
            return _offset_tiles(self.offsets, grid)
        return union_tiles([p.tiles(grid) for p in self.parts])


@dataclass(frozen=True)
class Intersection(Union):
    def __str__(self) -> str:
        return "&".join(map(str, self.parts))

    @property
    def is_dense(self) -> bool:
        return all(p.is_dense for p in self.parts)

    def offsets(self, d: torch.Tensor) -> torch.Tensor:
        return torch.stack(torch.broadcast_tensors(d, *(p.offsets(d) for p in self.parts))[1:]).all(0)

    def mask_mod(self, n: int, device: torch.device | str = "cpu") -> MaskMod:
        return and_masks(*(p.mask_mod(n, device) for p in self.parts))

    def tiles(self, grid: TileGrid) -> Tiles:
        if self.offset_only:
            return _offset_tiles(self.offsets, grid)
        return intersection_tiles([p.tiles(grid) for p in self.parts])


# --------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------


def parse(spec: str | Pattern) -> Pattern:
    """Parse a spec such as ``"bigbird:3,1,2"`` or ``"window:64&learned+global:1"``.

    Raises ``ValueError`` naming the bad part and listing what would be valid.
    """
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"attention pattern must be a non-empty string, got {spec!r}. Valid patterns:\n{describe()}")
    pattern = _combine(spec)
    _check_keeps_a_pair(pattern, spec)
    return pattern


def _combine(spec: str) -> Pattern:
    """The parts of ``spec`` parsed and combined, unchecked as a whole: :func:`parse` checks a user's spec once;
    a composite kind's expansion (:attr:`Fixed.expanded`, read on every use) is not checked again."""
    unions = []
    for union_part in spec.split("+"):
        inters = [_parse_one(p, spec) for p in union_part.split("&")]
        unions.append(inters[0] if len(inters) == 1 else Intersection(tuple(inters)))
    return unions[0] if len(unions) == 1 else Union(tuple(unions))


#: the length at which :func:`parse` checks that a pattern keeps some pair: each kind with valid arguments keeps
#: one at every length from 2 (from 1 but ``no_diagonal``), so a combination keeping none here keeps none anywhere
#: but by accident of its random draws
EMPTY_CHECK_LENGTH = 64


def _check_keeps_a_pair(pattern: Pattern, spec: str) -> None:
    """Refuse a pattern that keeps no pair of positions (``global:0``, ``random:0``, ``no_diagonal&window:0``):
    every query would attend to nothing and every attention output would be zero, silently. A ``learned`` part is
    a checkpoint's mask, unknown here: such a spec is not checked."""
    if pattern.needs_learned_mask:
        return
    # on the CPU by name: a model built on the meta device (from_pretrained) parses its config there too
    positions = torch.arange(EMPTY_CHECK_LENGTH, device="cpu")
    zero = torch.zeros((), dtype=torch.long, device="cpu")
    kept = pattern.mask_mod(EMPTY_CHECK_LENGTH, "cpu")(zero, zero, positions[:, None], positions[None, :])
    if not bool(kept.any()):
        raise ValueError(
            f"attention pattern {spec!r} keeps no pair of positions (checked at length {EMPTY_CHECK_LENGTH}): "
            f"every query would attend to nothing. Valid patterns:\n{describe()}"
        )


#: the largest argument a pattern takes: positions are indexed with int64, and no model is longer than this
MAX_ARGUMENT = 2**31 - 1


def parse_fixed(spec: str, instead: str, name: str = "pattern") -> Pattern:
    """:func:`parse`, refusing a ``learned`` part: that is a frozen DAM mask stored in a checkpoint, which a run
    given a pattern to train with has none of, so it would fail only after its training. ``instead`` says what to
    do; ``name`` names the value (``--pattern`` on the command line)."""
    pattern = parse(spec)
    if pattern.needs_learned_mask:
        raise ValueError(
            f"{name} {spec!r}: 'learned' is a DAM mask stored in a checkpoint, not a fixed pattern; {instead}"
        )
    return pattern


def _parse_one(part: str, spec: str) -> Pattern:
    part = part.strip()
    name, _, arg_text = part.partition(":")
    name = name.strip()
    where = f"in attention pattern {spec!r}" if part != spec.strip() else "as attention pattern"
    if name not in PATTERN_KINDS:
        raise ValueError(f"unknown pattern {name!r} {where}. Valid patterns:\n{describe()}")
    kind = PATTERN_KINDS[name]
    texts = [t.strip() for t in arg_text.split(",")] if arg_text.strip() else []
    low, high = kind.arity
    if not low <= len(texts) <= high:
        count = str(low) if low == high else f"{low} to {high}"
        raise ValueError(f"pattern {part!r} {where} takes {count} argument(s); write it as {kind.usage!r}")
    try:
        args = tuple(int(t) for t in texts)
    except ValueError:
        raise ValueError(
            f"pattern {part!r} {where} has a non-integer argument; write it as {kind.usage!r} with whole numbers"
        ) from None
    bad = [x for x, least in zip(args, kind.minimum) if not least <= x <= MAX_ARGUMENT]
    if bad:
        raise ValueError(
            f"pattern {part!r} {where} has an out-of-range argument {bad[0]}; {kind.usage}: {kind.meaning} "
            f"(arguments from {kind.minimum} up to {MAX_ARGUMENT})"
        )
    problem = kind.check(args) if kind.check is not None else None
    if problem:
        raise ValueError(
            f"pattern {part!r} {where} has an out-of-range argument {problem}; {kind.usage}: {kind.meaning}"
        )
    if name == "learned":
        return Learned()
    return Fixed(name, args)


def bind_learned(pattern: Pattern, mask: torch.Tensor | None) -> Pattern:
    """Return ``pattern`` with every ``learned`` part bound to ``mask`` (``(H, n, n)`` bool)."""
    if isinstance(pattern, Learned):
        return Learned(mask)
    if isinstance(pattern, Union):  # Intersection too
        return type(pattern)(tuple(bind_learned(p, mask) for p in pattern.parts))
    return pattern


def bind_rows(pattern: Pattern, key_valid: torch.Tensor) -> Pattern:
    """``pattern`` with every random part drawn for the rows of a batch: query ``i`` of row ``b`` gets ``R`` keys
    among that row's real tokens (``key_valid`` ``(B, n)`` bool), so a sentence attends to the same keys however
    far its batch is padded."""
    if isinstance(pattern, Fixed) and pattern.name == "random":
        valid = key_valid.to(torch.bool)
        r, seed = pattern.args[0], pattern.args[1] if len(pattern.args) > 1 else 0
        chosen, slots = draw_random_keys(valid.sum(-1), valid.shape[-1], r, seed)
        positions = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)  # real tokens first, in order
        keys = positions.gather(1, chosen.clamp(max=valid.shape[-1] - 1).flatten(1)).view_as(chosen)
        return RowRandom(str(pattern), keys, slots)  # (slots past a short row's tokens hold no key)
    if isinstance(pattern, Fixed) and pattern.expanded is not None:
        return bind_rows(pattern.expanded, key_valid)
    if isinstance(pattern, Union):  # Intersection too
        return type(pattern)(tuple(bind_rows(p, key_valid) for p in pattern.parts))
    return pattern


def rows_mask(
    pattern: Pattern, n: int, device: torch.device | str, batch: int, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """Rows ``start:stop`` of a batch-bound pattern's mask, ``(B, H|1, stop - start, n)`` bool, evaluated directly
    (a pattern bound to one batch is never cached)."""
    stop = n if stop is None else stop
    h = torch.arange(pattern.num_heads or 1, device=device).view(1, -1, 1, 1)
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    q = torch.arange(start, stop, device=device).view(1, 1, -1, 1)
    k = torch.arange(n, device=device).view(1, 1, 1, -1)
    return pattern.mask_mod(n, device)(b, h, q, k).expand(batch, h.shape[1], stop - start, n)


def without_learned(pattern: Pattern) -> Pattern:
    """``pattern`` with every ``learned`` part keeping every pair: the fixed pattern a DAM mask lives inside."""
    if isinstance(pattern, Learned):
        return Fixed("dense")
    if isinstance(pattern, Union):  # Intersection too
        return type(pattern)(tuple(without_learned(p) for p in pattern.parts))
    return pattern


# --------------------------------------------------------------------------------------------------------------
# Masks (all derived from the pattern's cached block map, see hf_sparse.block_maps)
# --------------------------------------------------------------------------------------------------------------


def dense_mask(pattern: str | Pattern, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean keep-mask of shape ``(H, n, n)``; ``H`` is 1 unless the pattern differs between heads.

    A fresh tensor (the cached one stays untouched); models use the cached mask directly.
    """
    return cached_dense_mask(parse(pattern), n, device).clone()


def block_mask(
    pattern: str | Pattern,
    n: int,
    device: torch.device | str = "cpu",
    key_valid: torch.Tensor | None = None,
    block_size: int = 128,
) -> BlockMask:
    """FlexAttention ``BlockMask`` of the pattern, intersected with ``key_valid`` (``(B, n)`` bool) if given."""
    return flex_block_mask(parse(pattern), n, device, key_valid, block_size)


def sparsity(pattern: str | Pattern, n: int) -> float:
    """Fraction of the ``n x n`` attention matrix the pattern removes (averaged over heads)."""
    return 1.0 - cached_block_map(parse(pattern), n, "cpu").density()


def block_density(pattern: str | Pattern, n: int, block_size: int = 128) -> float:
    """Fraction of ``block_size`` tiles with at least one kept pair: the work a block-sparse kernel does."""
    return cached_block_map(parse(pattern), n, "cpu", block_size).block_density()
