"""Using the layers costs torch and numpy only: the examples' dependencies are an extra."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("pandas", "matplotlib", "seaborn", "tqdm", "sklearn")
COMPILED = ("numba", "llvmlite")  # the compiled extra

BLOCKER = f"""
import sys
class Blocker:  # as if the examples' packages were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {EXAMPLES + COMPILED!r}:
            raise ImportError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Blocker())
"""


def run(code):
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True, text=True,
                          cwd=ROOT)


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0]


def test_the_package_requires_torch_and_numpy_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [_name(d) for d in project["dependencies"]] == ["torch", "numpy"]
    extra = {_name(d) for d in project["optional-dependencies"]["examples"]}
    assert extra == {"pandas", "matplotlib", "seaborn", "tqdm", "scikit-learn"}
    compiled = {_name(d) for d in project["optional-dependencies"]["compiled"]}
    assert compiled == {"numba", "llvmlite"}


def test_the_library_asks_for_ranges_and_the_lock_pins_each_exactly():
    """``pip install irn`` keeps a user's torch; the Makefile applies requirements.lock, which
    pins every dependency of the package and its extras (torch included) to the versions the
    tests and the figures ran with."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        d for extra in project["optional-dependencies"].values() for d in extra]
    assert not [d for d in requirements if "==" in d], "exact pins belong in requirements.lock"
    locked = {line.split("==")[0].lower() for line in (ROOT / "requirements.lock").read_text().splitlines()
              if "==" in line}
    assert {_name(d).lower() for d in requirements} <= locked
    assert "torch==2.13.0" in (ROOT / "requirements.lock").read_text().splitlines()


def test_the_wheel_installs_into_the_pinned_environment_without_replacing_torch(tmp_path):
    """The package built as a wheel and installed (a dry run, offline) into this environment,
    which holds the locked torch: pip installs irn alone."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("irn-*.whl")
    check = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "-q",
                            "--report", str(tmp_path / "resolved.json"), str(wheel)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr  # torch and numpy satisfied as installed
    resolved = json.loads((tmp_path / "resolved.json").read_text())["install"]
    assert [item["metadata"]["name"] for item in resolved] == ["irn"]


def test_layers_solvers_regularizers_and_ensembles_work_without_the_examples_extra():
    result = run("""
import torch, irn
net = irn.ImplicitResNet(3, 4, 0.5, 0.5, backward="gmres")
net.keep_iterates = True
y0 = torch.randn(5, 3)
(net(y0).sum() + irn.regularizers.fixed_point(net, 0.5)
 + irn.regularizers.perturbation(net, y0, 0.1, 1.0, 2)).backward()
ens = irn.ImplicitResNet.stack([net, net])
ens(torch.randn(2, 5, 3)).sum().backward()
irn.stability.spectral_radius("verlet", 1.0)
assert "numba is not installed" in irn.compiled.reason(net.with_settings(backward="neumann"))
assert not any(m.split(".")[0] in {examples!r} for m in sys.modules)
""".replace("{examples!r}", repr(EXAMPLES + COMPILED)))
    assert result.returncode == 0, result.stderr


def test_import_irn_does_not_load_numba():
    code = "import sys, irn; assert 'numba' not in sys.modules, 'numba imported by import irn'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_the_examples_modules_say_what_is_missing():
    """Each harness module tried in one process (a failed import leaves no module behind)."""
    result = run("""
import importlib
for module in ("training", "plotting", "robustness", "diagnostics", "cache", "claims", "history"):
    try:
        importlib.import_module(f"irn.paper.{module}")
    except ImportError as err:
        assert "irn[examples]" in str(err) and f"irn.paper.{module} needs" in str(err), err
    else:
        raise AssertionError(f"irn.paper.{module} imported without the examples extra")
print("checked")
""")
    assert result.returncode == 0 and "checked" in result.stdout, result.stderr


def test_plotting_robustness_and_diagnostics_do_not_import_the_training_loop():
    code = """
import sys
import irn.paper.plotting, irn.paper.diagnostics, irn.paper.claims
assert "irn.paper.training" not in sys.modules and "irn.paper.parallel" not in sys.modules
import irn.paper.robustness  # it runs measurements in parallel processes, not the training loop
assert "irn.paper.training" not in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={"MPLBACKEND": "Agg", "PATH": ""})
    assert result.returncode == 0, result.stderr
