"""Wall time of every notebook of a profile, run as ``make figures`` runs it but without the
cache (every model trained), into a scratch folder: prints a table and writes it to
``benchmarks/results_notebooks.md``.

    python benchmarks/notebook_times.py [--profiles paper half] [--output PATH]

The committed figures are not touched. Run it on a quiet machine: the notebooks train on
two worker processes, so the machine's two cores are busy for the whole run.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_profile(profile: str, scratch: Path) -> dict[str, float]:
    """Seconds per notebook of ``profile`` (each run by ``scripts/run_notebook.py``)."""
    params = scratch / profile / "params"
    subprocess.run([sys.executable, "scripts/split_params.py", f"params/{profile}.yaml",
                    str(params)], cwd=ROOT, check=True, capture_output=True)
    times = {}
    for notebook in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        start = time.perf_counter()
        subprocess.run([sys.executable, "scripts/run_notebook.py", str(notebook),
                        "--params", str(params / f"{notebook.stem}.yaml"),
                        "--output", str(scratch / profile / notebook.name),
                        "--figures", str(scratch / profile / "figures")], cwd=ROOT, check=True)
        times[notebook.stem] = time.perf_counter() - start
        print(f"{profile} {notebook.stem}: {times[notebook.stem]:.0f} s", flush=True)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--profiles", nargs="+", default=["paper", "half"])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results_notebooks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        times = {profile: run_profile(profile, Path(scratch)) for profile in args.profiles}
    names = list(next(iter(times.values())))
    lines = ["# Notebook wall times", "",
             f"Command: `python {' '.join(['benchmarks/notebook_times.py'] + sys.argv[1:])}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores; no cache (every model "
             f"trained), numba's kernels already compiled.", "",
             "| notebook | " + " | ".join(f"{p} profile" for p in times) + " |",
             "|---|" + "---|" * len(times)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{times[p][name]:.0f} s" for p in times) + " |")
    lines.append("| **total** | " + " | ".join(f"**{sum(t.values()):.0f} s**"
                                               for t in times.values()) + " |")
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
