"""The API reference builds from the docstrings with warnings as errors (``make docs``), and
documents every public name of the library core."""

import subprocess
import sys
from pathlib import Path

import pytest

import irn

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("sphinx", reason="the docs extra is not installed")


def test_the_reference_builds_cleanly_and_holds_every_public_name(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b",
                           "html", str(ROOT / "docs"), str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    api = (tmp_path / "api.html").read_text()
    public = [name for name in irn.__all__ if name not in ("__version__",)]
    missing = [name for name in public if f'id="irn.{name}"' not in api
               and f'id="module-irn.{name}"' not in api]
    assert not missing, missing
    # the arguments a reader looks up, with the equation they set
    for text in ("from_blocks", "solve_summary", "atol", "rtol", "R_b"):
        assert text in api, text
