"""Patterns at tile granularity, built once per (pattern, length, device) and cached: the source of every mask.

A *block map* says, for each ``block x block`` tile of the ``n x n`` attention matrix (and each head, for a
pattern that differs between heads), whether the pattern keeps every pair of the tile (*full*), none (*empty*) or
some (*partial*), and holds the exact content of the partial tiles. It is built from the pattern's analytic tiles
(:meth:`hf_sparse.patterns.Pattern.tiles`, O((n / block)²) work) by evaluating the pattern's ``mask_mod`` on the
tiles that are neither surely full nor surely empty, so a ``window:64`` at n = 16384 evaluates three tiles per tile
row instead of 268 million pairs. Identical tiles are stored once.

Everything else derives from it, without evaluating the pattern again:

* the FlexAttention ``BlockMask`` (:meth:`BlockMap.block_mask`). On CUDA its ``mask_mod`` looks the partial tiles
  up in cached tensors, so a pattern reaches the compiled kernel as *data* through one and the same function
  and any number of such patterns in one process compile as one (a pattern's own ``mask_mod`` is new code to
  dynamo); patterns of the offset ``i - j`` alone take their own closed form, which is 4-6x faster in the kernel
  and compiles once per pattern. See :func:`tile_lookup_in_kernel`. Padding is applied per batch on the cached
  structure (key blocks with no valid key are skipped, partly padded ones become partial);
* the gather layout of the ``tiles`` kernel (:meth:`BlockMap.tile_layout`);
* the dense boolean mask for the eager and SDPA kernels (:meth:`BlockMap.dense`), copied tile row by tile row;
* the sparsity and block-density figures (:meth:`BlockMap.density`, :meth:`BlockMap.block_density`).

One bounded LRU cache (:data:`CACHE`) holds all of these and random-key draws, keyed by
what determines them (the pattern's spec, or the identity and version of a learned mask tensor; the length; the
device), never by a pattern object. Imported by remote code: torch and the standard library only.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.attention.flex_attention import BlockMask

DEFAULT_BLOCK_SIZE = 128  # FlexAttention's tile


def device_key(device: torch.device | str) -> str:
    """``"cuda"`` and ``"cuda:0"`` are the same device to the cache."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


# --------------------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------------------


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, BlockMap):
        return sum(_nbytes(t) for t in (value.full, value.partial, value.tile_id, value.bits))
    if isinstance(value, TileLayout):
        return sum(_nbytes(t) for g in value.groups for t in (g.rows, g.columns, g.slots) if t is not None)
    if isinstance(value, BlockMask):
        return sum(_nbytes(t) for t in value.as_tuple() if isinstance(t, torch.Tensor))
    return 0


class MaskCache:
    """Least-recently-used cache bounded by entry count and by tensor bytes.

    Lengths vary from batch to batch, so without a bound every length ever seen would stay in memory.
    ``hits``/``builds`` count lookups (tests and benchmarks read them).
    """

    def __init__(self, max_entries: int = 256, max_bytes: int = 1 << 30):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple, tuple[Any, int, tuple]] = OrderedDict()
        self.bytes = 0
        self.hits = self.builds = 0

    def get(self, key: tuple, build: Callable[[], Any], anchors: tuple = ()) -> Any:
        """``anchors``: objects the key names by address (a learned mask tensor): kept alive with the entry, so
        that no other tensor can take their address and be served this entry."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]
        with torch.inference_mode(False):  # a mask built under inference_mode would break a later training step
            value = build()
        self.builds += 1
        size = _nbytes(value) + sum(_nbytes(a) for a in anchors)  # an anchor shared by entries counts in each
        self._entries[key] = (value, size, anchors)
        self.bytes += size
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or self.bytes > self.max_bytes):
            _, (_, dropped, _) = self._entries.popitem(last=False)
            self.bytes -= dropped
        return value

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)


CACHE = MaskCache()


def cached(key: tuple, build: Callable[[], Any], cacheable: bool = True, anchors: tuple = ()) -> Any:
    """``build()`` once per ``key`` while it stays in :data:`CACHE` (every time if not ``cacheable``)."""
    return CACHE.get(key, build, anchors) if cacheable else build()


def _cached_for(pattern, what: str, n: int, device, block: int, build: Callable[[], Any]) -> Any:
    """:func:`cached` under the pattern's key, anchoring the tensors that key names by address."""
    return cached(_key(what, pattern, n, device, block), build, pattern.cacheable, pattern.anchors())


