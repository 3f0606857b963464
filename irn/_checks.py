"""Argument checks shared by every module: a bad argument is a ``ValueError`` that names it
and says what is allowed."""

from __future__ import annotations


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``."""
    if not condition:
        raise ValueError(message)


def choice(name: str, value, allowed) -> None:
    """``value`` must be one of ``allowed``; the message names ``name`` and lists them."""
    require(value in allowed, f"{name} must be one of {tuple(allowed)}, got {value!r}")
