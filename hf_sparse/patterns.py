"""Attention patterns as data: parse a spec string into a pattern, then ask it for a mask.

A pattern is a small pure function ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's
convention). Written with tensor operations only, the same function serves three consumers:

* FlexAttention evaluates it (under ``vmap``) to build a ``BlockMask`` for block-sparse kernels;
* :func:`dense_mask` evaluates it on broadcast index grids to get an ``(H, n, n)`` boolean mask for the
  eager and SDPA kernels;
* :func:`sparsity` counts what it removes.

Specs (definitions follow SparseBERT's table, see REFERENCES.md) are combined with ``+`` (union) and
``&`` (intersection, binds tighter): ``"window:64&learned+global:1"`` is ``(window ∩ learned) ∪ global``.

This module is imported by remote code, so it depends on torch and the standard library only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask, or_masks

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Kind:
    """One registry entry: how to write it, what it means, and how many integer arguments it takes."""

    usage: str
    meaning: str
    min_args: int
    max_args: int


PATTERN_KINDS: dict[str, _Kind] = {
    "dense": _Kind("dense", "every pair", 0, 0),
    "no_diagonal": _Kind("no_diagonal", "every pair except a token with itself (i != j)", 0, 0),
    "window": _Kind("window:W", "|i-j| <= W", 1, 1),
    "global": _Kind("global:G", "the first G tokens attend to and are attended by all", 1, 1),
    "strided": _Kind("strided:L", "|i-j| <= L or (i-j) mod L == 0", 1, 1),
    "fixed": _Kind("fixed:L,C", "same block of L (i//L == j//L) or j mod L >= L-C", 2, 2),
    "logsparse": _Kind("logsparse", "|i-j| in {0, 1, 2, 4, 8, ...}", 0, 0),
    "dilated": _Kind("dilated:W,D", "|i-j| <= W*D and (i-j) mod D == 0", 2, 2),
    "random": _Kind("random:R[,SEED]", "R random keys per query, drawn with SEED (default 0)", 1, 2),
    "block_local": _Kind("block_local:B", "same block of B tokens (i//B == j//B)", 1, 1),
    "star": _Kind("star", "|i-j| <= 1, plus the first token global", 0, 0),
    "longformer": _Kind("longformer:W,G", "window:W + global:G", 2, 2),
    "bigbird": _Kind("bigbird:W,G,R", "window:W + global:G + random:R", 3, 3),
    "causal": _Kind("causal", "j <= i", 0, 0),
    "learned": _Kind("learned", "the frozen DAM mask stored in the checkpoint", 0, 0),
}


def describe() -> str:
    """A table of every pattern spec, for error messages and ``hf-sparse patterns``."""
    rows = [f"  {kind.usage:<18} {kind.meaning}" for kind in PATTERN_KINDS.values()]
    return "\n".join(rows) + "\n  combine with '+' (union) and '&' (intersection), e.g. 'window:64+global:1'"


class Pattern:
    """Base class: a pattern knows its spec and produces a ``mask_mod`` for a sequence length."""

    #: number of heads the pattern distinguishes (``None``: the same mask for every head)
    num_heads: int | None = None

    def mask_mod(self, n: int, device: torch.device | str = "cpu") -> MaskMod:
        raise NotImplementedError

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
    def is_dense(self) -> bool:
        return self.name == "dense"

    def mask_mod(self, n: int, device: torch.device | str = "cpu") -> MaskMod:
        a = self.args
        name = self.name
        if name == "dense":
            return lambda b, h, q, k: q >= 0
        if name == "no_diagonal":
            return lambda b, h, q, k: q != k
        if name == "window":
            return lambda b, h, q, k: (q - k).abs() <= a[0]
        if name == "global":
            return lambda b, h, q, k: (q < a[0]) | (k < a[0])
        if name == "strided":
            return lambda b, h, q, k: ((q - k).abs() <= a[0]) | (torch.remainder(q - k, a[0]) == 0)
        if name == "fixed":
            return lambda b, h, q, k: (q // a[0] == k // a[0]) | (torch.remainder(k, a[0]) >= a[0] - a[1])
        if name == "logsparse":
            return _logsparse
        if name == "dilated":
            return lambda b, h, q, k: ((q - k).abs() <= a[0] * a[1]) & (torch.remainder(q - k, a[1]) == 0)
        if name == "random":
            table = random_table(n, a[0], a[1] if len(a) > 1 else 0).to(device)
            return lambda b, h, q, k: table[q, k]
        if name == "block_local":
            return lambda b, h, q, k: q // a[0] == k // a[0]
        if name == "star":
            return lambda b, h, q, k: ((q - k).abs() <= 1) | (q == 0) | (k == 0)
        if name == "longformer":
            return parse(f"window:{a[0]}+global:{a[1]}").mask_mod(n, device)
        if name == "bigbird":
            return parse(f"window:{a[0]}+global:{a[1]}+random:{a[2]}").mask_mod(n, device)
        if name == "causal":
            return lambda b, h, q, k: k <= q
        raise AssertionError(f"unhandled pattern {name!r}")  # parse() only builds registered names


def _logsparse(b, h, q, k):
    d = (q - k).abs()
    return (d & (d - 1)) == 0  # true for 0 and every power of two


_RANDOM_TABLES: dict[tuple[int, int, int], torch.Tensor] = {}


def random_table(n: int, keys_per_query: int, seed: int = 0) -> torch.Tensor:
    """``(n, n)`` bool table with ``min(R, n)`` distinct random keys per query, reproducible from ``seed``.

    The draw depends on ``n``: the same seed at another length gives another (equally random) table.
    Cached (a plain dict, which torch.compile traces through): a model rebuilds its masks every forward, and the
    draw (an n×n argsort) is the costly part.
    """
    key = (n, keys_per_query, seed)
    if key not in _RANDOM_TABLES:
        if len(_RANDOM_TABLES) >= 64:  # bounded: lengths vary from batch to batch
            _RANDOM_TABLES.clear()
        generator = torch.Generator().manual_seed(seed)
        order = torch.rand(n, n, generator=generator).argsort(dim=-1)[:, : min(keys_per_query, n)]
        table = torch.zeros(n, n, dtype=torch.bool)
        _RANDOM_TABLES[key] = table.scatter_(1, order, True)
    return _RANDOM_TABLES[key]


@dataclass(frozen=True)
class Learned(Pattern):
    """A frozen DAM mask: ``mask`` is a bool tensor ``(H, n_max, n_max)``; ``None`` until one is bound."""

    mask: torch.Tensor | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return "learned"

    @property
    def needs_learned_mask(self) -> bool:
        return True

    @property
    def num_heads(self) -> int | None:  # type: ignore[override]
        return None if self.mask is None else self.mask.shape[0]

    def mask_mod(self, n: int, device: torch.device | str = "cpu") -> MaskMod:
        if self.mask is None:
            raise ValueError(
                "attention_pattern 'learned' needs a frozen DAM mask, but none is stored: train with a `dam` "
                "config and call model.freeze_dam(), or load a checkpoint that was saved after freezing"
            )
        if n > self.mask.shape[-1]:
            raise ValueError(f"the learned mask covers {self.mask.shape[-1]} positions; got a sequence of {n}")
        table = self.mask[:, :n, :n].to(device=device, dtype=torch.bool)
        return lambda b, h, q, k: table[h, q, k]


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

    def mask_mod(self, n: int, device: torch.device | str = "cpu") -> MaskMod:
        return or_masks(*(p.mask_mod(n, device) for p in self.parts))


@dataclass(frozen=True)
class Intersection(Union):
    def __str__(self) -> str:
        return "&".join(map(str, self.parts))

    @property
    def is_dense(self) -> bool:
        return all(p.is_dense for p in self.parts)

    def mask_mod(self, n: int, device: torch.device | str = "cpu") -> MaskMod:
        return and_masks(*(p.mask_mod(n, device) for p in self.parts))


def parse(spec: str | Pattern) -> Pattern:
    """Parse a spec such as ``"bigbird:3,1,2"`` or ``"window:64&learned+global:1"``.

    Raises ``ValueError`` naming the bad part and listing what would be valid.
    """
    if isinstance(spec, Pattern):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"attention pattern must be a non-empty string, got {spec!r}. Valid patterns:\n{describe()}")
    unions = []
    for union_part in spec.split("+"):
        inters = [_parse_one(p, spec) for p in union_part.split("&")]
        unions.append(inters[0] if len(inters) == 1 else Intersection(tuple(inters)))
    return unions[0] if len(unions) == 1 else Union(tuple(unions))


def _parse_one(part: str, spec: str) -> Pattern:
    part = part.strip()
    name, _, arg_text = part.partition(":")
    name = name.strip()
    where = f"in attention pattern {spec!r}" if part != spec.strip() else "as attention pattern"
    if name not in PATTERN_KINDS:
        raise ValueError(f"unknown pattern {name!r} {where}. Valid patterns:\n{describe()}")
    kind = PATTERN_KINDS[name]
    texts = [t.strip() for t in arg_text.split(",")] if arg_text.strip() else []
    if not kind.min_args <= len(texts) <= kind.max_args:
        count = str(kind.min_args) if kind.min_args == kind.max_args else f"{kind.min_args} to {kind.max_args}"
        raise ValueError(f"pattern {part!r} {where} takes {count} argument(s); write it as {kind.usage!r}")
    try:
        args = tuple(int(t) for t in texts)
    except ValueError:
        raise ValueError(
            f"pattern {part!r} {where} has a non-integer argument; write it as {kind.usage!r} with whole numbers"
        ) from None
    positive = {"strided": (0,), "fixed": (0,), "dilated": (1,), "block_local": (0,)}.get(name, ())
    bad = [x for i, x in enumerate(args) if x < (1 if i in positive else 0)]
    if name == "fixed" and not bad and args[1] > args[0]:
        bad = [args[1]]
    if bad:
        raise ValueError(
            f"pattern {part!r} {where} has an out-of-range argument {bad[0]}; {kind.usage}: {kind.meaning}"
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


def _index_grids(n: int, num_heads: int | None, device: torch.device | str):
    heads = torch.arange(num_heads or 1, device=device).view(-1, 1, 1)
    q = torch.arange(n, device=device).view(1, -1, 1)
    k = torch.arange(n, device=device).view(1, 1, -1)
    return torch.zeros((), dtype=torch.long, device=device), heads, q, k


def dense_mask(pattern: str | Pattern, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean keep-mask of shape ``(H, n, n)``; ``H`` is 1 unless the pattern differs between heads."""
    pattern = parse(pattern)
    b, h, q, k = _index_grids(n, pattern.num_heads, device)
    return pattern.mask_mod(n, device)(b, h, q, k).expand(h.shape[0], n, n)


