"""Serving sides of `make bench`: medgpt's OpenAI server and `transformers serve --continuous-batching`.

Both serve the same model folder (medgpt: model=<name> composed as `launch.py mode=serve` composes it, serve and
generation settings at their defaults but greedy; transformers: `transformers serve --continuous-batching <folder>`,
its fastest documented CPU mode, in a child process), and both get the same chat requests (the questions of
bench/serve_concurrency.py) through the `openai` client, greedy, `max_tokens` each. A repetition sends them
one at a time (medgpt only: the serve_vs_sequential row, same server) and from 8 and 32 concurrent clients; the
value of each phase is generated tokens (the server's usage.completion_tokens) per second of wall time.
Writes: nothing; transformers serve's process is stopped when the side ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def prompts(n: int) -> list[str]:
    from bench.serve_concurrency import QUESTIONS

    return [QUESTIONS[i % len(QUESTIONS)] + (f" (case {i})" if i >= len(QUESTIONS) else "") for i in range(n)]


def phases(client, model: str, clients: list[int], max_tokens: int, sequential: bool) -> dict:
    """Generated tokens/s per phase ("sequential", "c8", "c32", ...) and the mean completion length."""

    def ask(question: str) -> int:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                                           temperature=0)
        return r.usage.completion_tokens

    out, lengths = {}, []
    plan = ([("sequential", clients[0])] if sequential else []) + [(f"c{n}", n) for n in clients]
    for name, n in plan:
        asked = prompts(n)
        started = time.perf_counter()
        if name == "sequential":
            tokens = [ask(q) for q in asked]
        else:
            with ThreadPoolExecutor(n) as pool:
                tokens = list(pool.map(ask, asked))
        out[name] = sum(tokens) / (time.perf_counter() - started)
        lengths += tokens
    out["mean_completion_tokens"] = sum(lengths) / len(lengths)
    return out


def medgpt_server(model: str, clients: list[int], max_tokens: int):
    """medgpt's server (mode=serve's app, default engine and batching) in this process on a free localhost port."""
    import openai

    from bench.serve_concurrency import start_server
    from bench.train_sides import compose

    cfg = compose(["mode=serve", f"model={model}", "hardware=cpu", "generation.temperature=0"])
    loaded, server, base = start_server(cfg)
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=900)
    name = loaded.artefacts.name
    phases(client, name, [1], 4, sequential=False)  # warm-up: first-call allocations are nobody's cost

    def measure() -> dict:
        values = phases(client, name, clients, max_tokens, sequential=True)
        return {"value": values[f"c{clients[0]}"], "values": values, "max_batch_size": cfg.serve.max_batch_size}

    return measure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transformers_serve(model: str, clients: list[int], max_tokens: int, startup_s: int = 300):
    """`transformers serve --continuous-batching <model folder>` in a child process (its peak RSS is read from there)."""
    import openai

    from bench.harness import peak_rss_mb
    from medgpt.modeling.loader import resolve_model_path

    cfg = __import__("bench.train_sides", fromlist=["compose"]).compose([f"model={model}"])
    folder = resolve_model_path(cfg.model.name_or_path, cfg.paths.cache_dir, cfg.model.revision)
    exe = Path(sys.executable).with_name("transformers")
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-transformers-serve-{port}.log", "w")
    proc = subprocess.Popen([str(exe), "serve", "--continuous-batching", "--host", "127.0.0.1", "--port", str(port), folder],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def close() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=900)
    deadline = time.time() + startup_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited with {proc.returncode} (see {log.name})")
        try:
            phases(client, folder, [1], 4, sequential=False)  # warm-up; fails until the server is up
            break
        except openai.APIConnectionError:
            if time.time() > deadline:
                close()
                raise RuntimeError(f"transformers serve did not answer within {startup_s} s (see {log.name})") from None
            time.sleep(1)

    def measure() -> dict:
        values = phases(client, folder, clients, max_tokens, sequential=False)
        return {"value": values[f"c{clients[0]}"], "values": values, "server_peak_rss_mb": peak_rss_mb(proc.pid)}

    measure.close = close
    return measure
