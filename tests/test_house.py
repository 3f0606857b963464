"""The library stays readable: short functions (a long one says why in its docstring), no code
repeated across modules, and no reference to documents outside the repository."""

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "irn").glob("**/*.py"))
CORE = sorted((ROOT / "irn").glob("*.py"))
MAX_LINES = 60
MAX_LONG_FUNCTIONS = 2
MAX_BLOCK_LINES = 180
#: imports made inside a function, each for a reason other than breaking a cycle
DEFERRED_IMPORTS = {
    ("irn.compiled", "irn._kernels"): "numba is an optional extra: import irn must not need it",
    ("irn.compiled", "numba"): "the same extra, for its thread count",
    ("irn.paper.plotting", "seaborn"): "seaborn (slow to import) only for the robustness figures",
    ("irn.paper.parallel", "distributed"): "Dask only where a scheduler is given",
    ("irn.paper.data", "sklearn.datasets"): "scikit-learn only for the digits",
}
WINDOW = 6  # consecutive code lines that count as a repeated block


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def length(node) -> int:
    """Lines of a function, its docstring excluded (documentation is welcome; code is what a
    reader has to hold in their head)."""
    body = node.body
    doc = (body[0].end_lineno - body[0].lineno + 1 if body and isinstance(body[0], ast.Expr)
           and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)
           else 0)
    return node.end_lineno - node.lineno + 1 - doc


def test_no_long_function_without_a_reason():
    """A function over 60 lines (docstring excluded) states why in its docstring, in a
    paragraph ``Length: ...``."""
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)"
            for path in LIBRARY for node in functions(path)
            if (lines := length(node)) > MAX_LINES
            and "Length:" not in (ast.get_docstring(node) or "")]
    assert not long, "functions over 60 lines without a 'Length:' reason:\n" + "\n".join(long)


def test_at_most_two_long_functions_and_a_short_block():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}" for path in LIBRARY
            for node in functions(path) if length(node) > MAX_LINES]
    assert len(long) <= MAX_LONG_FUNCTIONS, long
    (block,) = [node for node in ast.walk(ast.parse((ROOT / "irn" / "layers.py").read_text()))
                if isinstance(node, ast.ClassDef) and node.name == "ImplicitResidualBlock"]
    assert block.end_lineno - block.lineno + 1 <= MAX_BLOCK_LINES


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path):
    """``(imported module, inside a function)`` for every import of ``path``, relative ones
    resolved; ``from package import name`` counts as an import of ``package.name`` where that
    is a module of the package."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in nested
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                module = candidate if (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists() \
                    or (ROOT / Path(*candidate.split(".")) / "__init__.py").exists() else base
                yield module, id(node) in nested


def import_graph():
    return {module_name(path): {m for m, _ in imports(path) if m.split(".")[0] == "irn"}
            for path in LIBRARY}


def test_the_core_imports_nothing_of_the_paper_harness():
    core = {module_name(path) for path in CORE}
    wrong = sorted(f"{m} imports {d}" for m, deps in import_graph().items() if m in core
                   for d in deps if d.startswith("irn.paper"))
    assert not wrong, wrong


def cycles(graph: dict) -> list:
    """The import cycles of ``graph`` (module -> imported modules), each as a path."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if dep == node or dep not in graph:
                continue
            if state.get(dep) == "open":
                found.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle():
    full = import_graph()
    core = {module_name(path) for path in CORE} - {"irn"}
    # the front door imports the core, never the other way round (the harness may use it)
    assert not sorted(m for m in core if "irn" in full[m])
    graph = {m: {d for d in deps if d != "irn"} for m, deps in full.items()}
    graph.pop("irn", None)
    assert not cycles(graph), cycles(graph)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_inside_a_function_but_for_optional_dependencies():
    deferred = {(module_name(path), m) for path in LIBRARY for m, inside in imports(path) if inside}
    assert deferred <= set(DEFERRED_IMPORTS), sorted(deferred - set(DEFERRED_IMPORTS))


