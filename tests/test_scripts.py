"""The notebook runner and the profile splitter: bad parameters fail loudly."""

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)


def test_unknown_parameter_fails_naming_it(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("h: 0.2\nstpes: 10\n")
    result = run("scripts/run_notebook.py", "notebooks/01_linear_stability.ipynb",
                 "--params", str(params), "--output", str(tmp_path / "out.ipynb"),
                 "--figures", str(tmp_path / "figures"))
    assert result.returncode != 0
    assert "stpes" in result.stderr and "unknown parameter" in result.stderr
    assert not (tmp_path / "figures").exists()


def test_unknown_override_fails_naming_it(tmp_path):
    result = run("scripts/run_notebook.py", "notebooks/03_two_spirals.ipynb", "-p", "epoch", "3",
                 "--output", str(tmp_path / "out.ipynb"), "--figures", str(tmp_path / "f"))
    assert result.returncode != 0 and "epoch" in result.stderr


def test_profiles_only_name_declared_parameters():
    """Every key of every profile is a parameter of its notebook (checked without running)."""
    import papermill

    for profile in sorted((ROOT / "params").glob("*.yaml")):
        for notebook, values in yaml.safe_load(profile.read_text()).items():
            declared = papermill.inspect_notebook(str(ROOT / "notebooks" / f"{notebook}.ipynb"))
            assert set(values) <= set(declared), (profile.name, notebook)


def test_split_params_rejects_unknown_section(tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("99_no_such_notebook:\n  x: 1\n")
    result = run("scripts/split_params.py", str(profile), str(tmp_path / "out"))
    assert result.returncode != 0 and "99_no_such_notebook" in result.stderr


def test_split_params_rewrites_only_changed_files(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text("01_linear_stability:\n  h: 0.1\n03_two_spirals:\n  epochs: 5\n")
    out = tmp_path / "out"
    assert run("scripts/split_params.py", str(profile), str(out)).returncode == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    profile.write_text("01_linear_stability:\n  h: 0.2\n03_two_spirals:\n  epochs: 5\n")
    assert run("scripts/split_params.py", str(profile), str(out)).returncode == 0
    second = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert second["03_two_spirals.yaml"] == first["03_two_spirals.yaml"]
    assert second["01_linear_stability.yaml"] != first["01_linear_stability.yaml"]
    assert yaml.safe_load((out / "01_linear_stability.yaml").read_text()) == {"h": 0.2}


def test_nbval_references_run_the_current_notebooks():
    """nbval re-executes the cells stored in tests/notebooks/: they must be the notebooks' own
    (a stale reference would check old code). `make references` regenerates them."""
    import nbformat

    for source in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        reference = ROOT / "tests" / "notebooks" / source.name
        assert reference.exists(), f"no nbval reference for {source.name}: run make references"
        cells = [c.source for c in nbformat.read(source, 4).cells]
        ref_cells = [c.source for c in nbformat.read(reference, 4).cells
                     if "injected-parameters" not in c.metadata.get("tags", [])]
        assert cells == ref_cells, f"{reference} is stale: run make references"
