"""`make lab` starts where users run it: as root on a headless machine (a container, a cloud
VM), and serves the executed notebooks. Started for real, stopped once it answers."""

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


def test_make_lab_starts_headless_and_serves_the_executed_notebooks(tmp_path):
    port, token = free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISPLAY", "WAYLAND_DISPLAY", "MAKEFLAGS", "MAKELEVEL")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    log = tmp_path / "lab.log"
    with open(log, "w") as out:
        lab = subprocess.Popen(
            ["make", "--no-print-directory", "lab",
             f"LAB_ARGS=--port={port} --ServerApp.port_retries=0 "
             f"--IdentityProvider.token={token}"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        listing = None
        deadline = time.time() + 300  # the first call installs the lab extra
        while time.time() < deadline and lab.poll() is None:
            try:
                status, body = get(f"http://127.0.0.1:{port}/api/contents/executed?token={token}")
                listing = json.loads(body)
                break
            except urllib.error.HTTPError as err:  # it answered, but not with the listing
                raise AssertionError(f"make lab answered {err.code}:\n{log.read_text()}")
            except OSError:
                time.sleep(1)
        text = log.read_text()
        assert listing is not None, f"make lab did not answer (exit {lab.poll()}):\n{text}"
        names = {item["name"] for item in listing["content"]}
        assert {p.name for p in (ROOT / "notebooks" / "executed").glob("*.ipynb")} <= names
        # the sources beside them: the file browser opens one folder up
        status, body = get(f"http://127.0.0.1:{port}/api/contents?token={token}")
        assert "02_function_approximation.ipynb" in {i["name"] for i in json.loads(body)["content"]}
        status, page = get(f"http://127.0.0.1:{port}/lab?token={token}")
        assert status == 200 and b"JupyterLab" in page
        assert "Running as root is not recommended" not in text
        assert f"http://127.0.0.1:{port}/lab?token=" in text  # the URL a headless user opens
    finally:
        os.killpg(lab.pid, signal.SIGTERM)
        try:
            lab.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(lab.pid, signal.SIGKILL)
