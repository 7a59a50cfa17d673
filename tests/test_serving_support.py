"""Helpers shared by the test_serving_* modules (no tests here): a finished tiny run, free ports, launch.py servers."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from conftest import ROOT, compose, launch


@functools.lru_cache(maxsize=1)
def tiny_run() -> Path:
    """A finished SFT run of the tiny model (LoRA adapter), made once per test session."""
    root = Path(tempfile.mkdtemp(prefix="medgpt-serving-"))
    atexit.register(shutil.rmtree, root, True)
    run_dir = root / "outputs" / "tiny-run"
    res = launch("model=tiny", "debug=smoke", "data=sharegpt", f"hydra.run.dir={run_dir}")
    assert res.returncode == 0, res.stderr[-3000:]
    return run_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(*args: str, url: str, log: Path, timeout: float = 240, env: dict | None = None) -> subprocess.Popen:
    """Start `python launch.py args...` in the background and wait until `url` answers."""
    fh = open(log, "w")
    proc = subprocess.Popen([sys.executable, "launch.py", *args], cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"launch.py {' '.join(args)} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            httpx.get(url, timeout=2)
            return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    stop(proc)
    raise AssertionError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load_tiny(*overrides: str):
    """The untrained tiny model loaded in this process, as the inference modes load it."""
    from medgpt.serving.loading import load

    cfg = compose(["model=tiny", "generation.temperature=0", *overrides])
    return load(cfg), cfg
