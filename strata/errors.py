"""Errors Strata raises. Every one names the field at fault and what is allowed."""

from __future__ import annotations

import difflib
from typing import Iterable


class StrataError(Exception):
    """Base class of Strata's own errors."""


class ConfigError(StrataError, ValueError):
    """A configuration value is missing, misspelt, of the wrong type or out of range."""


class StoreError(StrataError, ValueError):
    """A store call got input it cannot serve (unknown namespace, oversized object, ...)."""


class OffloadError(StrataError, ValueError):
    """offload()/load() got input it cannot serve; the message says what to pass instead."""


def allowed(field: str, got: object, choices: Iterable[str]) -> str:
    """One message for 'field got X; allowed: a, b, c (did you mean b?)'."""
    choices = sorted(str(c) for c in choices)
    msg = f"{field}: got {got!r}; allowed: {', '.join(choices)}"
    close = difflib.get_close_matches(str(got), choices, n=1)
    if close:
        msg += f" (did you mean {close[0]!r}?)"
    return msg
