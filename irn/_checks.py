"""Argument checks shared by every module: a bad argument is a ``ValueError`` that names it
and says what is allowed."""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``."""
    if not condition:
        raise ValueError(message)


def choice(name: str, value, allowed) -> None:
    """``value`` must be one of ``allowed``; the message names ``name`` and lists them."""
    require(value in allowed, f"{name} must be one of {tuple(allowed)}, got {value!r}")


def number(name: str, value, condition=lambda v: True, allowed: str = "a finite number") -> None:
    """``value`` must be a finite real number (not a bool, not a string) with ``condition``;
    the message names ``name`` and ``allowed``."""
    require(isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value) and condition(value),
            f"{name} must be {allowed}, got {value!r}")


def integer(name: str, value, low: int = 1) -> None:
    """``value`` must be an int (not a bool) ``>= low``."""
    require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
            f"{name} must be an int >= {low}, got {value!r}")


def per_member(name: str, value, members: int | None):
    """A setting given for one network (``members`` None: one value, not a sequence) or for an
    ensemble of ``members`` (one value for all, or a sequence of one per member): the value, or
    a list of ``members`` values."""
    sequence = isinstance(value, (list, tuple))
    if members is None:
        require(not sequence, f"{name} must be a single value for a single network, got {value!r}")
        return value
    values = list(value) if sequence else [value] * members
    require(len(values) == members, f"{name} must be one value or one per member ({members}), "
                                    f"got {len(values)}")
    return values


def missing_extra(user: str, err: ImportError) -> ImportError:
    """The error for a module of the examples (tables, training loop, plots) whose optional
    dependencies are not installed: ``import irn`` and its layers need only torch and numpy."""
    return ImportError(f"{user} needs {err.name or err}, one of the optional dependencies of "
                       f"irn's examples: pip install 'irn[examples]'")


def keywords(*also: str):
    """Decorate a function (a constructor, a ``with_settings``) so that an unknown keyword
    argument is a ``TypeError`` naming the allowed keywords (its own and ``also``, those it
    passes on through ``**kwargs``) and the closest one. The signature stays the function's own
    (``inspect.signature`` and ``help`` follow ``__wrapped__``)."""
    def decorate(function):
        parameters = inspect.signature(function).parameters
        own = [n for n, p in parameters.items() if n != "self"
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        allowed = own + [n for n in also if n not in own]
        known = frozenset(allowed)
        name = function.__qualname__.removesuffix(".__init__")

        @functools.wraps(function)
        def checked(*args, **kwargs):
            for key in kwargs:
                if key not in known:
                    close = difflib.get_close_matches(key, allowed, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise TypeError(f"{name}() got an unexpected keyword argument {key!r}{hint}; "
                                    f"allowed: {', '.join(allowed)}")
            return function(*args, **kwargs)
        return checked
    return decorate
