"""Checks of setting values, with messages that name the setting, the bad value and what would be valid.

Configs are plain JSON: a hand-edited ``config.json`` can hold ``"penalty": "big"``, ``"hard": "no"`` or
``NaN``. Every setting is checked here when a config or callback is built, so a bad value fails there, by name,
instead of as an opaque error (or a silent NaN) at the first forward. Imported by remote code: standard library
only.
"""

from __future__ import annotations

import math


def check_choice(name: str, value, valid: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid values: {', '.join(valid)}")
    return value


def check_number(
    name: str,
    value,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    why: str = "",
) -> float:
    """A finite real number (not a bool, not a string) within the bounds; returned as ``float``."""
    bounds = []
    if above is not None:
        bounds.append(f"> {above:g}")
    if at_least is not None:
        bounds.append(f">= {at_least:g}")
    if at_most is not None:
        bounds.append(f"<= {at_most:g}")
    wanted = "a finite number" + (" " + " and ".join(bounds) if bounds else "") + (f" ({why})" if why else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    if (
        (above is not None and not value > above)
        or (at_least is not None and not value >= at_least)
        or (at_most is not None and not value <= at_most)
    ):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return float(value)


def check_int(name: str, value, *, at_least: int | None = None, at_most: int | None = None) -> int:
    """A whole number (an ``int``, not a bool, not ``1.5``) within the bounds."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if (at_least is not None and value < at_least) or (at_most is not None and value > at_most):
        low = "" if at_least is None else f">= {at_least}"
        high = "" if at_most is None else f"<= {at_most}"
        raise ValueError(f"{name} must be a whole number {' and '.join(b for b in (low, high) if b)}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """``True`` or ``False`` (JSON true/false): not ``"no"``, which Python would read as true."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_settings_dict(name: str, value, example: str) -> dict:
    """A dict of settings (or a mistake such as ``dam="offset"`` named as one)."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of settings such as {example} (or None), got {value!r}")
    return value
