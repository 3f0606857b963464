"""How much the nbval-checked outputs move between CPU code paths of one machine: the stand-in
for "another machine" that chose the tolerances of the regression references.

    python scripts/code_paths.py run build/paths            # smoke profile under each path
    python scripts/code_paths.py compare build/paths        # spread per checked cell
    python scripts/code_paths.py with generic pytest ...    # a command under one code path

``run`` executes every notebook with the smoke profile (no cache: every model is trained anew)
under each code path of :data:`CODE_PATHS`, into ``build/paths/<path>/``. ``compare`` prints,
for each checked cell of the references in ``tests/notebooks/``, the largest deviation of any
printed number on any path (relative, and in units of the last printed digit) and whether the
cell's declared tolerance (``# NBVAL_TOLERANCE``, see ``tests/tolerant_nbval.py``) accepts it.
It exits non-zero when one is not accepted. ``with`` runs a command under one code path:
`make test` checks the notebooks under the Makefile's pin and again under ``generic``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tolerant_nbval import CellTolerance, Tolerance, differences, last_place, split  # noqa: E402

# The Makefile's pin (AVX2 everywhere), PyTorch's and numpy's generic kernels with MKL and
# oneDNN at their most conservative, and this CPU's own widest kernels, unpinned.
CODE_PATHS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "generic": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
                "ONEDNN_MAX_CPU_ISA": "SSE41",
                "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR"},
    "native": {"ATEN_CPU_CAPABILITY": "avx512"},
    # the Makefile's pin on irn's generic path instead of the compiled one
    "torch-backend": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
                      "ONEDNN_MAX_CPU_ISA": "AVX2", "IRN_BACKEND": "torch"},
}
PINS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "NPY_DISABLE_CPU_FEATURES",
        "IRN_BACKEND")
REFERENCES = ROOT / "tests" / "notebooks"


def environment(name: str) -> dict[str, str]:
    """This process's environment with the pins of code path ``name`` (and no other pin)."""
    if name not in CODE_PATHS:
        raise ValueError(f"code path {name!r}: expected one of {', '.join(CODE_PATHS)}")
    pins = dict(CODE_PATHS[name])
    if os.uname().machine != "x86_64":  # arm64 has PyTorch's default kernels, no x86 pins
        pins = ({"ATEN_CPU_CAPABILITY": "default"} if name == "generic" else {}) \
            | {k: v for k, v in pins.items() if k == "IRN_BACKEND"}
    return {k: v for k, v in os.environ.items() if k not in PINS} | pins


def run(out: Path) -> int:
    subprocess.run([sys.executable, "scripts/split_params.py", "params/smoke.yaml",
                    str(out / "params")], cwd=ROOT, check=True)
    for name in CODE_PATHS:
        env = environment(name)
        for notebook in sorted(REFERENCES.glob("*.ipynb")):
            subprocess.run([sys.executable, "scripts/run_notebook.py",
                            f"notebooks/{notebook.name}", "--params",
                            str(out / "params" / f"{notebook.stem}.yaml"), "--output",
                            str(out / name / notebook.name), "--figures",
                            str(out / name / "figures")], cwd=ROOT, env=env, check=True)
    return 0


def text_of(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream" and output.get("name") == "stdout":
            parts.append(output["text"])
        elif "text/plain" in output.get("data", {}):
            parts.append(output["data"]["text/plain"])
    return "".join(parts)


def checked_cells(path: Path) -> dict[int, nbformat.NotebookNode]:
    notebook = nbformat.read(str(path), as_version=4)
    return {i: c for i, c in enumerate(notebook.cells)
            if c.cell_type == "code" and "NBVAL_CHECK_OUTPUT" in c.source}


def spread(reference: str, others: list[str]) -> tuple[float, float, float]:
    """Largest deviation of any number in ``others`` from ``reference``: absolute, relative,
    and in units of the last printed digit (inf when the words differ)."""
    worst = (0.0, 0.0, 0.0)
    ref_words, ref_numbers = split(reference)
    for other in others:
        words, numbers = split(other)
        if words != ref_words or len(numbers) != len(ref_numbers):
            return (float("inf"),) * 3
        for r, t in zip(ref_numbers, numbers):
            a, b = float(r), float(t)
            if a != b and a == a and b == b:
                unit = max(last_place(r), last_place(t)) or 1.0
                worst = tuple(map(max, worst, (abs(a - b), abs(a - b) / abs(a) if a else 0.0,
                                               abs(a - b) / unit)))
    return worst


def compare(out: Path) -> int:
    """Print the spread of every checked cell (and of each output line that a cell gives its
    own tolerance) over the code paths, and whether the declared tolerances accept it."""
    failures = 0
    print(f"{'notebook':<28}{'cell':>5}{'lines':>14}{'max abs':>10}{'max rel':>9}{'units':>7}"
          f"  accepted  declared")
    for reference in sorted(REFERENCES.glob("*.ipynb")):
        runs = {name: checked_cells(out / name / reference.name) for name in CODE_PATHS
                if (out / name / reference.name).exists()}
        for index, cell in checked_cells(reference).items():
            ref_text, tolerance = text_of(cell), CellTolerance.of_cell(cell.source)
            others = [text_of(cells[index]) for cells in runs.values()]
            problems = {name: differences(ref_text, other, tolerance)
                        for name, other in zip(runs, others)}
            accepted = all(p == [] for p in problems.values())
            failures += not accepted
            groups = {None: tolerance.default} | {t.lines: t for t in tolerance.scoped}
            for lines, declared in groups.items():
                keep = [i for i, line in enumerate(ref_text.splitlines())
                        if tolerance.for_line(line) is declared]
                pick = lambda text: "\n".join(text.splitlines()[i] for i in keep)
                worst = spread(pick(ref_text), [pick(o) for o in others])
                setting = " ".join(f"{k}={getattr(declared, k):g}" for k in ("units", "rel", "abs")
                                   if getattr(declared, k) != Tolerance.__dataclass_fields__[k].default)
                print(f"{reference.stem:<28}{index:>5}{lines or 'all':>14}{worst[0]:>10.2g}"
                      f"{worst[1]:>9.2g}{worst[2]:>7.3g}  {'yes' if accepted else 'NO ':<8}  "
                      f"{setting or 'one unit'}")
            for name, problem in problems.items():
                for line in problem if problem is not None else ["words differ"]:
                    print(f"{'':>37}{name}: {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 2 else None
    if command == "with":
        name, argv = sys.argv[2], sys.argv[3:]
        print(f"[code path] {name}: " + " ".join(f"{k}={v}" for k, v in environment(name).items()
                                                 if k in PINS), flush=True)
        os.execvpe(argv[0], argv, environment(name))
    if command not in ("run", "compare"):
        sys.exit(__doc__)
    sys.exit({"run": run, "compare": compare}[command](Path(sys.argv[2])))
