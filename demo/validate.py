"""Every endpoint's arguments are checked here, one rule per kind of argument.

The API endpoints take their arguments unprocessed (``preprocess=False``), so that a client
sending a string for ``k``, "false" for a checkbox or a rank of 1e9 gets one clear line from
these rules instead of a Gradio preprocessing exception. The UI sends the same values the
rules accept. Each rule returns the clean value or raises ValueError with a message for the
user (demo.handlers turns it into a gr.Error).
"""

from __future__ import annotations

import math
from typing import Any

TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _show(value: Any) -> str:
    s = " ".join(str(value).split())
    return repr(s if len(s) <= 40 else s[:39] + "…")


def as_number(value: Any, name: str) -> float:
    """A finite number: int, float or a numeric string (not a bool, not NaN)."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a number, not {_show(value)}.")
    try:
        x = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, not {_show(value)}.") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, not {_show(value)}.")
    return x


def as_int(value: Any, name: str, lo: int, hi: int, clamp: bool = True) -> int:
    """A whole number; outside [lo, hi]: clamped (counts such as k) or refused (clamp=False)."""
    x = as_number(value, name)
    if x != int(x):
        raise ValueError(f"{name} must be a whole number, not {_show(value)}.")
    v = int(x)
    if not lo <= v <= hi:
        if not clamp:
            raise ValueError(f"{name} must be from {lo} to {hi}, not {v}.")
        v = max(lo, min(hi, v))
    return v


def as_bool(value: Any, name: str) -> bool:
    """True / False, or what a form sends for them: "true"/"false", 1/0, "yes"/"no", "on"/"off"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise ValueError(f"{name} must be true or false, not {_show(value)}.")


def as_rank(value: Any, n: int) -> int:
    """A 1-based result rank among n results."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError("Select a result first (click a tile or a table row).")
    try:
        return as_int(value, "Result rank", 1, n, clamp=False)
    except ValueError as e:
        if "must be from" in str(e):
            raise ValueError(f"There is no result #{int(as_number(value, 'rank'))}: the last search returned "
                             f"{n}.") from None
        raise


def as_text(value: Any, name: str) -> str:
    """A string (None: empty)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, not {type(value).__name__}.")
    return value
