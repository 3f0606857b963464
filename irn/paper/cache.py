"""A cache of trained models and measurements, keyed by what determines them.

An entry is a folder ``<directory>/<key>/`` holding tables (CSV), tensors (``torch.save`` of
a dict of tensors, loaded with ``weights_only=True``: nothing is unpickled) and a
``manifest.json`` with the SHA-256 of every file. The key is the SHA-256 of a canonical JSON
of the job (``sort_keys=True``), the bytes of the library sources that determine the result,
and the versions of Python, torch and irn. An entry is written into a temporary folder and
renamed into place, so an interrupted run leaves no half entry and two writers of the same
entry leave one whole one; an entry whose files do not match its manifest is reported,
removed and recomputed, never half-read.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import os
import platform
import shutil
import tempfile
import warnings
from pathlib import Path

from .. import __version__, compiled
from .._checks import missing_extra

try:
    import pandas as pd
except ImportError as err:  # the examples' dependencies: pip install 'irn[examples]'
    raise missing_extra("irn.paper.cache", err) from err
import torch

PACKAGE = Path(__file__).parents[1]  # irn/: the sources below are paths within it
#: the sources whose code determines a training result: the whole library core, and the
#: harness modules that build, train and record a model (not plotting, not measurement)
TRAINING_SOURCES = tuple(sorted(path.name for path in PACKAGE.glob("*.py"))) + (
    "auto_crossover.json",  # where backend="auto" compiles: which path trains
    "paper/data.py", "paper/examples.py", "paper/experiments.py", "paper/history.py",
    "paper/losses.py", "paper/training.py")
#: ... and the sources that determine a robustness measurement of a trained model
EVALUATION_SOURCES = TRAINING_SOURCES + ("paper/robustness.py",)


def _numba_version() -> str:
    """numba's version without importing it (the compiled kernels round as its LLVM does)."""
    try:
        return importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        return "none"


class CacheWarning(UserWarning):
    """A cache entry could not be read: it is recomputed."""


def key(payload, sources=TRAINING_SOURCES) -> str:
    """SHA-256 of ``payload`` (canonical JSON), the bytes of ``sources`` (files of this
    package) and what decides which code runs: the versions of Python, torch, numba and irn,
    and the backend ``IRN_BACKEND`` selects (``IRN_BACKEND=torch`` trains on the generic
    path, whose models are not the compiled path's to the last bit)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(payload, sort_keys=True, default=repr).encode())
    for name in sources:
        digest.update(name.encode())
        digest.update((PACKAGE / name).read_bytes())
    digest.update(f"python {platform.python_version()} torch {torch.__version__} "
                  f"numba {_numba_version()} irn {__version__} "
                  f"backend {compiled.default_backend()}".encode())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load(directory, entry: str):
    """``(tables, tensors)`` of an entry: dicts of DataFrames and of tensor dicts; None when
    there is no entry, or when it is unreadable (reported with a :class:`CacheWarning` and
    removed, so that the caller recomputes it)."""
    folder = Path(directory) / entry
    if not folder.is_dir():
        return None
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        for name, digest in manifest.items():
            if _sha256(folder / name) != digest:
                raise ValueError(f"{name} does not match its checksum")
        # (copied: a wide frame read from CSV is fragmented, and pandas warns on its first use)
        tables = {name[:-4]: pd.read_csv(folder / name).copy()
                  for name in manifest if name.endswith(".csv")}
        tensors = {name[:-3]: torch.load(folder / name, weights_only=True)
                   for name in manifest if name.endswith(".pt")}
    except Exception as err:  # any damage: report, drop, recompute
        warnings.warn(f"cache entry {folder} is unreadable ({err}); recomputing it",
                      CacheWarning, stacklevel=2)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return tables, tensors


def store(directory, entry: str, tables: dict, tensors: dict) -> None:
    """Write an entry atomically: ``tables`` (name -> DataFrame) as CSV, ``tensors`` (name ->
    dict of tensors) with ``torch.save``, then the manifest, in a temporary folder renamed
    into place. If another writer got there first, its entry is kept."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry[:16]}.", dir=directory))
    try:
        for name, frame in tables.items():
            frame.to_csv(tmp / f"{name}.csv", index=False)
        for name, values in tensors.items():
            buffer = io.BytesIO()
            torch.save({k: v.detach().cpu() for k, v in values.items()}, buffer)
            (tmp / f"{name}.pt").write_bytes(buffer.getvalue())
        manifest = {path.name: _sha256(path) for path in sorted(tmp.iterdir())}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        try:
            os.rename(tmp, directory / entry)  # atomic; fails if the entry exists
        except OSError:
            pass  # written meanwhile by another process: same content, keep theirs
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