def block_mask(
    pattern: str | Pattern,
    n: int,
    device: torch.device | str = "cpu",
    key_valid: torch.Tensor | None = None,
    block_size: int = 128,
) -> BlockMask:
    """FlexAttention ``BlockMask`` of the pattern, intersected with ``key_valid`` (``(B, n)`` bool) if given."""
    pattern = parse(pattern)
    mod = pattern.mask_mod(n, device)
    batch = None
    if key_valid is not None:
        valid = key_valid.to(device=device, dtype=torch.bool)
        mod = and_masks(mod, lambda b, h, q, k: valid[b, k])
        batch = valid.shape[0]
    return create_block_mask(mod, batch, pattern.num_heads, n, n, device=device, BLOCK_SIZE=block_size)


def sparsity(pattern: str | Pattern, n: int) -> float:
    """Fraction of the ``n x n`` attention matrix the pattern removes (averaged over heads)."""
    return 1.0 - dense_mask(pattern, n).float().mean().item()


def block_density(pattern: str | Pattern, n: int, block_size: int = 128) -> float:
    """Fraction of ``block_size`` tiles with at least one kept pair: the work a block-sparse kernel does."""
    mask = dense_mask(pattern, n)
    blocks = -(-n // block_size)
    padded = torch.zeros(mask.shape[0], blocks * block_size, blocks * block_size, dtype=torch.bool)
    padded[:, :n, :n] = mask
    tiles = padded.view(mask.shape[0], blocks, block_size, blocks, block_size).any(dim=(2, 4))
    return tiles.float().mean().item()
