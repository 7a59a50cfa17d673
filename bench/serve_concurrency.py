"""Concurrent clients against medgpt's OpenAI server versus the same requests one at a time.

    .venv/bin/python bench/serve_concurrency.py                        # smollm2-135m, 8 clients x 48 tokens, greedy
    .venv/bin/python bench/serve_concurrency.py --run latest --clients 4

One server (the hf engine, in this process, on a free localhost port), one model, the same prompts
and settings for both phases; only the arrival pattern differs. Phases run A-B-B-A (sequential,
concurrent, concurrent, sequential) so that drifting machine load hits both alike. Reports generated
tokens/s of each phase and their ratio, checks the answers are identical (greedy), and writes JSON
to bench/results/serve_concurrency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = [
    "What are the common symptoms of type 2 diabetes?",
    "How can I tell a cold from the flu?",
    "When should a fever in an adult be checked by a doctor?",
    "What does high blood pressure do to the body over time?",
    "How should a minor burn be treated at home?",
    "What are the warning signs of a stroke?",
    "Why do doctors recommend finishing a course of antibiotics?",
    "How much sleep does an adult need, and why does it matter?",
    "What is the difference between a virus and a bacterium?",
    "How can I lower my cholesterol without medication?",
    "What are the signs of dehydration in children?",
    "When is a headache a reason to see a doctor?",
]


def compose_cfg(args):
    from hydra import compose, initialize_config_dir

    from medgpt.config import register_configs

    register_configs()
    overrides = [f"model={args.model}", f"paths.root={ROOT}", "generation.temperature=0", f"serve.max_batch_size={args.clients}",
                 f"serve.batch_wait_ms={args.batch_wait_ms}", "hardware=cpu" if args.cpu else "hardware=auto"]
    if args.run:
        overrides.append(f"run={args.run}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose(config_name="config", overrides=overrides)


def start_server(cfg):
    import uvicorn

    from medgpt.serving.api import create_app
    from medgpt.serving.loading import load

    loaded = load(cfg)
    print(loaded.describe("bench"), flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(loaded, cfg.generation), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return loaded, server, f"http://127.0.0.1:{port}/v1"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="model=<name> (used when --run is not given)")
    ap.add_argument("--run", default=None, help="a run directory or latest")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--batch-wait-ms", type=int, default=20)
    ap.add_argument("--cpu", action="store_true", help="force hardware=cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_concurrency.json"))
    args = ap.parse_args()

    import openai
    import torch

    cfg = compose_cfg(args)
    loaded, server, base = start_server(cfg)
    client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    prompts = QUESTIONS[:args.clients]
    if len(prompts) < args.clients:
        prompts = [f"{QUESTIONS[i % len(QUESTIONS)]} (case {i})" for i in range(args.clients)]

    def ask(question: str):
        r = client.chat.completions.create(model=loaded.artefacts.name, messages=[{"role": "user", "content": question}],
                                           max_tokens=args.max_tokens, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens

    ask("Hello")  # warm-up: first-call allocations are nobody's cost

    def sequential():
        started = time.perf_counter()
        results = [ask(q) for q in prompts]
        return results, time.perf_counter() - started

    def concurrent():
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(ask, prompts))
        return results, time.perf_counter() - started

    load_before = os.getloadavg()
    rounds, answers = [], {}
    for name, phase in (("sequential", sequential), ("concurrent", concurrent), ("concurrent", concurrent), ("sequential", sequential)):
        before = loaded.engine.stats()
        results, seconds = phase()
        after = loaded.engine.stats()
        tokens = sum(n for _, n in results)
        steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
        rows = after.get("decode_rows", 0) - before.get("decode_rows", 0)
        rounds.append({"phase": name, "seconds": round(seconds, 2), "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2),
                       "mean_batch": round(rows / steps, 2) if steps else None})
        answers.setdefault(name, [a for a, _ in results])
        print(f"  {name:<11} {tokens:4d} tokens in {seconds:6.1f} s = {tokens / seconds:6.1f} tok/s"
              f"  (mean batch {rounds[-1]['mean_batch']})", flush=True)

    def rate(name):
        chosen = [r for r in rounds if r["phase"] == name]
        return sum(r["tokens"] for r in chosen) / sum(r["seconds"] for r in chosen)

    seq, conc = rate("sequential"), rate("concurrent")
    result = {
        "benchmark": "serve_concurrency",
        "what": f"{args.clients} concurrent OpenAI-API clients vs the same requests one at a time; same server, engine, model, prompts",
        "model": args.run or args.model, "engine": loaded.engine.name, "clients": args.clients, "max_tokens": args.max_tokens,
        "sampling": "greedy", "batch_wait_ms": args.batch_wait_ms,
        "sequential_tokens_per_s": round(seq, 2), "concurrent_tokens_per_s": round(conc, 2), "ratio": round(conc / seq, 2),
        "same_answers": answers["sequential"] == answers["concurrent"],
        "rounds": rounds,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                    "device": str(next(loaded.engine.model.parameters()).device) if hasattr(loaded.engine, "model") else "?",
                    "torch": torch.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"\n  sequential {seq:.1f} tok/s | {args.clients} concurrent {conc:.1f} tok/s | ratio {conc / seq:.2f}x"
          f" | same answers: {result['same_answers']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"  written to {args.out}")
    server.should_exit = True
    loaded.engine.close()


if __name__ == "__main__":
    main()
