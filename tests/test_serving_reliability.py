"""The API's behaviour under misuse, in-process (uvicorn in a thread, the untrained tiny model): a non-streamed client
that goes away, oversized bodies, a slow tokenisation, strict request types, metric labels, the port pre-check, the
automatic batch size and the web UI's header and system prompt. Nothing here asserts on speed."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import socket
import threading
import time

import httpx
import pytest
import yaml
from conftest import ROOT, compose
from test_serving_support import free_port, load_tiny, tiny_run

from medgpt.serving.api import create_app
from medgpt.serving.hf_engine import HFEngine
from medgpt.serving.protocol import ChatRequest, CompletionRequest, first_validation_error

MESSAGES = [{"role": "user", "content": "Is 38.5 C a fever?"}]


@pytest.fixture(scope="module")
def tiny():
    loaded, cfg = load_tiny("generation.max_new_tokens=4")
    yield loaded, cfg
    loaded.engine.close()


@contextlib.contextmanager
def serving(app):
    """`app` served by uvicorn on a free port in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, 60), "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_for(condition, seconds: float) -> bool:
    """Poll `condition` until it holds (True) or `seconds` pass (False): a liveness bound, not a speed check."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


# --- 12: a non-streamed request whose client went away is cancelled in the engine -------------------------------------

@pytest.mark.parametrize("path,body,n", [
    ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 200}, 1),
    ("/v1/completions", {"prompt": ["A fever is", "Headaches are"], "max_tokens": 200}, 2),
])
def test_non_streamed_client_disconnect_cancels_its_generation(tiny, path, body, n):
    loaded, cfg = tiny
    # no stop tokens: a request ends only by its budget (200 tokens) or by being cancelled
    engine = HFEngine(loaded.engine.model, loaded.tokenizer, [], max_batch_size=4, batch_wait_ms=50,
                      context_length=loaded.context_length)
    gate, decoding = threading.Event(), threading.Event()
    forward, submit, handles = engine._forward, engine.submit, []

    def gated_forward(ids, mask, cache):
        if cache is not None:  # a decoding step: held until the test lets it go
            decoding.set()
            gate.wait(120)
        return forward(ids, mask, cache)

    def recording_submit(*args, **kwargs):
        handles.append(submit(*args, **kwargs))
        return handles[-1]

    engine._forward, engine.submit = gated_forward, recording_submit
    app = create_app(dataclasses.replace(loaded, engine=engine), cfg.generation)
    try:
        with serving(app) as base:
            port = int(base.rsplit(":", 1)[1])
            data = json.dumps(body).encode()
            with socket.create_connection(("127.0.0.1", port)) as client:
                client.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
                assert decoding.wait(120), "generation did not start"
            # the client is gone while its answer is being generated: the server notices and cancels every handle
            assert wait_for(lambda: len(handles) == n and all(h.cancelled.is_set() for h in handles), 30), \
                "the server did not cancel the generation of a client that disconnected"
            gate.set()
            assert wait_for(lambda: engine.stats()["finished"] == n, 60)
            stats = engine.stats()
            assert stats["cancelled"] == n and stats["running"] == 0 and stats["waiting"] == 0
            assert stats["generated_tokens"] < n * 200  # stopped long before the budget
            text = httpx.get(base + "/metrics").text
            assert metric(text, f'medgpt_requests_total{{endpoint="{path}",status="499"}}') == 1
    finally:
        gate.set()
        engine.close()


# --- 13: body size limit before parsing; tokenisation off the event loop -------------------------------------------------

def test_oversized_bodies_are_413_before_parsing(tiny):
    loaded, cfg = tiny
    parsed = []
    stub = dataclasses.replace(loaded)
    stub.chat_ids = lambda messages: parsed.append(messages) or loaded.chat_ids(messages)
    app = create_app(stub, cfg.generation, max_body_kb=1)
    big = json.dumps({"messages": [{"role": "user", "content": "fever " * 700}], "max_tokens": 1}).encode()  # ~4 KB
    assert len(big) > 1024
    with serving(app) as base:
        res = httpx.post(base + "/v1/chat/completions", content=big, headers={"Content-Type": "application/json"}, timeout=60)
        assert res.status_code == 413, res.text
        error = res.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "request_too_large" and "1 KB" in error["message"]
        assert "serve.max_body_kb" in error["message"]

        def chunked():  # no Content-Length: the cap applies while the body streams in
            for i in range(0, len(big), 512):
                yield big[i:i + 512]

        res = httpx.post(base + "/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"}, timeout=60)
        assert res.status_code == 413 and res.json()["error"]["code"] == "request_too_large"
        assert parsed == []  # neither body was parsed nor tokenised
        small = httpx.post(base + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}, timeout=60)
        assert small.status_code == 200 and len(parsed) == 1
        small = httpx.post(base + "/v1/chat/completions", content=chunked_body(json.dumps({"messages": MESSAGES, "max_tokens": 1})),
                           headers={"Content-Type": "application/json"}, timeout=60)
        assert small.status_code == 200 and len(parsed) == 2  # a chunked body under the limit is read whole
        text = httpx.get(base + "/metrics").text
        assert metric(text, 'medgpt_requests_total{endpoint="/v1/chat/completions",status="413"}') == 2


def chunked_body(text: str):
    data = text.encode()
    for i in range(0, len(data), 16):
        yield data[i:i + 16]


def test_health_answers_while_a_prompt_is_tokenised(tiny):
    loaded, cfg = tiny
    started, release = threading.Event(), threading.Event()
    stub = dataclasses.replace(loaded)

    def slow_chat_ids(messages):  # a tokenizer that takes as long as the test wants
        started.set()
        release.wait(120)
        return loaded.chat_ids(messages)

    stub.chat_ids = slow_chat_ids
    result = {}
    with serving(create_app(stub, cfg.generation)) as base:
        def ask():
            result["res"] = httpx.post(base + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}, timeout=120)

        asking = threading.Thread(target=ask)
        asking.start()
        try:
            assert started.wait(60)
            health = httpx.get(base + "/health", timeout=20)  # answered while the tokenizer is still busy
            assert health.status_code == 200 and health.json()["status"] == "ok" and not release.is_set()
        finally:
            release.set()
            asking.join(120)
        assert result["res"].status_code == 200


# --- 14: field names in errors, strict types, bounded metric labels --------------------------------------------------------

@pytest.mark.parametrize("extra,param", [
    ({"stream": "yes"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"stream_options": "usage"}, "stream_options"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_completion_tokens": "8"}, "max_completion_tokens"),
    ({"seed": False}, "seed"),
    ({"top_k": True}, "top_k"),
    ({"n": True}, "n"),
    ({"temperature": True}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
])
def test_wrong_types_are_refused_naming_the_field(extra, param):
    with pytest.raises(Exception) as caught:
        ChatRequest.model_validate({"messages": MESSAGES, **extra})
    errors = [{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()]
    got, message = first_validation_error(errors)
    assert got == param and message.startswith(f"{param}: ")


def test_correct_types_still_pass():
    req = ChatRequest.model_validate({"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True},
                                      "max_tokens": 8, "temperature": 0, "top_p": 1, "seed": 3, "top_k": -1, "n": 1})
    assert req.stream and req.stream_options.include_usage and req.max_tokens == 8 and req.temperature == 0.0
    with pytest.raises(Exception) as caught:
        CompletionRequest.model_validate({"prompt": "hi", "echo": "no"})
    assert first_validation_error(caught.value.errors())[0] == "echo"
    # union branches pydantic names in locations are still dropped
    with pytest.raises(Exception) as caught:
        ChatRequest.model_validate({"messages": [{"role": "user", "content": [{"type": "image"}]}]})
    assert first_validation_error(caught.value.errors())[0].startswith("messages.0.content")


def test_http_errors_name_stream_fields_and_unknown_paths_share_one_label(tiny):
    loaded, cfg = tiny
    with serving(create_app(loaded, cfg.generation)) as base:
        for extra, param in (({"stream": "yes"}, "stream"), ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
                             ({"max_tokens": True}, "max_tokens")):
            res = httpx.post(base + "/v1/chat/completions", json={"messages": MESSAGES, **extra}, timeout=60)
            assert res.status_code == 400 and res.json()["error"]["param"] == param, res.text
        for i in range(5):
            assert httpx.get(f"{base}/scan/{i}/wp-login.php").status_code == 404
        assert httpx.post(base + "/v1/nothing", json={}).status_code == 404
        text = httpx.get(base + "/metrics").text
    assert metric(text, 'medgpt_requests_total{endpoint="other",status="404"}') == 6
    assert "/scan/" not in text and "/v1/nothing" not in text
    assert metric(text, 'medgpt_requests_total{endpoint="/v1/chat/completions",status="400"}') == 3


# --- 15: the port pre-check accepts a port whose last connections are in TIME_WAIT -----------------------------------------

def test_a_port_in_time_wait_is_not_reported_busy():
    from medgpt.errors import ConfigError
    from medgpt.serving.modes import _check_port

    # what a server that just stopped leaves: its listening socket (SO_REUSEADDR, as uvicorn sets it) closed, and a
    # connection it closed first in TIME_WAIT on the same port
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = listener.accept()
    conn.close()  # the server side closes first: its end of the connection goes to TIME_WAIT
    client.recv(1)
    client.close()
    listener.close()
    _check_port("127.0.0.1", port, "serve.port")  # free to listen on again
    with socket.socket() as busy:  # a port somebody listens on is still refused
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match="cannot listen on"):
            _check_port("127.0.0.1", busy.getsockname()[1], "serve.port")


# --- 16: serve.max_batch_size=0 (the default) picks the batch size from the model and the memory -----------------------------

def test_auto_batch_size_from_model_and_memory():
    from medgpt.serving.hf_engine import auto_batch_size

    gib = 2**30
    # the tiny model: a few MB of weights, 512 bytes of KV cache a token, 2048 tokens of context, 8 GB free
    assert auto_batch_size(n_params=3_000_000, bytes_per_param=4, kv_bytes_per_token=512, context=2048, memory_bytes=8 * gib) == 64
    # an 8B model in bf16 (16 GB) with 128 KB of KV cache a token and 8192 tokens of context on a 24 GB GPU: the cache
    # of 8 full-context requests (8 GB) hardly fits, so no more than the floor
    assert auto_batch_size(n_params=8e9, bytes_per_param=2, kv_bytes_per_token=131072, context=8192, memory_bytes=24 * gib) == 8
    # the same model on an 80 GB GPU: room for ~55 full-context requests
    mid = auto_batch_size(n_params=8e9, bytes_per_param=2, kv_bytes_per_token=131072, context=8192, memory_bytes=80 * gib)
    assert 8 < mid < 64
    # more memory never means a smaller batch
    sizes = [auto_batch_size(n_params=8e9, bytes_per_param=2, kv_bytes_per_token=131072, context=8192, memory_bytes=m * gib)
             for m in (16, 24, 40, 60, 80, 120, 640)]
    assert sizes == sorted(sizes) and sizes[0] == 8 and sizes[-1] == 64


def test_auto_batch_size_in_the_engine_and_the_config(tiny):
    from medgpt.serving.hf_engine import kv_bytes_per_token
    from medgpt.serving.modes import check_settings, vllm_batch_size

    loaded, _ = tiny
    config = loaded.engine.model.config
    assert kv_bytes_per_token(config, 4) == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, fp32
    engine = HFEngine(loaded.engine.model, loaded.tokenizer, loaded.stop_ids, max_batch_size=0, context_length=loaded.context_length)
    try:
        assert engine.max_batch_size == 64 and engine.stats()["max_batch_size"] == 64  # a tiny model in GBs of RAM
    finally:
        engine.close()
    cfg = compose(["model=tiny"])
    assert cfg.serve.max_batch_size == 0  # auto by default
    check_settings(cfg)
    assert vllm_batch_size(cfg) == 256 and vllm_batch_size(compose(["model=tiny", "serve.max_batch_size=12"])) == 12
    from medgpt.config import validate
    from medgpt.errors import ConfigError

    with pytest.raises(ConfigError, match="serve.max_batch_size=-1 is invalid"):
        validate(compose(["mode=serve", "model=tiny", "serve.max_batch_size=-1"]))


# --- 20: the web UI names base model, adapter and template once; the system prompt is the run's or a medical one ------------

@pytest.fixture()
def run_with_prompt(tmp_path):
    dst = tmp_path / "outputs" / "prompted-run"
    shutil.copytree(tiny_run(), dst, ignore=shutil.ignore_patterns("checkpoints"))
    config = yaml.safe_load((dst / "config.yaml").read_text())
    config["data"]["system_prompt"] = "You are a cardiology assistant. Be precise."
    (dst / "config.yaml").write_text(yaml.safe_dump(config))
    return dst


def test_webui_header_and_default_system_prompt(run_with_prompt):
    from medgpt.serving.loading import resolve_artefacts
    from medgpt.serving.webui import MEDICAL_SYSTEM_PROMPT, build_ui, default_system_prompt, header

    # template=smollm2: a template that brings the base model's own system prompt
    plain = resolve_artefacts(compose(["model=tiny", f"run={tiny_run()}", f"paths.root={ROOT}", "template=smollm2"]))
    prompted = resolve_artefacts(compose(["model=tiny", f"run={run_with_prompt}", f"paths.root={ROOT}"]))
    untrained = resolve_artefacts(compose(["model=tiny", f"paths.root={ROOT}"]))
    assert "SmolLM" in plain.template.default_system  # the base model's own prompt, which the UI must not offer
    assert yaml.safe_load((tiny_run() / "config.yaml").read_text())["data"].get("system_prompt") is None

    assert default_system_prompt(plain) == MEDICAL_SYSTEM_PROMPT != plain.template.default_system
    assert default_system_prompt(prompted) == "You are a cardiology assistant. Be precise."
    assert default_system_prompt(untrained) == MEDICAL_SYSTEM_PROMPT
    assert "medical" in MEDICAL_SYSTEM_PROMPT and "SmolLM" not in MEDICAL_SYSTEM_PROMPT

    text = header(plain)
    assert text == "**tiny-run**: base model tiny-v1 + adapter tiny-run/adapter, chat template smollm2"
    assert header(untrained) == "**tiny**: base model tiny-v1 (untrained), chat template chatml"

    class Stub:  # build_ui needs only the artefacts until a message arrives
        artefacts = prompted

    cfg = compose(["model=tiny"])
    demo = build_ui(Stub(), cfg.generation, 200, 64)
    assert demo.additional_inputs[0].value == "You are a cardiology assistant. Be precise."
    assert demo.description.startswith(header(prompted) + ". ") and "weights:" not in demo.description
