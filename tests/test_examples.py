"""The examples (examples/*.py) run at a tiny size, and every Python snippet of the README and
of the docs runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
SNIPPET = re.compile(r"```python\n(.*?)```", re.S)
RST_SNIPPET = re.compile(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)")


def snippets():
    """``(file:line, code)`` of every Python snippet in README.md and docs/ (Markdown fences
    and reStructuredText code blocks)."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        found += [(f"{path.name}:{text[:m.start()].count(chr(10)) + 1}", m.group(1))
                  for m in SNIPPET.finditer(text)]
    for path in sorted((ROOT / "docs").glob("*.rst")):
        text = path.read_text()
        found += [(f"{path.name}:{text[:m.start()].count(chr(10)) + 1}",
                   re.sub(r"^   ", "", m.group(1), flags=re.M)) for m in RST_SNIPPET.finditer(text)]
    return found


def test_there_are_three_examples_and_snippets_to_run():
    assert [p.name for p in EXAMPLES] == ["classifier_with_fallback.py",
                                          "custom_residual_function.py", "ensemble_of_seeds.py"]
    assert len(snippets()) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_example_runs_at_a_tiny_size(path):
    done = subprocess.run([sys.executable, str(path), "--tiny"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "converged" in done.stdout  # each prints what its solves did


@pytest.mark.parametrize("where, code", snippets(), ids=[w for w, _ in snippets()])
def test_a_snippet_of_the_readme_or_the_docs_runs(where, code):
    # a process of its own: a snippet may register a solver, or change global state
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{where}:\n{done.stderr}"
