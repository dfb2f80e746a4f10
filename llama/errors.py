"""The one exception type that reaches the user as a single line (app.py exits 2 on it), and its wording."""
from __future__ import annotations

from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user: a file, flag or field that is wrong. The message names it."""


def first_named(names: list[str], label: Callable[[str], str] = repr) -> str:
    """"'a'" or "'a' and 3 more": how a message names what is missing without listing it all."""
    return label(names[0]) + (f" and {len(names) - 1} more" if len(names) > 1 else "")
