"""mode=serve on a finished tiny run, through the official openai client and raw HTTP: bodies, SSE framing, errors, batching."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import yaml
from test_serving_support import free_port, start, stop, tiny_run

KEY = "test-key"
LIMIT = 512


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run_dir = tiny_run()
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    proc = start("mode=serve", f"run={run_dir}", f"serve.port={port}", "generation.temperature=0", "generation.max_new_tokens=8",
                 f"serve.max_tokens_limit={LIMIT}", f"hydra.run.dir={log.parent}", url=f"http://127.0.0.1:{port}/health", log=log,
                 env={"MEDGPT_API_KEY": KEY})  # the key from the environment
    yield {"base": f"http://127.0.0.1:{port}", "run": run_dir, "log": log}
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def prompt_tokens(server):
    """How many tokens the run's tokenizer and template make of a conversation."""
    from transformers import AutoTokenizer

    from medgpt.data.templates import Template

    adapter = server["run"] / "adapter"
    tok = AutoTokenizer.from_pretrained(adapter)
    template = Template.from_mapping(yaml.safe_load((adapter / "medgpt_template.yaml").read_text()))
    return lambda messages: len(tok(template.render(messages, tok.bos_token, tok.eos_token, True), add_special_tokens=False)["input_ids"])


def post(server, path: str, body, key: str | None = KEY, raw: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw:
        return httpx.post(server["base"] + path, content=body, headers={**headers, "Content-Type": "application/json"}, timeout=120)
    return httpx.post(server["base"] + path, json=body, headers=headers, timeout=120)


def test_startup_prints_what_it_loaded(server):
    text = server["log"].read_text()
    assert f"run directory  {server['run']}" in text and f"adapter        {server['run'] / 'adapter'}" in text
    assert "template       chatml (adapter/medgpt_template.yaml)" in text and "API key required" in text


def test_models_list(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server["run"].name]


def test_key_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        res = httpx.get(server["base"] + "/v1/models", headers=headers)
        assert res.status_code == 401 and res.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server["base"] + "/health").json()["status"] == "ok"  # health needs no key


def test_chat_completion(client, server, prompt_tokens):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a fever?"}]
    first = client.chat.completions.create(model=server["run"].name, messages=messages, max_tokens=6)
    again = client.chat.completions.create(model=server["run"].name, messages=messages, max_tokens=6)
    assert first.choices[0].message.role == "assistant" and first.choices[0].message.content == again.choices[0].message.content
    assert first.id != again.id and first.id.startswith("chatcmpl-") and first.object == "chat.completion"
    u = first.usage
    assert u.prompt_tokens == prompt_tokens(messages) and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert first.choices[0].finish_reason in ("stop", "length")
    assert u.completion_tokens == 6 if first.choices[0].finish_reason == "length" else 1 <= u.completion_tokens <= 6
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "a fever?"}]}]
    as_parts = client.chat.completions.create(model=server["run"].name, messages=parts, max_tokens=6)
    assert as_parts.choices[0].message.content == first.choices[0].message.content  # text parts are joined


def test_streamed_chat_framing_and_content(client, server, prompt_tokens):
    messages = [{"role": "user", "content": "Is 38 C a fever?"}]
    plain = client.chat.completions.create(model=server["run"].name, messages=messages, max_tokens=7)
    res = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 7, "stream": True,
                                                 "stream_options": {"include_usage": True}})
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/event-stream")
    body = res.text
    assert body.endswith("data: [DONE]\n\n")
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == plain.choices[0].finish_reason and not any(finishes[:-1])
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == plain.choices[0].message.content
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain.usage.model_dump(exclude_none=True)
    assert chunks[-1]["usage"]["prompt_tokens"] == prompt_tokens(messages)
    # the openai client reads the same stream
    streamed = client.chat.completions.create(model=server["run"].name, messages=messages, max_tokens=7, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == plain.choices[0].message.content


def test_completions(client, server):
    one = client.completions.create(model=server["run"].name, prompt="A fever is", max_tokens=5)
    assert one.object == "text_completion" and one.id.startswith("cmpl-") and one.choices[0].finish_reason == "length"
    assert one.usage.completion_tokens == 5 and one.usage.prompt_tokens == 3  # "A", " fever", " is"
    two = client.completions.create(model=server["run"].name, prompt=["A fever is", "Headaches are"], max_tokens=4)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == one.choices[0].text[:len(two.choices[0].text)]
    streamed = client.completions.create(model=server["run"].name, prompt="A fever is", max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == one.choices[0].text


LONG = "fever " * 2100  # more tokens than the tiny model's context of 2048


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "doctor", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": LIMIT + 1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["", "x"]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": LONG}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, "max_tokens"),
])
def test_malformed_requests_are_400_naming_the_field(server, path, body, param):
    res = post(server, path, body)
    assert res.status_code == 400, res.text
    error = res.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param.split(".")[0] in error["message"]


def test_invalid_json_and_unknown_model(server):
    res = post(server, "/v1/chat/completions", b'{"messages": [', raw=True)
    assert res.status_code == 400 and res.json()["error"]["message"] == "the request body is not valid JSON"
    res = post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert res.status_code == 404 and res.json()["error"]["param"] == "model"


def test_eight_concurrent_requests_are_answered_in_one_batch(client, server):
    questions = [f"Question {i}: is a temperature of 38.{i} C a fever?" for i in range(8)]
    singles = {q: client.chat.completions.create(model=server["run"].name, messages=[{"role": "user", "content": q}], max_tokens=16)
               for q in questions[:2]}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda q: client.chat.completions.create(
            model=server["run"].name, messages=[{"role": "user", "content": q}], max_tokens=16), questions))
    assert len({a.id for a in answers}) == 8
    for q, a in zip(questions, answers):
        assert a.choices[0].finish_reason in ("stop", "length") and a.usage.completion_tokens >= 1
        if q in singles:  # batched with others, the greedy answer is the same as alone
            assert a.choices[0].message.content == singles[q].choices[0].message.content
    metrics = httpx.get(server["base"] + "/metrics").text
    assert int(re.search(r"^medgpt_engine_max_batch (\d+)$", metrics, re.M).group(1)) >= 2


def test_client_disconnect_stops_generation(client, server):
    def metric(text: str, name: str) -> float:
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0

    before = httpx.get(server["base"] + "/metrics").text
    messages = [{"role": "user", "content": "Tell me everything about fevers."}]
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", server["base"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                         json={"messages": messages, "max_tokens": LIMIT, "stream": True}) as res:
            lines = res.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: generation is under way
    # the connection is closed: the server cancels the request and frees its slot (wait for it, no timing asserted)
    import time

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        now = httpx.get(server["base"] + "/metrics").text
        if metric(now, "medgpt_engine_cancelled_total") > metric(before, "medgpt_engine_cancelled_total") and \
                metric(now, "medgpt_engine_running") == 0:
            break
        time.sleep(0.2)
    name = 'medgpt_requests_total{endpoint="/v1/chat/completions",status="499"}'
    assert metric(now, "medgpt_engine_cancelled_total") == metric(before, "medgpt_engine_cancelled_total") + 1
    assert metric(now, name) == metric(before, name) + 1 and metric(now, "medgpt_engine_running") == 0
    # the cancelled request stopped early: far fewer tokens than it asked for were generated
    generated = metric(now, "medgpt_engine_generated_tokens_total") - metric(before, "medgpt_engine_generated_tokens_total")
    assert generated < LIMIT
