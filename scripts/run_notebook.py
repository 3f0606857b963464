"""Execute one notebook headlessly with papermill, with checked parameters.

    python scripts/run_notebook.py notebooks/02_function_approximation.ipynb \
        --params build/paper/params/02_function_approximation.yaml \
        --output build/paper/02_function_approximation.ipynb --figures figures [-p epochs 300]

``--params`` is a YAML file of this notebook's parameters (``scripts/split_params.py`` writes
one per notebook from a profile); ``-p NAME VALUE`` overrides one. Every parameter name is checked against the notebook's `parameters` cell first: a misspelled or
unknown name fails the run, naming it. Figures are written to a staging folder and moved
into `--figures` only when the whole notebook succeeded, so a failed run leaves the previous
figures in place; the executed notebook is likewise written under a temporary name first.

The executed notebook is written for reading and for diffs (:func:`clean`): papermill's
timestamps, durations, paths and environment are removed, and so are progress bars (tqdm's
stderr), which belong to the terminal, not to the record. ``--copy PATH`` writes a second,
identical copy (``make figures`` keeps the paper profile's in ``notebooks/executed/``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from pathlib import Path

import nbformat
import papermill
import yaml
from jupyter_client.manager import AsyncKernelManager
from papermill.exceptions import PapermillExecutionError


# run-specific metadata: notebook-level papermill keys, and whole per-cell records
RUN_SPECIFIC = ("start_time", "end_time", "duration", "input_path", "output_path",
                "environment_variables", "exception")
PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+ \[")  # tqdm: " 40%|####  | 4/10 [00:01<..."
ADDRESS = re.compile(r" at 0x[0-9a-f]+")  # reprs such as <Line2D at 0x7f...> differ per run


def clean(notebook):
    """The executed notebook without what differs between two runs of the same code: papermill's
    notebook-level ``start_time``, ``end_time``, ``duration``, ``input_path``, ``output_path``
    and ``environment_variables``, every cell's ``papermill`` and ``execution`` records, and
    stderr outputs that are progress bars (or the blank line a closed bar leaves); memory
    addresses in reprs are dropped and the injected-parameters cell gets a fixed id instead of
    papermill's random one. Outputs, tags and parameters stay."""
    record = notebook.metadata.get("papermill", {})
    for key in RUN_SPECIFIC:
        record.pop(key, None)
    for cell in notebook.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.id = "injected-parameters"  # papermill draws a random id each run
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs
                            if not (o.output_type == "stream" and o.name == "stderr"
                                    and (PROGRESS_BAR.search(o.text) or not o.text.strip()))]
            for output in cell.outputs:
                if "text/plain" in output.get("data", {}):
                    output.data["text/plain"] = ADDRESS.sub("", output.data["text/plain"])
    return notebook


def write(notebook, path: Path) -> None:
    """Write ``notebook`` to ``path`` through a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.ipynb")
    nbformat.write(notebook, str(tmp))
    os.replace(tmp, path)


# set by the runner from its own options, never by a profile: where figures go, where the cache
# lives, which Dask scheduler trains (the last two only for notebooks that declare them)
RUNNER_PARAMETERS = ("figures_dir", "cache_dir", "dask_scheduler")


class IPCKernelManager(AsyncKernelManager):
    """The kernel talks over local IPC sockets instead of TCP: nothing listens on the network,
    and ipykernel has no reason to warn that its TCP traffic is unencrypted."""

    def __init__(self, **kwargs):
        super().__init__(transport="ipc", **kwargs)


def load_parameters(path: Path | None, notebook: Path, overrides: list[tuple[str, str]]) -> dict:
    parameters = dict(yaml.safe_load(path.read_text()) or {}) if path else {}
    for name, value in overrides:
        parameters[name] = yaml.safe_load(value)
    declared = papermill.inspect_notebook(str(notebook))
    unknown = sorted(set(parameters) - set(declared) - set(RUNNER_PARAMETERS))
    if unknown:
        sys.exit(f"error: unknown parameter(s) {', '.join(unknown)} for {notebook.name} "
                 f"(from {path} or -p); declared: {', '.join(sorted(declared))}")
    return parameters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--params", type=Path, help="YAML file of parameters")
    parser.add_argument("--output", type=Path, required=True, help="executed notebook")
    parser.add_argument("--figures", type=Path, required=True, help="folder for the figures")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="override one parameter (YAML value)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--copy", type=Path, help="a second copy of the executed notebook")
    parser.add_argument("--cache", type=Path, help="cache of trained models (cache_dir)")
    parser.add_argument("--dask-scheduler", help="address of a Dask scheduler (dask_scheduler)")
    args = parser.parse_args()

    parameters = load_parameters(args.params, args.notebook, args.p)
    output = args.output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".staging-{args.notebook.stem}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    # the kernel runs beside the executed notebook; paths are relative so that an nbval
    # re-execution of a reference notebook writes to the same kind of place
    parameters["figures_dir"] = os.path.relpath(staging, output.parent)
    declared = papermill.inspect_notebook(str(args.notebook))
    if args.cache and "cache_dir" in declared:
        parameters["cache_dir"] = os.path.relpath(args.cache.resolve(), output.parent)
    if args.dask_scheduler and "dask_scheduler" in declared:
        parameters["dask_scheduler"] = args.dask_scheduler
    tmp = output.with_name(f".{output.stem}.tmp.ipynb")
    print(f"[run] {args.notebook} with {args.params} -> {args.output}", flush=True)
    start = time.time()
    try:
        papermill.execute_notebook(
            str(args.notebook), str(tmp), parameters=parameters, kernel_name="python3",
            cwd=str(output.parent), log_output=True, progress_bar=False,
            execution_timeout=args.timeout, kernel_manager_class=IPCKernelManager)
    except PapermillExecutionError as err:
        print(f"\n[run] FAILED: {args.notebook} cell {err.exec_count} raised {err.ename}: "
              f"{err.evalue}\n[run] previous figures in {args.figures} are untouched; the "
              f"partial notebook is {tmp}", file=sys.stderr)
        return 1
    args.figures.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):  # claims/ is a folder
        target = args.figures / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    shutil.rmtree(staging)
    notebook = clean(nbformat.read(str(tmp), as_version=4))
    tmp.unlink()
    for path in [output] + ([args.copy] if args.copy else []):
        write(notebook, path)
    print(f"[run] {args.notebook.name} done in {time.time() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
