"""The notebook runner and the profile splitter: bad parameters fail loudly."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def split_params():
    """scripts/split_params.py as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("split_params", ROOT / "scripts" / "split_params.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

    for profile in sorted(p for p in (ROOT / "params").glob("*.yaml") if p.name != "plan.yaml"):
        for notebook, values in split_params().load(profile).items():
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


def test_a_profile_extends_another_parameter_by_parameter(tmp_path):
    (tmp_path / "base.yaml").write_text("01_linear_stability:\n  h: 0.1\n  steps: 100\n"
                                        "03_two_spirals:\n  seeds: [0]\n")
    (tmp_path / "p.yaml").write_text("extends: base.yaml\n01_linear_stability:\n  h: 0.2\n")
    out = tmp_path / "out"
    assert run("scripts/split_params.py", str(tmp_path / "p.yaml"), str(out)).returncode == 0
    assert yaml.safe_load((out / "01_linear_stability.yaml").read_text()) == {"h": 0.2, "steps": 100}
    assert yaml.safe_load((out / "03_two_spirals.yaml").read_text()) == {"seeds": [0]}


@pytest.mark.parametrize("base, profile", [("paper", "half"), ("pilot", "pilot_half")])
def test_the_half_profiles_halve_only_the_budgets_on_the_same_seeds(base, profile):
    factor = 0.5
    paper, other = (split_params().load(ROOT / "params" / f"{p}.yaml") for p in (base, profile))
    changed = {(nb, key) for nb in paper for key in paper[nb] if paper[nb][key] != other[nb][key]}
    assert changed == {("02_function_approximation", "epochs"), ("02_function_approximation", "lr_step"),
                       ("03_two_spirals", "training_settings"), ("04_robustness", "spirals"),
                       ("04_robustness", "digits"), ("04_robustness", "example1")}
    budgets = [(paper["02_function_approximation"], other["02_function_approximation"])]
    budgets += [(paper["03_two_spirals"]["training_settings"][d], other["03_two_spirals"]["training_settings"][d])
                for d in ("swiss_roll", "two_spirals")]
    budgets += [(paper["04_robustness"][k], other["04_robustness"][k]) for k in ("spirals", "digits", "example1")]
    for before, after in budgets:  # epochs scaled (rounded up), every other setting kept
        assert after["epochs"] == math.ceil(factor * before["epochs"])
        assert {k: v for k, v in after.items() if k not in ("epochs", "lr_step")} == \
            {k: v for k, v in before.items() if k not in ("epochs", "lr_step")}


def test_the_confirmatory_profile_is_the_pilot_on_the_plans_fresh_seeds():
    """params/paper.yaml changes only the seeds of the pilot (params/pilot.yaml): each notebook
    the count params/plan.yaml fixes, drawn from the plan file's SHA-256, none of the pilot's."""
    from irn.paper import plan

    pilot, paper = (split_params().load(ROOT / "params" / f"{p}.yaml") for p in ("pilot", "paper"))
    counts = yaml.safe_load((ROOT / "params" / "plan.yaml").read_text())["notebooks"]
    for notebook, values in pilot.items():
        assert {k: v for k, v in paper[notebook].items() if k != "seeds"} == \
            {k: v for k, v in values.items() if k != "seeds"}
        if "seeds" in values:
            assert paper[notebook]["seeds"] == plan.seeds(ROOT / "params" / "plan.yaml",
                                                          counts[notebook])
            assert not set(paper[notebook]["seeds"]) & set(values["seeds"])
            assert len(set(paper[notebook]["seeds"])) == counts[notebook]


def test_a_profile_sets_every_notebooks_seeds_from_a_list_or_a_plan(tmp_path):
    from irn.paper import plan

    (tmp_path / "base.yaml").write_text("01_linear_stability:\n  h: 0.1\n"
                                        "03_two_spirals:\n  seeds: [0, 1]\n")
    (tmp_path / "listed.yaml").write_text("extends: base.yaml\nseeds: [7]\n")
    (tmp_path / "plan.yaml").write_text("notebooks: {03_two_spirals: 3}\n")
    (tmp_path / "planned.yaml").write_text("extends: base.yaml\nseeds: plan.yaml\n")
    listed, planned = (split_params().load(tmp_path / f"{p}.yaml") for p in ("listed", "planned"))
    assert listed == {"01_linear_stability": {"h": 0.1}, "03_two_spirals": {"seeds": [7]}}
    assert planned["03_two_spirals"]["seeds"] == plan.seeds(tmp_path / "plan.yaml", 3)
    (tmp_path / "plan.yaml").write_text("notebooks: {03_two_spirals: 3}\n# edited\n")
    assert split_params().load(tmp_path / "planned.yaml")["03_two_spirals"]["seeds"] != \
        planned["03_two_spirals"]["seeds"]  # another plan, other seeds
    (tmp_path / "plan.yaml").write_text("notebooks: {02_function_approximation: 3}\n")
    with pytest.raises(SystemExit, match="no seed count for 03_two_spirals"):
        split_params().load(tmp_path / "planned.yaml")


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


def _tiny_notebook(path):
    """A notebook with a parameters cell, a tqdm progress bar, a printed number and a figure."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell("steps = 3\nfigures_dir = '.'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("from tqdm import tqdm\nimport time\n"
                                  "for _ in tqdm(range(steps), mininterval=0): time.sleep(0.01)"),
        nbformat.v4.new_code_cell("print(f'{sum(range(steps)):d}')"),
        nbformat.v4.new_code_cell("import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\n"
                                  "ax.plot([0, steps])"),
    ]
    nbformat.write(nb, str(path))


def test_executed_notebooks_are_byte_identical_between_runs(tmp_path):
    """Two executions of the same notebook with the same parameters write the same bytes:
    no timestamps, durations, paths or progress bars; outputs (text, figure) kept."""
    import nbformat

    source = tmp_path / "tiny.ipynb"
    _tiny_notebook(source)
    written = []
    for run_index in range(2):
        out = tmp_path / f"run{run_index}" / "tiny.ipynb"
        result = run("scripts/run_notebook.py", str(source), "-p", "steps", "4", "--output",
                     str(out), "--figures", str(tmp_path / "figures"),
                     "--copy", str(tmp_path / f"copy{run_index}.ipynb"))
        assert result.returncode == 0, result.stderr
        # the kernel runs over IPC: no ipykernel warning about unencrypted TCP in make's output
        assert "without encryption" not in result.stdout + result.stderr
        written.append(out.read_bytes())
        assert (tmp_path / f"copy{run_index}.ipynb").read_bytes() == written[-1]
    assert written[0] == written[1]
    text = written[0].decode()
    for word in ("start_time", "end_time", "duration", "input_path", "output_path",
                 "iopub", str(tmp_path), "it/s"):
        assert word not in text
    nb = nbformat.reads(text, 4)
    outputs = [cell.outputs for cell in nb.cells if cell.cell_type == "code"]
    assert outputs[3][0].text == "6\n"  # the parameter reached the kernel
    assert any("image/png" in o.get("data", {}) for o in outputs[4])


def test_executed_notebooks_show_their_outputs():
    """The paper-profile notebooks kept for readers carry the outputs of every cell that
    prints or draws, and no run-specific metadata."""
    import nbformat

    executed = sorted((ROOT / "notebooks" / "executed").glob("[0-9]*.ipynb"))
    sources = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    assert [p.name for p in executed] == [p.name for p in sources]
    for path in executed:
        text = path.read_text()
        for run_specific in ("ipykernel_", str(ROOT), "/tmp/", "it/s]"):
            assert run_specific not in text, f"{path.name} holds {run_specific!r}"
        nb = nbformat.reads(text, 4)
        assert "start_time" not in nb.metadata.get("papermill", {})
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            assert "papermill" not in cell.metadata and "execution" not in cell.metadata
            if "print(" in cell.source or "plotting.save(" in cell.source:
                assert cell.outputs, f"{path.name}: no output for\n{cell.source}"


def test_every_parameter_of_every_notebook_is_parsed():
    """papermill must parse every line of each parameters cell (a line it cannot parse, e.g. a
    comment holding '=', is silently not a parameter, and the runner would refuse it)."""
    import re

    import nbformat
    import papermill

    for source in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        cell = next(c for c in nbformat.read(source, 4).cells
                    if "parameters" in c.metadata.get("tags", []))
        assigned = set(re.findall(r"^(\w+) =", cell.source, flags=re.M))
        assert set(papermill.inspect_notebook(str(source))) == assigned, source.name


def test_every_figure_of_a_notebook_is_shown_inline(tmp_path):
    """Each cell that draws a figure with irn.paper.plotting shows it (a style context that restored
    matplotlib's `interactive` flag once hid every figure but the first)."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("figures_dir = '.'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("from irn.paper import plotting\nplotting.use_style()"),
                nbformat.v4.new_code_cell("fig = plotting.spectral_radii(points=20)"),
                nbformat.v4.new_code_cell("fig = plotting.stability_regions(extent=2.0)")]
    source = tmp_path / "figures.ipynb"
    nbformat.write(nb, str(source))
    out = tmp_path / "out.ipynb"
    result = run("scripts/run_notebook.py", str(source), "--output", str(out),
                 "--figures", str(tmp_path / "figures"))
    assert result.returncode == 0, result.stderr
    cells = [c for c in nbformat.read(str(out), 4).cells if c.cell_type == "code"]
    for cell in cells[-2:]:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source


def test_claims_table_collects_the_rows_into_the_csv_and_the_readme(tmp_path):
    from irn.paper import claims

    figures = tmp_path / "figures"
    claims.save([claims.row("1a", "state", [-1.0, -2.0] * 5)], "02_x", figures)
    claims.save([claims.row("6a", "roll", [1.0, -1.0] * 5)], "03_y", figures)
    readme = tmp_path / "README.md"
    pilot = tmp_path / "pilot"
    claims.save([claims.row("1a", "state", [-1.0, 2.0] * 5)], "02_x", pilot)
    claims.table(pilot).to_csv(pilot / "claims.csv", index=False)
    plan = tmp_path / "plan.yaml"
    plan.write_text("families: {1a: {rows: {state: 12}}, 6a: {rows: {roll: '>50'}}}\n")
    readme = tmp_path / "README.md"
    readme.write_text("# title\n<!-- headline:begin -->\nold counts\n<!-- headline:end -->\n"
                      "<!-- claims:begin -->\nold table\n<!-- claims:end -->\n"
                      "<!-- agreement:begin -->\n<!-- agreement:end -->\nrest\n")
    for _ in range(2):  # rerunning replaces the table, it does not add one
        result = run("scripts/claims_table.py", str(figures), "--readme", str(readme),
                     "--plan", str(plan), "--pilot", str(pilot))
        assert result.returncode == 0, result.stderr
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title\n") and text.endswith("rest\n")
    verdicts = [line.split("**")[-2] for line in text.splitlines() if line.startswith("| 1a.")
                or line.startswith("| 6a.")]
    assert (f"2 rows at 10 seeds: **{verdicts.count('holds')} hold**, "
            f"**{verdicts.count('contradicted')} contradicted**, **0 equivalent**, "
            f"**{verdicts.count('inconclusive')} inconclusive**.") in text
    assert text.count("| 1a. [") == 1 and "**holds**" in text and "**inconclusive**" in text
    assert f"({figures.as_posix()}/figure4_losses.png)" in text
    assert "| 10 (12) |" in text and "| 10 (>50) |" in text   # the plan's counts
    # the pilot's 1a row is inconclusive, the confirmation's holds: off the diagonal
    assert "| inconclusive | 1 | 0 | 0 | **0** | 1 |" in text
    assert "Of the 0 rows the pilot decided, 0 read the same in the confirmation; of its 1 " \
           "inconclusive rows, the confirmation decided 1." in text
    assert "(changed)" in (figures / "agreement.md").read_text()
    csv = (figures / "claims.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[0].startswith("claim,setup,")
    values = (figures / "claims_per_seed.csv").read_text().splitlines()
    assert len(values) == 21 and values[0].startswith("claim,setup,seed,unit,value,estimate,")
    readme.write_text("no markers\n")
    result = run("scripts/claims_table.py", str(figures), "--readme", str(readme))
    assert result.returncode != 0 and "claims:begin" in result.stderr