# --------------------------------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TileGrid:
    """The tiles of an ``n x n`` matrix: tile row ``r`` holds queries ``q_lo[r] .. q_hi[r]`` (the last one may be
    cut short by ``n``); columns likewise for keys."""

    n: int
    block: int
    device: torch.device
    blocks: int = field(init=False)
    q_lo: torch.Tensor = field(init=False)
    q_hi: torch.Tensor = field(init=False)

    def __post_init__(self):
        blocks = max(1, math.ceil(self.n / self.block))
        lo = torch.arange(blocks, device=self.device) * self.block
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "q_lo", lo)
        object.__setattr__(self, "q_hi", (lo + self.block).clamp(max=max(self.n, 1)) - 1)

    @property
    def k_lo(self) -> torch.Tensor:
        return self.q_lo

    @property
    def k_hi(self) -> torch.Tensor:
        return self.q_hi

    def tile_sizes(self) -> torch.Tensor:
        """``(blocks, blocks)``: pairs per tile (``block²`` except along the cut edge)."""
        rows = self.q_hi - self.q_lo + 1
        return rows[:, None] * rows[None, :]


def tiles_from_mask(mask: torch.Tensor, grid: TileGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """``(touched, full)`` tiles of an explicit ``(H, n, n)`` bool mask (a learned one): one pass over the mask."""
    h, b = mask.shape[0], grid.block
    padded = torch.nn.functional.pad(mask, (0, grid.blocks * b - grid.n, 0, grid.blocks * b - grid.n))
    counts = padded.view(h, grid.blocks, b, grid.blocks, b).sum(dim=(2, 4))
    return counts > 0, counts == grid.tile_sizes()


# --------------------------------------------------------------------------------------------------------------
# Block maps
# --------------------------------------------------------------------------------------------------------------

FULL_TILE, EMPTY_TILE = 0, 1  # tile ids of the all-kept and the all-dropped tile; partial tiles count from 2


@dataclass(eq=False)
class BlockMap:
    """A pattern at tile granularity (see the module docstring).

    ``full``/``partial``: bool ``(H, blocks, blocks)``; ``tile_id``: int32, same shape, indexing ``bits``
    ``(T, block, block)`` bool, whose entries 0 and 1 are the all-kept and all-dropped tiles and the others the
    distinct partial tiles (positions past ``n`` dropped).
    """

    n: int
    block: int
    full: torch.Tensor
    partial: torch.Tensor
    tile_id: torch.Tensor
    bits: torch.Tensor

    @property
    def heads(self) -> int:
        return self.full.shape[0]

    @property
    def blocks(self) -> int:
        return self.full.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.full.device

    def dense(self) -> torch.Tensor:
        """The ``(H, n, n)`` bool mask, assembled one tile row at a time (no index grids)."""
        return self.rows(0, self.n)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the mask, ``(H, stop - start, n)`` bool, from the tiles they cross."""
        h, nb, b, n = self.heads, self.blocks, self.block, self.n
        out = torch.empty(h, stop - start, n, dtype=torch.bool, device=self.device)
        for r in range(start // b, math.ceil(stop / b)):
            lo, hi = max(start, r * b), min(stop, (r + 1) * b, n)
            tiles = self.bits[self.tile_id[:, r].long()]  # (H, blocks, b, b)
            rows = tiles.transpose(1, 2).reshape(h, b, nb * b)
            out[:, lo - start : hi - start] = rows[:, lo - r * b : hi - r * b, :n]
        return out

    def kept_pairs(self) -> int:
        counts = self.bits.sum(dim=(1, 2))
        return int(self.full.sum().item()) * self.block**2 + int(counts[self.tile_id[self.partial].long()].sum())

    def density(self) -> float:
        """Kept fraction of the ``n x n`` pairs, averaged over heads."""
        return self.kept_pairs() / (self.heads * self.n * self.n)

    def block_density(self) -> float:
        """Fraction of tiles a block-sparse kernel computes (with at least one kept pair)."""
        return (self.full | self.partial).float().mean().item()

    def block_mask(self, key_valid: torch.Tensor | None = None, mask_mod=None) -> BlockMask:
        """FlexAttention ``BlockMask``; ``key_valid`` ``(B, n)`` bool (True = real token; ``B`` the queries' batch)
        drops padding keys.

        The structure is applied per batch row on the tiles: a key block with no valid key is skipped, one with
        some padding is partial. The kernel's ``mask_mod`` looks the partial tiles up in cached tensors
        (:func:`tile_mask_mod`) unless the pattern's own ``mask_mod`` is given (see
        :func:`tile_lookup_in_kernel` for when).
        """
        partial, full = self.partial[None], self.full[None]
        valid = None
        if key_valid is not None:
            valid, (partial, full) = self._with_keys(key_valid, partial, full)
        if mask_mod is None:
            head_step = torch.tensor(int(self.heads > 1), device=self.device)
            blocks = torch.tensor(self.blocks, device=self.device)
            positions = torch.arange(self.n, device=self.device)
            tables = (self.bits.reshape(-1), self.tile_id.reshape(-1), head_step, blocks, self.block)
            tables += (positions // self.block, positions % self.block)
            mask_mod = tile_mask_mod(*tables) if valid is None else tile_mask_mod_with_keys(*tables, valid)
        elif valid is not None:
            mask_mod = with_valid_keys(mask_mod, valid)
        return BlockMask.from_kv_blocks(
            *_ordered(partial), *_ordered(full), BLOCK_SIZE=self.block, mask_mod=mask_mod, seq_lengths=(self.n, self.n)
        )

    def _with_keys(self, key_valid: torch.Tensor, partial: torch.Tensor, full: torch.Tensor):
        """Padding on the tiles: a key block with no valid key is skipped, one with some padding is partial."""
        valid = key_valid.to(device=self.device, dtype=torch.bool)
        if valid.dim() != 2 or valid.shape[-1] != self.n:
            raise ValueError(f"key_valid must be (batch, {self.n}) bool; got shape {tuple(valid.shape)}")
        padded = torch.nn.functional.pad(valid, (0, self.blocks * self.block - self.n))
        per_block = padded.view(valid.shape[0], self.blocks, self.block).sum(-1)
        sizes = torch.clamp(self.n - torch.arange(self.blocks, device=self.device) * self.block, max=self.block)
        some, every = (per_block > 0)[:, None, None, :], (per_block == sizes)[:, None, None, :]
        return valid, ((partial | (full & ~every)) & some, full & every)


    def tile_layout(self) -> TileLayout:
        """The map as gather indices: for each tile row, the key tiles it touches (see :class:`TileLayout`)."""
        touched = self.full | self.partial
        widths = touched.sum(-1).amax(0)  # (blocks,): key tiles per tile row, widest head
        order = torch.argsort(touched.to(torch.int8), dim=-1, descending=True, stable=True)
        groups = []
        for width in sorted(set(widths.tolist())):
            rows = (widths == width).nonzero().flatten()
            columns = order[:, rows, : max(width, 1)]
            slots = torch.where(touched[:, rows].gather(-1, columns), self.tile_id[:, rows].gather(-1, columns), -1)
            groups.append(TileGroup(rows, columns, slots.long() if width else None))
        return TileLayout(self.n, self.block, self.blocks, self.bits, groups)


@dataclass(eq=False)
class TileGroup:
    """Tile rows ``rows`` ``(r,)`` that touch at most ``K`` key tiles: ``columns`` ``(H, r, K)`` are those tiles,
    ``slots`` (same shape) their entries in ``bits`` (-1 for padding slots). ``slots is None``: rows touching no
    key tile at all (their output is 0)."""

    rows: torch.Tensor
    columns: torch.Tensor
    slots: torch.Tensor | None

    @property
    def width(self) -> int:
        return self.columns.shape[-1]


@dataclass(eq=False)
class TileLayout:
    """Which key tiles each query tile row attends to, for block-sparse attention by gathering.

    Tile rows are grouped by how many key tiles they touch, so that a global token's row, which touches every
    tile, does not widen all the others.
    """

    n: int
    block: int
    blocks: int
    bits: torch.Tensor
    groups: list[TileGroup]


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's ``(kv_num_blocks, kv_indices)`` of a ``(B, H, blocks, blocks)`` tile map."""
    as_int = tiles.to(torch.int32)
    indices = torch.argsort(as_int, dim=-1, descending=True, stable=True).to(torch.int32)
    return as_int.sum(-1).to(torch.int32), indices


# The two mask_mods every pattern runs through in the kernel. Their code never changes; the pattern is in the
# tensors they close over (flattened, so that one index expression serves every shape), which dynamo treats as
# inputs: a new pattern or length is new data, not new code. Positions are split into (tile, offset) by lookup
# tables rather than ``//`` and ``%``, and ``valid`` has one row per batch row of the queries: with index
# arithmetic on symbolic sizes, Inductor's CPU template (torch 2.13) emits C++ that does not compile.
def tile_mask_mod(bits, tile_id, head_step, blocks, block: int, tile_of, offset_in):
    def mask_mod(b, h, q, k):
        tile = tile_id[((h * head_step * blocks + tile_of[q]) * blocks + tile_of[k]).clamp(min=0)]
        return bits[((tile * block + offset_in[q]) * block + offset_in[k]).clamp(min=0)]

    return mask_mod


def tile_mask_mod_with_keys(bits, tile_id, head_step, blocks, block: int, tile_of, offset_in, valid):
    def mask_mod(b, h, q, k):
        tile = tile_id[((h * head_step * blocks + tile_of[q]) * blocks + tile_of[k]).clamp(min=0)]
        return bits[((tile * block + offset_in[q]) * block + offset_in[k]).clamp(min=0)] & valid[b, k]

    return mask_mod


def with_valid_keys(mask_mod, valid):
    """``mask_mod`` ∩ real keys (``valid``: ``(B, n)`` bool)."""

    def masked(b, h, q, k):
        return mask_mod(b, h, q, k) & valid[b, k]

    return masked


_TILES_PER_STEP = 32  # tiles evaluated at once: 0.5M pairs, ~4 MB of int64 index grids


def _evaluate(mask_mod, where: torch.Tensor, grid: TileGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pattern on tiles ``where`` (``(P, 3)``: head, tile row, tile column), positions past ``n`` dropped.

    Returns each tile's count of kept pairs ``(P,)``, the distinct partial tiles ``(U, block, block)`` and each
    tile's index among them ``(P,)`` (-1 for an empty or full tile). Tiles are deduplicated chunk by chunk, so
    memory follows the number of *distinct* tiles, not of evaluated ones.
    """
    b, n = grid.block, grid.n
    offsets = torch.arange(b, device=grid.device)
    zero = torch.zeros((), dtype=torch.long, device=grid.device)
    counts, ids, distinct, found = [], [], [], 0
    for chunk in where.split(_TILES_PER_STEP):
        h = chunk[:, 0].view(-1, 1, 1)
        q = chunk[:, 1].view(-1, 1, 1) * b + offsets.view(1, -1, 1)
        k = chunk[:, 2].view(-1, 1, 1) * b + offsets.view(1, 1, -1)
        kept = mask_mod(zero, h, q.clamp(max=n - 1), k.clamp(max=n - 1))
        bits = kept.expand(len(chunk), b, b) & (q < n) & (k < n)
        count = bits.sum(dim=(1, 2))
        partial = (count > 0) & (count < b * b)
        tiles, index = _distinct(bits[partial])
        chunk_ids = torch.full_like(count, -1)
        chunk_ids[partial] = index + found
        found += len(tiles)
        counts.append(count)
        ids.append(chunk_ids)
        distinct.append(tiles)
    if not counts:
        empty = torch.zeros(0, dtype=torch.long, device=grid.device)
        return empty, empty, torch.zeros(0, b, b, dtype=torch.bool, device=grid.device)
    tiles, index = _distinct(torch.cat(distinct))
    ids = torch.cat(ids)
    ids = torch.where(ids >= 0, index[ids.clamp(min=0)] if len(index) else ids, -1)
    return torch.cat(counts), ids, tiles


def _distinct(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct tiles and each tile's index among them (tiles compared bit-packed, 64 pairs per word)."""
    p, b = bits.shape[0], bits.shape[-1]
    if p == 0 or (b * b) % 64:
        return bits, torch.arange(p, device=bits.device)
    weights = 2 ** torch.arange(8, device=bits.device, dtype=torch.uint8)
    packed = (bits.reshape(p, -1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)
    words = packed.view(torch.int64) if packed.is_contiguous() else packed.contiguous().view(torch.int64)
    _, inverse, counts = torch.unique(words, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((counts.shape[0],), p, dtype=torch.long, device=bits.device)
    first = first.scatter_reduce(0, inverse, torch.arange(p, device=bits.device), reduce="amin")
    return bits[first], inverse


def _representatives(pattern, undecided: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles to evaluate, and each undecided tile's representative among them.

    A pattern of the offset alone looks the same in every tile of a diagonal (except where ``n`` cuts the last
    tile row or column), so one tile per (head, diagonal, cut) stands for all: ``strided:128`` at n = 8192 then
    evaluates 130 tiles instead of 4096.
    """
    if not pattern.offset_only or len(undecided) == 0:
        return undecided, torch.arange(len(undecided), device=undecided.device)
    h, row, col = undecided.unbind(-1)
    signature = torch.stack([h, row - col, row == blocks - 1, col == blocks - 1], dim=-1)
    _, inverse = torch.unique(signature, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(undecided), dtype=torch.long, device=undecided.device)
    first = first.scatter_reduce(0, inverse, torch.arange(len(undecided), device=undecided.device), reduce="amin")
    return undecided[first], inverse


def build_block_map(pattern, n: int, device: torch.device | str, block: int = DEFAULT_BLOCK_SIZE) -> BlockMap:
    """The exact block map of ``pattern`` (a :class:`hf_sparse.patterns.Pattern`) at length ``n``."""
    if n < 1:
        raise ValueError(f"a block map needs a sequence length >= 1, got {n}")
    device = torch.device(device)
    grid = TileGrid(n, block, device)
    heads, nb = pattern.num_heads or 1, grid.blocks
    touched, full = (t.to(device).expand(heads, nb, nb) for t in pattern.tiles(grid))
    full = full & (grid.tile_sizes() == block * block)  # a tile cut by n is never full (as create_block_mask)
    undecided = (touched & ~full).nonzero()
    evaluated, inverse = _representatives(pattern, undecided, nb)
    count, distinct_of, distinct = _evaluate(pattern.mask_mod(n, device), evaluated, grid)
    tile_count, tile_distinct = count[inverse], distinct_of[inverse]
    where = tuple(undecided.T)
    full = full.clone()
    full[where] = tile_count == block * block
    partial = torch.zeros_like(full)
    partial[where] = (tile_count > 0) & (tile_count < block * block)
    tile_id = torch.full((heads, nb, nb), EMPTY_TILE, dtype=torch.int32, device=device)
    tile_id[where] = torch.where(tile_distinct >= 0, tile_distinct + 2, EMPTY_TILE).to(torch.int32)
    tile_id[full] = FULL_TILE
    ends = torch.ones(2, block, block, dtype=torch.bool, device=device)
    ends[EMPTY_TILE] = False
    return BlockMap(n, block, full, partial, tile_id, torch.cat([ends, distinct]))


def _key(what: str, pattern, n: int, device, block: int) -> tuple:
    return (what, pattern.cache_key(), n, block, device_key(device))


def cached_block_map(pattern, n: int, device: torch.device | str = "cpu", block: int = DEFAULT_BLOCK_SIZE):
    """:func:`build_block_map`, once per (pattern, length, block size, device) while cached."""
    return _cached_for(pattern, "block_map", n, device, block, lambda: build_block_map(pattern, n, device, block))


def cached_dense_mask(pattern, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The pattern's ``(H, n, n)`` bool mask, shared: never modify it in place."""
    return _cached_for(
        pattern, "dense", n, device, DEFAULT_BLOCK_SIZE, lambda: cached_block_map(pattern, n, device).dense()
    )


def cached_block_density(pattern, n: int, device: torch.device | str = "cpu", block: int = DEFAULT_BLOCK_SIZE):
    """:meth:`BlockMap.block_density` as a plain float, read from the device once per key (no sync afterwards)."""
    return _cached_for(
        pattern, "block_density", n, device, block, lambda: cached_block_map(pattern, n, device, block).block_density()
    )


def tile_lookup_in_kernel(pattern, device: torch.device | str) -> bool:
    """Whether FlexAttention gets the tile-lookup ``mask_mod`` (the pattern as data: one compilation for every
    such pattern) or the pattern's own one (one compilation per pattern).

    CUDA: the pattern's own where it depends on the offset ``i - j`` alone (``window``, ``dilated``, ``strided``,
    ``logsparse``, ``causal``, ``no_diagonal`` and their unions and intersections): a closed form in ``q - k``
    with the pattern's arguments as constants, which reads nothing and holds no length, so it compiles once per
    pattern and never per length. The lookup costs six table reads per pair: on one H100 the bare kernel for
    ``window:64`` took 0.95 ms with it and 0.23 ms with the closed form at L = 16384, 5.0 and 0.81 ms at 65536
    (``benchmarks/masks_gpu.md``). Every other pattern keeps the lookup, one compilation for all of them: their
    own ``mask_mod`` may close over the length or over tensors (learned masks, random keys), new code for dynamo
    at each length or pattern.

    CPU: the pattern's own always. Inductor's C++ FlexAttention template (torch 2.13) names the symbolic sizes of
    tensors a ``mask_mod`` reads by textual substitution and can emit C++ that does not compile
    (``cur_qSplitSize8`` for a size ``ks18``), depending on how many symbols the graph has; the lookup tables, or
    pattern arguments passed as tensors, trigger it. On CPU ``attention_backend="auto"`` runs the ``tiles``
    kernel instead, which needs no compiler.
    """
    return torch.device(device).type != "cpu" and not pattern.offset_only


def flex_block_mask(
    pattern, n: int, device: torch.device | str = "cpu", key_valid=None, block: int = DEFAULT_BLOCK_SIZE
) -> BlockMask:
    """The pattern's FlexAttention ``BlockMask``, ∩ real keys if ``key_valid`` (``(B, n)`` bool) is given.

    The structure comes from the cached block map; without padding the whole ``BlockMask`` is cached too.
    """
    block_map = cached_block_map(pattern, n, device, block)

    def build(valid=None):
        own = None if tile_lookup_in_kernel(pattern, device) else pattern.mask_mod(n, device)
        return block_map.block_mask(valid, own)

    if key_valid is None:
        return _cached_for(pattern, "block_mask", n, device, block, build)
    return build(key_valid)


def cached_tile_layout(pattern, n: int, device: torch.device | str = "cpu", block: int = DEFAULT_BLOCK_SIZE):
    """The pattern's :class:`TileLayout`, shared."""
    return _cached_for(
        pattern, "tile_layout", n, device, block, lambda: cached_block_map(pattern, n, device, block).tile_layout()
    )
