"""nbval with numbers compared as numbers.

nbval compares a checked cell's text output character by character, so a value printed as
``+0.0105`` on one machine and ``+0.0106`` on another fails although the two differ in the
last bit before rounding. Here the text of a checked cell is split into numbers and the words
between them (whitespace runs count as one space, so a wider column does not matter); the
words must agree exactly, the numbers within a tolerance:

    |test - reference| <= max(units * one unit in the last decimal printed,
                              rel * |reference|, abs)

with ``units = 1``, ``rel = abs = 0`` unless the cell says otherwise: two runs whose values
differ by a rounding error can print neighbouring last digits, while an integer (a count) must
match exactly. A cell widens this with comment lines

    # NBVAL_TOLERANCE units=3
    # NBVAL_TOLERANCE lines=^5a abs=0.3

(the second only for the output lines its regular expression matches) where what it prints has passed through training, which amplifies rounding differences. The
widths are measured, not guessed: `scripts/code_paths.py` runs the smoke profile under several
CPU code paths of one machine and reports the spread per checked cell; each tolerance in the
notebooks states the spread that chose it. Outputs outside checked cells, images and errors
are nbval's business as before.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf)\b")
DIRECTIVE = re.compile(r"^\s*#\s*NBVAL_TOLERANCE\b(.*)$", re.MULTILINE)
SETTING = re.compile(r"(rel|abs|units)=([0-9.eE+-]+)|lines=(\S+)")


@dataclass(frozen=True)
class Tolerance:
    """How far a printed number may move: ``units`` units in its last printed decimal place,
    ``rel`` of its value, or ``abs``, whichever is widest. ``lines`` (a regular expression)
    limits it to the output lines it matches (:class:`CellTolerance`)."""
    rel: float = 0.0
    abs: float = 0.0
    units: float = 1.0
    lines: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Tolerance":
        """From ``rel=0.05 abs=0.5 units=3 lines=^\\s*5a`` (any subset, at least one)."""
        found = SETTING.findall(text)
        if SETTING.sub("", text).strip(" ,") or not found:
            raise ValueError(f"NBVAL_TOLERANCE {text.strip()!r}: expected settings rel=<number>, "
                             "abs=<number>, units=<number>, lines=<regex>")
        values = {}
        for name, number, lines in found:
            if lines:
                re.compile(lines)
                values["lines"] = lines
            else:
                values[name] = float(number)
        return cls(**values)

    def allowed(self, reference: str, test: str) -> float:
        """The largest deviation allowed between two printed numbers."""
        unit = max(last_place(reference), last_place(test))
        return max(self.units * unit, self.rel * abs(float(reference)), self.abs)


@dataclass(frozen=True)
class CellTolerance:
    """The tolerances a cell declares, one ``# NBVAL_TOLERANCE ...`` comment line each: the one
    without ``lines=`` applies to every output line (default: one unit in the last place), the
    last one whose ``lines`` matches a line applies to that line instead."""
    default: Tolerance = Tolerance()
    scoped: tuple[Tolerance, ...] = ()

    @classmethod
    def of_cell(cls, source: str) -> "CellTolerance":
        tolerances = [Tolerance.parse(text) for text in DIRECTIVE.findall(source)]
        defaults = [t for t in tolerances if t.lines is None]
        if len(defaults) > 1:
            raise ValueError("NBVAL_TOLERANCE without lines= may be declared once per cell")
        return cls(defaults[0] if defaults else Tolerance(),
                   tuple(t for t in tolerances if t.lines is not None))

    def for_line(self, line: str) -> Tolerance:
        matching = [t for t in self.scoped if re.search(t.lines, line)]
        return matching[-1] if matching else self.default


def last_place(token: str) -> float:
    """One unit in the last printed place of a number printed rounded: 0.01 for ``1.23``,
    1e-4 * 1e+30 for ``1.2677e+30``; 0 for an integer such as ``44`` (a count, exact)."""
    mantissa, _, exponent = token.lower().lstrip("+-").partition("e")
    if "." not in mantissa and not exponent:
        return 0.0
    decimals = len(mantissa.partition(".")[2])
    return 10.0 ** (int(exponent or 0) - decimals)


def split(text: str) -> tuple[list[str], list[str]]:
    """``(words, numbers)``: the text between numbers (whitespace runs as one space) and the
    numbers as printed."""
    numbers = NUMBER.findall(text)
    words = [" ".join(part.split()) for part in NUMBER.split(text)]
    return words, numbers


def differences(reference: str, test: str, tolerance) -> list[str] | None:
    """The numbers of ``test`` that lie outside ``tolerance`` (a :class:`Tolerance` or
    :class:`CellTolerance`) of ``reference``: a list of readable lines, empty when all agree;
    None when the texts differ in anything but numbers (words, or how many numbers)."""
    if isinstance(tolerance, Tolerance):
        tolerance = CellTolerance(tolerance)
    ref_lines = [line for line in reference.splitlines() if line.strip()]
    test_lines = [line for line in test.splitlines() if line.strip()]
    if len(ref_lines) != len(test_lines):
        return None
    out = []
    for ref_line, test_line in zip(ref_lines, test_lines):
        ref_words, ref_numbers = split(ref_line)
        test_words, test_numbers = split(test_line)
        if ref_words != test_words or len(ref_numbers) != len(test_numbers):
            return None
        line_tolerance = tolerance.for_line(ref_line)
        for r, t in zip(ref_numbers, test_numbers):
            a, b = float(r), float(t)
            if not (math.isfinite(a) and math.isfinite(b)):
                if not (a == b or (math.isnan(a) and math.isnan(b))):
                    out.append(f"{t} where the reference has {r}")
                continue
            allowed = line_tolerance.allowed(r, t)
            if abs(a - b) > allowed * (1 + 1e-9):
                out.append(f"{t} where the reference has {r} (allowed +-{allowed:.3g})")
    return out


def agree(reference: str, test: str, tolerance) -> bool:
    """Whether ``test`` is ``reference`` up to numbers within ``tolerance``."""
    return differences(reference, test, tolerance) == []


# ------------------------------------------------------------------------- the nbval hook
TEXT_KEYS = ("text/plain",)


def _align(cell_source: str, reference_outputs, test_outputs) -> None:
    """Where a test output's text agrees with the reference's within the cell's tolerance,
    give it the reference's text, so that nbval's own exact comparison accepts it (and shows
    its usual diff where it does not). Streams are matched by name, others by position."""
    tolerance = CellTolerance.of_cell(cell_source)
    streams = {o["name"]: o for o in reference_outputs if o.get("output_type") == "stream"}
    others = [o for o in reference_outputs if o.get("output_type") != "stream"]
    tests = [o for o in test_outputs if o.get("output_type") != "stream"]
    for test in test_outputs:
        ref = streams.get(test.get("name")) if test.get("output_type") == "stream" else None
        if ref is not None and agree(ref["text"], test["text"], tolerance):
            test["text"] = ref["text"]
    for ref, test in zip(others, tests):
        for key in TEXT_KEYS:
            r, t = ref.get("data", {}).get(key), test.get("data", {}).get(key)
            if isinstance(r, str) and isinstance(t, str) and agree(r, t, tolerance):
                test["data"][key] = r


def install() -> None:
    """Make nbval compare checked cells through :func:`agree` (called from conftest)."""
    from nbval import plugin

    if getattr(plugin.IPyNbCell.compare_outputs, "tolerant", False):
        return
    original = plugin.IPyNbCell.compare_outputs

    def compare_outputs(self, test, ref, skip_compare=None):
        _align(self.cell.source, ref, test)
        return original(self, test, ref, skip_compare)

    compare_outputs.tolerant = True
    plugin.IPyNbCell.compare_outputs = compare_outputs
