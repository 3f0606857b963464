"""Using the layers costs torch and numpy only: the examples' dependencies are an extra."""

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


def test_the_package_requires_torch_and_numpy_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split("==")[0] for d in project["dependencies"]] == ["torch", "numpy"]
    extra = {d.split("==")[0] for d in project["optional-dependencies"]["examples"]}
    assert extra == {"pandas", "matplotlib", "seaborn", "tqdm", "scikit-learn"}
    compiled = {d.split("==")[0] for d in project["optional-dependencies"]["compiled"]}
    assert compiled == {"numba", "llvmlite"}


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
