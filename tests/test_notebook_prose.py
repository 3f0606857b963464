"""Every number a notebook's prose quotes is one its outputs print (or its parameters set).

The executed notebooks of the paper profile (notebooks/executed/) carry the prose and the
outputs together; a number in a markdown cell with a decimal point (99.5, -0.61, 1e-6) must
appear, with the same digits, in that notebook's outputs or code. So when a rerun changes a
result and the prose is not re-read, `make test` fails here.
"""

import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = sorted((ROOT / "notebooks" / "executed").glob("[0-9]*.ipynb"))
#: a quoted number: digits with a decimal point, or in scientific notation
NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+(?:e[-+]?\d+)?|\d+e[-+]?\d+)(?![\w.]*\d)")


def _outputs(nb) -> str:
    """All text the notebook shows besides its prose: outputs and code."""
    parts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        parts.append(cell.source)
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


#: math, display or inline, paired left to right (a number alone in $...$ is still a result)
MATH = re.compile(r"\$\$.*?\$\$|\$[^$]*\$", re.S)


def _formulas_removed(markdown: str) -> str:
    """``markdown`` without its formulas (math holding a letter or a command: a definition, not
    a result); math that holds only a number stays and is checked."""
    return MATH.sub(lambda m: " " if re.search(r"[A-Za-z\\]", m.group()) else m.group(), markdown)


def quoted_numbers(markdown: str) -> list[str]:
    """The numbers a markdown text quotes (see :data:`NUMBER`), outside formulas and arXiv
    identifiers."""
    return NUMBER.findall(_formulas_removed(re.sub(r"arXiv:\s*\d+\.\d+", "", markdown)))


def printed(number: str, text: str) -> bool:
    """Whether ``number`` appears in ``text`` as printed (not as part of a longer number)."""
    return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", text) is not None


def test_quoted_numbers_are_found_as_printed():
    assert quoted_numbers("$+0.27$ decades, 99.5% and 1e-6; seeds 2 and 6; v2.13 (arXiv:1905.10479)") == \
        ["0.27", "99.5", "1e-6"]
    assert quoted_numbers(r"class 1 is $(r_i + 0.2)$, $[-0.05, +0.67]$, $\sigma = 0.1$") == \
        ["0.05", "0.67"]
    # text between two numbers in math is prose, not a formula: its numbers are checked
    assert quoted_numbers(r"$+0.04$ and so 0.109 decades, $-1.2$; $\theta = 0.5$ at 0.3") == \
        ["0.04", "0.109", "1.2", "0.3"]
    assert printed("0.27", "estimate +0.27 [") and not printed("0.27", "0.272")
    assert not printed("2.1", "12.1") and printed("2.1", "(2.1,")


@pytest.mark.parametrize("path", EXECUTED, ids=lambda p: p.stem)
def test_prose_numbers_come_from_the_outputs(path):
    nb = nbformat.read(str(path), as_version=4)
    text = _outputs(nb)
    missing = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            gone = [n for n in quoted_numbers(cell.source) if not printed(n, text)]
            if gone:
                missing[f"cell {i}"] = gone
    assert not missing, f"{path.name}: numbers in the prose that no output prints: {missing}"


@pytest.mark.parametrize("path", EXECUTED, ids=lambda p: p.stem)
def test_executed_prose_is_the_source_prose(path):
    # the check above reads the executed copy: it must hold the notebook's current prose
    source = nbformat.read(str(ROOT / "notebooks" / path.name), as_version=4)
    executed = nbformat.read(str(path), as_version=4)
    prose = [[c.source for c in nb.cells if c.cell_type == "markdown"] for nb in (source, executed)]
    assert prose[0] == prose[1], f"{path.name}: re-run `make figures` or copy the prose over"
