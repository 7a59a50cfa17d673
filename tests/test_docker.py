"""The Docker image's entrypoint, checked without a Docker engine (none runs here): its command composes and
validates as medgpt's own serve startup, which refuses 0.0.0.0 without an API key; compose mounts outputs/."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from conftest import ROOT, compose, launch

from medgpt.config import validate
from medgpt.errors import ConfigError

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def entrypoint() -> list[str]:
    found = re.search(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE, re.M)
    cmd = re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.M)
    return json.loads(found.group(1)) + json.loads(cmd.group(1))


def test_the_entrypoint_serves_a_run_on_all_interfaces():
    argv = entrypoint()
    assert argv[:2] == ["python", "launch.py"] and "mode=serve" in argv and "serve.host=0.0.0.0" in argv and "run=latest" in argv
    cfg = compose([a for a in argv[2:] if not a.startswith("paths.")] + ["model=tiny"])
    validate(cfg)
    assert (cfg.mode, cfg.serve.host, cfg.serve.port, cfg.run) == ("serve", "0.0.0.0", 8000, "latest")
    assert re.search(r"^ARG VARIANT=cpu$", DOCKERFILE, re.M) and "whl/cu124" in DOCKERFILE and 'extras="[gpu]"' in DOCKERFILE


def test_the_container_refuses_to_start_without_an_api_key(tmp_path):
    """The image's exact command, run by medgpt's own startup (launch.py), with no MEDGPT_API_KEY in the environment."""
    argv = [a if not a.startswith("paths.output_dir=") else f"paths.output_dir={tmp_path}" for a in entrypoint()[2:]]
    res = launch(*argv, env={"MEDGPT_API_KEY": ""}, timeout=120)
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        "error: serve.host=0.0.0.0 is reachable from the network and no API key is set: set serve.api_key=<key> or the "
        "MEDGPT_API_KEY environment variable (or listen on 127.0.0.1).")


def test_the_refusal_comes_before_anything_loads(monkeypatch):
    from medgpt.serving import modes

    monkeypatch.delenv("MEDGPT_API_KEY", raising=False)
    monkeypatch.setattr(modes, "_load", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))
    with pytest.raises(ConfigError, match="serve.host=0.0.0.0 is reachable from the network and no API key is set"):
        modes.serve(compose(["mode=serve", "model=tiny", "serve.host=0.0.0.0"]), ROOT)
    modes.require_key_off_loopback("0.0.0.0", "secret", "serve.host")  # with a key: allowed
    modes.require_key_off_loopback("127.0.0.1", None, "serve.host")  # loopback: no key needed


def test_compose_mounts_outputs_and_passes_the_key():
    spec = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["medgpt"]
    assert "./outputs:/app/outputs" in spec["volumes"] and spec["environment"]["MEDGPT_API_KEY"] == "${MEDGPT_API_KEY:-}"
    assert spec["ports"] == ["127.0.0.1:8000:8000"] and spec["command"][0] == "run=${MEDGPT_RUN:-latest}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"outputs", ".venv", ".git"} <= set(ignored)
