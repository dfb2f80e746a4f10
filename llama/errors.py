"""The one exception type that reaches the user as a single line (app.py exits 2 on it)."""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: a file, flag or field that is wrong. The message names it."""