def code_lines(path: Path) -> list[tuple[int, str]]:
    """``(line number, line)`` of a module's code: stripped, without blank lines, comments and
    docstrings."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#")[0].strip() if not line.strip().startswith(("'", '"')) else line.strip()
        if text and number not in docstrings:
            lines.append((number, text))
    return lines


def repeated_blocks(paths, root: Path = ROOT) -> list[str]:
    """Runs of ``WINDOW`` identical code lines found in two different modules."""
    seen = defaultdict(set)
    for path in paths:
        lines = code_lines(path)
        for i in range(len(lines) - WINDOW + 1):
            block = tuple(text for _, text in lines[i:i + WINDOW])
            if sum(len(t) for t in block) > 120:  # not a run of brackets and short keywords
                seen[block].add(f"{path.relative_to(root)}:{lines[i][0]}")
    return sorted(" ~ ".join(sorted(places)) for places in seen.values()
                  if len({p.split(":")[0] for p in places}) > 1)


def test_no_block_repeated_across_modules():
    repeated = repeated_blocks(LIBRARY)
    assert not repeated, "the same code in two modules (make it one function):\n" + "\n".join(repeated)


def test_the_repetition_check_finds_a_copy(tmp_path):
    source = (ROOT / "irn" / "stability.py").read_text()
    (tmp_path / "irn").mkdir()
    for name in ("a.py", "b.py"):
        (tmp_path / "irn" / name).write_text(source)
    assert repeated_blocks(sorted((tmp_path / "irn").glob("*.py")), tmp_path)


def test_no_reference_to_documents_outside_the_repository():
    """Docstrings, comments, notebooks and parameters cite docs/design.md, which a reader of the
    repository has, not a specification kept elsewhere."""
    outside = re.compile(r"\bSPEC\b|shared/")
    files = [*LIBRARY, *(ROOT / "notebooks").glob("*.ipynb"), *(ROOT / "params").glob("*.yaml"),
             *(ROOT / "tests").glob("*.py"), ROOT / "README.md"]
    hits = [f"{path.relative_to(ROOT)}:{n}" for path in files if path != Path(__file__)
            for n, line in enumerate(path.read_text().splitlines(), 1) if outside.search(line)]
    assert not hits, "references to a document outside the repository: " + ", ".join(hits)


def notebook_code_lines(path: Path) -> int:
    import json

    cells = json.loads(path.read_text())["cells"]
    return sum(1 for cell in cells if cell["cell_type"] == "code"
               for line in "".join(cell["source"]).splitlines() if line.strip())


def test_notebooks_keep_the_story():
    """Notebooks 2-4 together hold at most 340 non-blank code lines, parameters included: the
    plumbing lives in irn/paper/."""
    paths = sorted((ROOT / "notebooks").glob("0[234]_*.ipynb"))
    assert len(paths) == 3
    assert sum(map(notebook_code_lines, paths)) <= 340


#: the core's modules below the public boundary: they see the member layout (E, B, ...) only
MEMBER_LAYOUT_ONLY = ("driver.py", "solvers.py", "linear.py", "records.py", "config.py",
                      "precision.py", "compiled.py")
ONE_OR_MANY = re.compile(r"members is (not )?None|members or 1|not (self\.|p\.)?members\b|"
                        r"(members|E) == 1|\bensemble\b.*\bif\b|lead = 1")


def test_no_branch_on_one_network_versus_an_ensemble_below_the_boundary():
    """Inside the library one network is an ensemble of one: the solvers, their driver, the
    records and the compiled path never ask which it is (backward.py asks once, where it lifts
    a user's F on (B, *) to the member layout)."""
    found = [f"irn/{name}:{n}" for name in MEMBER_LAYOUT_ONLY
             for n, line in enumerate((ROOT / "irn" / name).read_text().splitlines(), 1)
             if ONE_OR_MANY.search(line.split("#")[0])]
    assert not found, found
    backward = (ROOT / "irn" / "backward.py").read_text()
    assert len(re.findall(r"members is (not )?None", backward)) == 1
