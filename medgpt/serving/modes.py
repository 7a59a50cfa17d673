"""Inference modes: `python launch.py mode=serve|chat|predict|webui [run=<dir>|latest] [model=<name>]`.

Each loads a finished run directory (or the untrained `model=<name>` without `run`), prints what it
loaded, and hands the engine to its front end: api.py (OpenAI-compatible server), chat.py (terminal),
predict.py (batch files), webui.py (Gradio).
"""

from __future__ import annotations

import copy
import logging
import os
import socket
from pathlib import Path

from omegaconf import DictConfig

from medgpt.errors import ConfigError
from medgpt.registry import register

log = logging.getLogger(__name__)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
VLLM_AUTO_BATCH = 256  # vLLM's own max_num_seqs default: its paged KV cache (and preemption) handles the memory


def check_settings(cfg: DictConfig) -> None:
    from medgpt.serving.engine import engine_spec

    s, g = cfg.serve, cfg.generation
    engine_spec(s.engine)  # a registered engine, or one sentence naming those there are
    if s.max_batch_size < 0 or s.batch_wait_ms < 0:
        raise ConfigError("serve.max_batch_size must be at least 1 (or 0: chosen from the model and the memory) "
                          "and serve.batch_wait_ms at least 0.")
    if g.max_new_tokens < 1 or g.temperature < 0 or not 0 < g.top_p <= 1 or g.repetition_penalty <= 0:
        raise ConfigError("generation: max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1 and repetition_penalty > 0 are required.")
    if cfg.predict.batch_size < 1:
        raise ConfigError("predict.batch_size must be at least 1.")


def _check_port(host: str, port: int, key: str) -> None:
    if not 0 < port < 65536:
        raise ConfigError(f"{key}={port} is not a TCP port (1-65535).")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as uvicorn binds: with SO_REUSEADDR, connections of a server that just stopped (TIME_WAIT) do not count as busy
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pick a free port with {key}=<port>.") from None


def vllm_batch_size(cfg: DictConfig) -> int:
    """vLLM's max_num_seqs: serve.max_batch_size, or vLLM's own default when it is 0 (auto)."""
    return cfg.serve.max_batch_size or VLLM_AUTO_BATCH


def _load(cfg: DictConfig, mode: str, max_batch_size: int | None = None):
    from medgpt.serving.loading import load

    check_settings(cfg)
    if cfg.serve.engine == "vllm" and not cfg.serve.max_batch_size:
        cfg = copy.deepcopy(cfg)  # the vllm engine reads serve.max_batch_size itself
        cfg.serve.max_batch_size = vllm_batch_size(cfg)
    loaded = load(cfg, max_batch_size)
    print(loaded.describe(mode), flush=True)
    if mode in ("serve", "webui"):
        batch = getattr(loaded.engine, "max_batch_size", None) or cfg.serve.max_batch_size
        how = " (serve.max_batch_size=0: from the model size and free memory)" if getattr(loaded.engine, "auto_batch", False) else ""
        print(f"  batch          up to {batch} requests decoded together{how}", flush=True)
    return loaded


def api_key(cfg: DictConfig) -> str | None:
    return cfg.serve.api_key or os.environ.get("MEDGPT_API_KEY") or None


def require_key_off_loopback(host: str, key: str | None, host_key: str) -> None:
    """Refuse to listen beyond this machine without an API key (the Docker image listens on 0.0.0.0)."""
    if host not in LOCAL_HOSTS and not key:
        raise ConfigError(f"{host_key}={host} is reachable from the network and no API key is set: set serve.api_key=<key> or "
                          f"the MEDGPT_API_KEY environment variable (or listen on 127.0.0.1).")


@register("serve")
def serve(cfg: DictConfig, log_dir: Path) -> dict:
    import uvicorn

    from medgpt.serving.api import create_app

    host, port, key = cfg.serve.host, cfg.serve.port, api_key(cfg)
    require_key_off_loopback(host, key, "serve.host")
    _check_port(host, port, "serve.port")
    loaded = _load(cfg, "serve")
    app = create_app(loaded, cfg.generation, key, cfg.serve.max_tokens_limit, cfg.serve.max_body_kb)
    shown = f"[{host}]" if ":" in host else host
    print(f"  listening      http://{shown}:{port}/v1  (API key {'required' if key else 'off'}; GET /health, /metrics)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
    finally:
        loaded.engine.close()
    return {}


@register("chat")
def chat(cfg: DictConfig, log_dir: Path) -> dict:
    from medgpt.serving.chat import ChatSession

    loaded = _load(cfg, "chat", max_batch_size=1)
    try:
        ChatSession(loaded, cfg.generation).loop()
    finally:
        loaded.engine.close()
    return {}


@register("predict")
def predict(cfg: DictConfig, log_dir: Path) -> dict:
    from medgpt.serving.predict import check_paths, read_inputs, run_predict

    check_settings(cfg)
    inp, out = check_paths(cfg.predict)  # paths and records first: a typo costs no waiting for the model
    items = read_inputs(inp)
    loaded = _load(cfg, "predict", max_batch_size=cfg.predict.batch_size)
    try:
        return run_predict(loaded, cfg.generation, items, inp, out, cfg.predict.batch_size)
    finally:
        loaded.engine.close()


@register("webui")
def webui(cfg: DictConfig, log_dir: Path) -> dict:
    from medgpt.serving.webui import build_ui

    host, port, key = cfg.serve.host, cfg.serve.webui_port, api_key(cfg)
    _check_port(host, port, "serve.webui_port")
    loaded = _load(cfg, "webui")
    demo = build_ui(loaded, cfg.generation, cfg.serve.max_upload_kb, cfg.serve.max_tokens_limit)
    print(f"  web UI         http://{host}:{port}" + ("  (log in with any user name and the API key as password)" if key else ""), flush=True)
    auth = (lambda user, password: password == key) if key else None
    try:
        batch = getattr(loaded.engine, "max_batch_size", None) or cfg.serve.max_batch_size or VLLM_AUTO_BATCH
        demo.queue(default_concurrency_limit=batch).launch(
            server_name=host, server_port=port, auth=auth, show_error=True, inbrowser=False, share=False, ssr_mode=False, quiet=True,
            max_file_size=f"{max(10 * cfg.serve.max_upload_kb, 1024)}kb")  # larger uploads get our own clearer message
    finally:
        loaded.engine.close()
    return {}
