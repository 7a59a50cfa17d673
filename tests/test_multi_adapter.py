"""mode=serve run=[dirA,dirB]: one base model, each run's adapter; the request's `model` picks it (PEFT multi-adapter),
a mixed batch answers each row with its own adapter, unknown models get 404 with the list, and runs that cannot
share a base are refused."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, compose
from fastapi.testclient import TestClient
from test_export_support import adapter_run, full_run

from medgpt.errors import ConfigError
from medgpt.serving.api import create_app
from medgpt.serving.engine import SamplingParams
from medgpt.serving.loading import load

QUESTION = [{"role": "user", "content": "What are the warning signs of a stroke?"}]


def cfg_for(run, *extra):
    return compose(["mode=serve", "model=tiny", "generation.temperature=0", f"paths.root={ROOT}", f"run={run}",
                    "serve.max_batch_size=4", "serve.batch_wait_ms=200", *extra])


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_path):
    root = tmp_path_factory.mktemp("multi")
    a, b = adapter_run(root, tiny_path, "run-a", seed=11), adapter_run(root, tiny_path, "run-b", seed=12)
    loaded = load(cfg_for(f"[{a},{b}]"))
    yield loaded, a, b
    loaded.engine.close()


def single_answer(run, n=8) -> str:
    """The run served alone (its adapter merged in memory, as the hf engine does for one run)."""
    loaded = load(cfg_for(run))
    try:
        return loaded.engine.generate([loaded.chat_ids(QUESTION)], SamplingParams(max_tokens=n, temperature=0))[0].text
    finally:
        loaded.engine.close()


def test_models_lists_the_runs_and_model_picks_the_adapter(served):
    loaded, a, b = served
    client = TestClient(create_app(loaded, compose(["model=tiny"]).generation))
    listed = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["run-a", "run-b"] and [m["adapter"] for m in listed] == [str(a / "adapter"), str(b / "adapter")]
    answers = {}
    for name in ("run-a", "run-b"):
        res = client.post("/v1/chat/completions", json={"model": name, "messages": QUESTION, "max_tokens": 8, "temperature": 0})
        assert res.status_code == 200, res.text
        answers[name] = res.json()["choices"][0]["message"]["content"]
    assert answers["run-a"] == single_answer(a) and answers["run-b"] == single_answer(b)
    assert answers["run-a"] != answers["run-b"]
    default = client.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 8, "temperature": 0}).json()
    assert default["choices"][0]["message"]["content"] == answers["run-a"]  # no model named: the first run
    missing = client.post("/v1/chat/completions", json={"model": "run-c", "messages": QUESTION, "max_tokens": 4})
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "model 'run-c' is not served here (available: run-a, run-b)."


def test_a_mixed_batch_answers_each_row_with_its_adapter(served):
    loaded, _, _ = served
    ids = loaded.chat_ids(QUESTION)
    params = SamplingParams(max_tokens=8, temperature=0)
    alone = {name: loaded.engine.submit(ids, params, adapter=name).result().text for name in ("run-a", "run-b")}
    before = loaded.engine.stats()["max_batch"]
    handles = [loaded.engine.submit(ids, params, adapter=name) for name in ("run-a", "run-b", "run-a")]
    together = [h.result().text for h in handles]
    assert together == [alone["run-a"], alone["run-b"], alone["run-a"]]
    assert max(before, loaded.engine.stats()["max_batch"]) >= 2  # they were decoded in one batch


def test_runs_that_cannot_share_a_base_are_refused(tmp_path, tiny_path, served):
    _, a, _ = served
    other = adapter_run(tmp_path, tiny_path, "run-other-base", seed=13)
    summary = json.loads((other / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps({**summary, "base_model_path": str(tmp_path)}))
    (other / "adapter" / "adapter_config.json").write_text(json.dumps(
        {**json.loads((other / "adapter" / "adapter_config.json").read_text()), "base_model_name_or_path": str(tmp_path)}))
    with pytest.raises(ConfigError, match=f"runs {a} and {other} adapt different base models"):
        load(cfg_for(f"[{a},{other}]"))
    full = full_run(tmp_path, tiny_path)
    with pytest.raises(ConfigError, match=f"run {full} has no adapter/ \\(it holds full weights\\)"):
        load(cfg_for(f"[{a},{full}]"))
    with pytest.raises(ConfigError, match=f"run {a} is listed twice"):
        load(cfg_for(f"[{a},{a}]"))
    with pytest.raises(ConfigError, match=r"run=\[...\] names several runs; mode=chat reads one \(mode=serve serves several"):
        load(compose(["mode=chat", "model=tiny", f"paths.root={ROOT}", f"run=[{a},{a}]"]))
