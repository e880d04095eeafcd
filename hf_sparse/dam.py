"""Differentiable Attention Mask (DAM, SparseBERT): learn which attention positions to keep.

Every gate has one logit Δα with P(keep) = sigmoid(Δα) (the reference's two-logit Gumbel-softmax is the same
thing). Structures decide what a gate covers:

* ``offset``  (DAM_s) one gate per head and relative offset: M[h,i,j] = g[h, |i-j|] (or g[h, i-j] when not
  symmetric), so one set of gates serves every length up to ``max_length``;
* ``element`` (DAM_u) one gate per head and position pair, optionally symmetric;
* ``block``   one gate per head and pair of ``block_size`` blocks: the learned mask maps directly onto
  block-sparse kernels (not in the reference).

Training samples a hard mask with the Gumbel-sigmoid trick and a straight-through gradient, a fresh sample per
forward shared by the batch; evaluation keeps exactly the gates with P(keep) > 0.5; ``freeze`` stores that
binary mask compactly in buffers (per offset, per block, or bit-packed per element) so it travels in the state
dict. Imported by remote code: torch and the standard library only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .checks import check_bool, check_choice, check_int, check_number, check_settings_dict

STRUCTURES = ("offset", "element", "block")
PENALTY_REDUCTIONS = ("mean", "sum")
DAM_DEFAULTS = {
    "structure": "offset",
    "block_size": 16,
    "max_length": None,  # None: the model's max_position_embeddings
    "share_across_layers": True,  # the reference shares one gate set per head across layers
    "symmetric": True,
    "init_logit": 0.0,  # P(keep) = 0.5; the reference adds 1e-3 * randn
    "init_noise": 1e-3,
    "temperature": 1.0,
    "penalty": 1e-3,  # λ
    "penalty_reduction": "mean",
    "mask_value": 1e4,  # c in -c·(1-M): the reference adds (1-M)·(-10000) to the scores
    "hard": True,
    "frozen": False,
}


def resolve_config(dam: dict, num_hidden_layers: int, max_position_embeddings: int) -> dict:
    """Fill defaults and refuse unknown keys or values, naming them and what would be valid."""
    check_settings_dict("dam", dam, "{'structure': 'offset', 'penalty': 1e-3}")
    unknown = sorted(set(dam) - set(DAM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown dam setting(s) {unknown}; valid settings: {sorted(DAM_DEFAULTS)}")
    cfg = {**DAM_DEFAULTS, **dam}
    check_choice("dam structure", cfg["structure"], STRUCTURES)
    check_choice("dam penalty_reduction", cfg["penalty_reduction"], PENALTY_REDUCTIONS)
    if cfg["max_length"] is None:
        cfg["max_length"] = max_position_embeddings
    if isinstance(cfg["max_length"], int) and not isinstance(cfg["max_length"], bool):
        if not 1 <= cfg["max_length"] <= max_position_embeddings:
            raise ValueError(
                f"dam max_length={cfg['max_length']} must be between 1 and max_position_embeddings="
                f"{max_position_embeddings}"
            )
    check_int("dam max_length", cfg["max_length"], at_least=1, at_most=max_position_embeddings)
    check_int("dam block_size", cfg["block_size"], at_least=1)
    for key in ("share_across_layers", "symmetric", "hard", "frozen"):
        check_bool(f"dam {key}", cfg[key])
    check_number("dam init_logit", cfg["init_logit"])
    check_number("dam init_noise", cfg["init_noise"], at_least=0)
    check_number("dam temperature", cfg["temperature"], above=0, why="τ of the Gumbel-sigmoid")
    check_number("dam penalty", cfg["penalty"], at_least=0, why="λ of the L1 penalty")
    check_number("dam mask_value", cfg["mask_value"], above=0, why="c in the -c·(1-M) added to dropped scores")
    if not cfg["hard"]:
        raise ValueError("dam hard=False (a soft mask) is not supported: DAM trains a binary mask (hard=True)")
    return cfg


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.reshape(*mask.shape[:-2], -1).to(torch.uint8)
    pad = (-flat.shape[-1]) % 8
    flat = nn.functional.pad(flat, (0, pad)).view(*flat.shape[:-1], -1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=mask.device)
    return (flat * weights).sum(-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(7, -1, -1, device=packed.device)
    bits = (packed.unsqueeze(-1).to(torch.int64) >> shifts) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., : n * n].reshape(*packed.shape[:-1], n, n).bool()


class DAMGates(nn.Module):
    """Gate logits for every (gate group, head, gate), their sampling, expansion to masks, and freezing.

    A gate group is one set of gates: 1 when shared across layers, else one per layer.
    """

    def __init__(self, dam: dict, num_heads: int, num_layers: int, max_position_embeddings: int):
        super().__init__()
        self.settings = cfg = resolve_config(dam, num_layers, max_position_embeddings)
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.groups = 1 if cfg["share_across_layers"] else num_layers
        n = self.max_length = cfg["max_length"]
        if cfg["structure"] == "offset":
            gate_shape = (n,) if cfg["symmetric"] else (2 * n - 1,)
        elif cfg["structure"] == "element":
            gate_shape = (n, n)
        else:
            blocks = math.ceil(n / cfg["block_size"])
            gate_shape = (blocks, blocks)
        self.logits = nn.Parameter(torch.empty(self.groups, num_heads, *gate_shape))
        # The frozen binary mask, compact: per offset / per block as bool, per element bit-packed.
        frozen_shape = (self.groups, num_heads, math.ceil(n * n / 8)) if cfg["structure"] == "element" else None
        if frozen_shape is None:
            self.register_buffer("frozen_mask", torch.zeros(self.groups, num_heads, *gate_shape, dtype=torch.bool))
        else:
            self.register_buffer("frozen_mask", torch.zeros(frozen_shape, dtype=torch.uint8))
        # False until freeze() ran (or a frozen checkpoint was loaded): a learned pattern without it is refused.
        self.register_buffer("is_frozen", torch.zeros((), dtype=torch.bool))
        # The stored mask unpacked to (G, H, max_length, max_length) bool, once per stored state and device (see
        # frozen_masks): not saved, rebuilt after freeze(), loading or a move.
        self.register_buffer("unpacked", None, persistent=False)
        self._unpacked_from: tuple | None = None
        # Set by DAMCallback's schedules; start from the config.
        self.temperature = float(cfg["temperature"])
        self.penalty_weight = float(cfg["penalty"])
        self.reset_parameters()

    def initial_logits(self) -> torch.Tensor:
        """``init_logit`` plus a little noise (so heads break symmetry)."""
        return torch.randn_like(self.logits) * self.settings["init_noise"] + self.settings["init_logit"]

    @property
    def _mirrored(self) -> bool:
        return self.settings["structure"] != "offset" and self.settings["symmetric"]

    def gate_logits(self) -> torch.Tensor:
        """The logits in use: for symmetric element/block gates the upper triangle, mirrored."""
        return self._symmetrize(self.logits) if self._mirrored else self.logits

    def reset_parameters(self) -> None:
        """For a standalone module; inside a model, ``_init_weights`` does this through Transformers' init."""
        with torch.no_grad():
            self.logits.copy_(self.initial_logits())
            self.frozen_mask.zero_()
            self.is_frozen.zero_()

    @staticmethod
    def _symmetrize(x: torch.Tensor) -> torch.Tensor:
        """Mirror the upper triangle (diagonal included) onto the lower one."""
        upper = torch.triu(x)
        return upper + torch.triu(x, diagonal=1).transpose(-1, -2)

    def group_of_layer(self, layer: int) -> int:
        return 0 if self.groups == 1 else layer

    def expand(self, gates: torch.Tensor, n: int) -> torch.Tensor:
        """Per-gate values ``(G, H, *gate_shape)`` → per-position ``(G, H, n, n)``."""
        if n > self.max_length:
            raise ValueError(
                f"sequence length {n} is longer than the DAM gates cover (dam max_length={self.max_length})"
            )
        structure = self.settings["structure"]
        i = torch.arange(n, device=gates.device)
        if structure == "offset":
            offset = (i[:, None] - i[None, :]).abs() if self.settings["symmetric"] else i[:, None] - i[None, :]
            if not self.settings["symmetric"]:
                offset = offset + self.max_length - 1
            return gates[..., offset]
        if structure == "element":
            return gates[..., :n, :n]
        block = i // self.settings["block_size"]
        return gates[..., block[:, None], block[None, :]]

    def probabilities(self, n: int) -> torch.Tensor:
        """P(keep) per position, ``(G, H, n, n)``."""
        return torch.sigmoid(self.expand(self.gate_logits(), n))

    def deterministic_mask(self, n: int) -> torch.Tensor:
        """Keep iff P(keep) > 0.5 (Δα > 0): the evaluation mask and what ``freeze`` stores. ``(G, H, n, n)`` bool."""
        return self.expand(self.gate_logits() > 0, n)

    def sample(self, n: int) -> torch.Tensor:
        """A hard Gumbel-sigmoid sample with straight-through gradient, one draw per gate: ``(G, H, n, n)`` float.

        Forward value is exactly 0/1; the gradient is that of sigmoid((Δα + logistic noise) / τ).
        """
        u = torch.rand_like(self.logits).clamp_(1e-6, 1 - 1e-6)
        noise = torch.log(u) - torch.log1p(-u)  # logistic = difference of two Gumbels
        if self._mirrored:
            noise = self._symmetrize(noise)
        soft = torch.sigmoid((self.gate_logits() + noise) / self.temperature)
        hard = (soft > 0.5).to(soft.dtype)
        return self.expand(hard - soft.detach() + soft, n)

    @torch.no_grad()
    def freeze(self) -> None:
        """Store the deterministic mask in ``frozen_mask`` (compact) and mark the gates frozen."""
        keep = self.gate_logits() > 0
        self.frozen_mask.copy_(_pack_bits(keep) if self.settings["structure"] == "element" else keep)
        self.is_frozen.fill_(True)

    def _stored_state(self) -> tuple:
        """Identity and version of the stored mask: changes when it is frozen, loaded, moved or reset."""
        return tuple((t.data_ptr(), t._version, str(t.device)) for t in (self.frozen_mask, self.is_frozen))

    def frozen_masks(self) -> torch.Tensor:
        """The stored binary mask at full size, ``(G, H, max_length, max_length)`` bool.

        Unpacked once per stored state (after ``freeze``, after loading, after a move to another device) into the
        non-persistent ``unpacked`` buffer, so a forward pays a slice, not an unpacking. The same tensor object is
        returned every time, which keeps the masks built from it cached.
        """
        if self._unpacked_from != self._stored_state():
            if not bool(self.is_frozen):
                raise ValueError(
                    "attention_pattern 'learned' needs a frozen DAM mask, but this model's is not set: call "
                    "model.freeze_dam() after the DAM search, or load a checkpoint saved after freezing (this one "
                    "lacks the 'dam.frozen_mask' / 'dam.is_frozen' state)"
                )
            with torch.inference_mode(False):  # kept across forwards: never an inference tensor
                stored = self.frozen_mask
                if self.settings["structure"] == "element":
                    stored = _unpack_bits(stored, self.max_length)
                self.unpacked = self.expand(stored, self.max_length).bool()
            self._unpacked_from = self._stored_state()
        return self.unpacked

    def frozen(self, n: int) -> torch.Tensor:
        """The stored binary mask at length ``n``: ``(G, H, n, n)`` bool (a view of :meth:`frozen_masks`)."""
        if n > self.max_length:
            raise ValueError(
                f"sequence length {n} is longer than the DAM gates cover (dam max_length={self.max_length})"
            )
        return self.frozen_masks()[..., :n, :n]


def check_loaded_dam(model: nn.Module, missing_keys) -> None:
    """After ``from_pretrained``: a model whose config says the DAM mask is frozen must have loaded it.

    Without the stored mask (``dam.frozen_mask``, ``dam.is_frozen``) a frozen model would run with an all-zero or
    fresh mask; Transformers only lists such keys in its load report. Missing gate logits are fine while the
    search has not run (they start from ``init_logit``).
    """
    dam = model.config.dam or {}
    lost = sorted(
        k for k in missing_keys if k.rsplit(".", 2)[-2:-1] == ["dam"] and k.endswith(("frozen_mask", "is_frozen"))
    )
    if dam.get("frozen") and lost:
        raise ValueError(
            f"this checkpoint's config says its DAM mask is frozen (dam.frozen=True, attention_pattern "
            f"{model.config.attention_pattern!r}) but its weights lack {lost}: the learned mask is lost. Load the "
            "checkpoint that was saved after freeze_dam(), or set dam.frozen=False and search the mask again"
        )
