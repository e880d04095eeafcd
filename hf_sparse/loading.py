"""Loading a stock checkpoint into this project's classes: the weights it lacks by design (a task head, an MLM head
a sentence encoder never had, DAM gates, Sparsefinder predictors) are said once, in one plain line, instead of
Transformers' MISSING table; learned state a checkpoint lost is refused by each model's check.

Remote code (copied next to checkpoints): torch, transformers and the standard library only.
"""

from __future__ import annotations

import logging
import re

from torch import nn

logger = logging.getLogger(__name__)

# Weights a stock BERT or Marian checkpoint lacks by design, with what they are in plain words. Transformers' load
# report skips them (``_keys_to_ignore_on_load_missing``); ``from_pretrained`` says once, in one line, which were new.
EXPECTED_NEW = (
    (r"^(classifier|qa_outputs)\.", "task head {names}", "trained from scratch, as expected for a new task"),
    (r"^cls\.predictions\.", "masked-LM head cls.predictions", "the checkpoint has none, so it starts untrained"),
    (r"(^|\.)pooler\.", "pooler", "the checkpoint has none, trained from scratch"),
    (r"(^|\.)dam\.", "DAM gates", "the mask search starts from dam init_logit (run it with DAMCallback)"),
    (
        r"\.sparsefinder\.",
        "Sparsefinder predictors of {layers}",
        "not fitted yet (fit them, e.g. SparsefinderCallback)",
    ),
)
# Pre-training parts of a checkpoint that a model without them leaves unused, as BERT's own heads always have.
UNUSED_PRETRAINING = (r"(^|\.)pooler\.", r"^cls\.")


def report_new_weights(model: nn.Module, missing_keys) -> str | None:
    """One warning line naming the expected new weights among ``missing_keys`` (grouped, with tensor counts);
    keys outside :data:`EXPECTED_NEW` were already listed by Transformers' own load report."""
    parts = []
    for pattern, what, why in EXPECTED_NEW:
        keys = sorted(k for k in missing_keys if re.search(pattern, k))
        if keys:
            names = ", ".join(sorted({k.split(".")[0] for k in keys}))
            layers = sorted({int(m.group(1)) for k in keys if (m := re.search(r"layers?\.(\d+)\.", k))})
            layers = f"layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))}" if layers else "the model"
            parts.append(f"{what.format(names=names, layers=layers)} ({len(keys)} tensors): {why}")
    if not parts:
        return None
    line = f"{type(model).__name__}: new weights, not in the checkpoint (expected): " + "; ".join(parts)
    logger.warning(line)
    return line


def register_family(base: type, module: str, auto_classes: dict[type, str]) -> None:
    """Register each model class of a family for its Auto class (``{class: "AutoModelFor..."}``) and give the
    family's ``base`` the whole map as :attr:`ReportsNewWeights.auto_map_family` (``module``: the modeling module's
    ``__name__``, whose last part names the copied code file), from the one list."""
    for cls, auto in auto_classes.items():
        cls.register_for_auto_class(auto)
    base.auto_map_family = {auto: f"{module.rsplit('.', 1)[-1]}.{cls.__name__}" for cls, auto in auto_classes.items()}


class ReportsNewWeights:
    """Mixin (before ``PreTrainedModel``) for the loading behaviour above; a model adds its own checks of learned
    state in :meth:`check_loaded_state`, and names every class of its family in :attr:`auto_map_family`."""

    _keys_to_ignore_on_load_missing = [pattern for pattern, _, _ in EXPECTED_NEW]
    #: Auto class -> ``module.Class`` of every model class of the family (set by :func:`register_family`)
    auto_map_family: dict[str, str] = {}

    def __init_subclass__(cls, **kwargs):
        """Keep what the Transformers class below ignores too (Marian: its sinusoidal positions, final_logits_bias):
        this mixin comes first in the MRO, so its list would otherwise hide theirs."""
        super().__init_subclass__(**kwargs)
        ignored = [
            pattern for base in cls.__mro__ for pattern in (base.__dict__.get("_keys_to_ignore_on_load_missing") or [])
        ]
        cls._keys_to_ignore_on_load_missing = list(dict.fromkeys(ignored))

    @classmethod
    def check_loaded_state(cls, model, missing_keys: set[str], unexpected_keys) -> None:
        """Refuse a checkpoint that lost learned state (overridden per model)."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Transformers' loading, then a refusal of a checkpoint that lost learned state (a frozen DAM mask,
        fitted predictors): it would run with fresh, meaningless state, which Transformers only reports.

        Expected new weights (a task head, DAM gates, Sparsefinder predictors on a stock checkpoint) are said once
        in one plain line instead of Transformers' MISSING table; ``output_loading_info=True`` returns them in
        ``missing_keys`` all the same (every weight the checkpoint did not provide).
        """
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = model.__dict__.pop("_loaded_missing", None)  # set by tie_weights during loading
        if missing is None:
            missing = set(info["missing_keys"])
        ours = {pattern for pattern, _, _ in EXPECTED_NEW}
        theirs = [p for p in cls._keys_to_ignore_on_load_missing if p not in ours]  # e.g. Marian's sinusoids
        info["missing_keys"] = {k for k in missing if not any(re.search(p, k) for p in theirs)}
        # a tensor of the wrong shape (ignore_mismatched_sizes=True) was not loaded either: learned state lost
        mismatched = {key for key, *_ in info.get("mismatched_keys") or ()}
        cls.check_loaded_state(model, info["missing_keys"] | mismatched, info["unexpected_keys"])
        report_new_weights(model, info["missing_keys"])
        return (model, info) if wants_info else model

    def save_pretrained(self, *args, **kwargs):
        """Transformers' saving, with every head of the family in ``config.json``'s ``auto_map``: Transformers writes
        only the saved class's own Auto class, so a masked-LM checkpoint would load through remote code as
        nothing else (no ``AutoModelForSequenceClassification`` to fine-tune it, no ``AutoModel`` for features),
        as a stock BERT checkpoint does. Entries already there (e.g. a Hub repo's) are kept."""
        self.config.auto_map = {**self.auto_map_family, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(*args, **kwargs)

    def tie_weights(self, missing_keys: set[str] | None = None, recompute_mapping: bool = True):
        """Transformers' tying, with two additions while ``from_pretrained`` loads (``missing_keys`` given):

        * a tied pair the checkpoint lacks entirely (the masked-LM head's ``cls.predictions.bias`` and
          ``decoder.bias`` in a checkpoint without that head, e.g. a sentence encoder) is tied like any pair, with
          no "checkpoint seem corrupted" warning: the head is simply new, and reported as such;
        * the keys still missing after tying are kept for ``from_pretrained`` (its plain-words note and its
          checks of learned state), before Transformers drops the expected new ones from its report.
        """
        if missing_keys is None:
            return super().tie_weights(missing_keys, recompute_mapping)
        tied = getattr(self, "all_tied_weights_keys", None) or {}
        absent = {source for target, source in tied.items() if target in missing_keys and source in missing_keys}
        missing_keys -= absent  # Transformers' own set, changed in place as its tying does
        try:
            super().tie_weights(missing_keys, recompute_mapping)
        finally:
            missing_keys |= absent
        self._loaded_missing = set(missing_keys)
