"""Values that reach the code as config entries or command-line overrides (``--amp false``) and need parsing.

A module of its own, importing nothing from the bundle, so that the inferers, the resilience handlers and anything
else that reads a switch can share it without import cycles.
"""

from __future__ import annotations

from typing import Any

TRUE_STRINGS = ("1", "true", "yes", "on")
FALSE_STRINGS = ("0", "false", "no", "off")


def parse_bool(value: Any, name: str = "value") -> bool:
    """``value`` as a bool.

    Args:
        value: a bool (Python's or NumPy's), the integer 0 or 1, or one of :data:`TRUE_STRINGS` /
            :data:`FALSE_STRINGS` (any case, surrounding spaces ignored).
        name: the setting's name, for the error message.

    Raises:
        ValueError: any other value (the message names ``name`` and the value).
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE_STRINGS:
            return True
        if text in FALSE_STRINGS:
            return False
    elif isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):  # Python's and NumPy's bools
        return bool(value)
    elif hasattr(value, "__index__") and int(value) in (0, 1):  # integers 0/1, NumPy's too
        return bool(value)
    raise ValueError(f"{name} must be a boolean (true/false, yes/no, on/off, 1/0), got {value!r}")
