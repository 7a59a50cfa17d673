"""Shared fixtures: the project root, Hydra compose, the tiny model's tokenizer, and a launch.py runner."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2`: one intra-op thread per worker (the tiny model gains ~nothing from two, and
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # two workers x two threads on two cores wait on each other); child runs inherit it


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # torch may have been imported before this file set it


# The costliest files (CPU seconds measured with `-n 2`), handed out first: `--dist loadfile --no-loadscope-reorder` (make
# test) gives each worker the next file in collection order, so the files left for the end are short and both workers
# finish together (xdist's default order, most tests first, left the 2-test console file for last). A stale list costs
# only balance, never correctness.
COSTLIEST_FIRST = ("test_config.py", "test_launch.py", "test_sft_run.py", "test_eval.py", "test_config_values.py", "test_export.py",
                   "test_kto.py", "test_serving_api.py", "test_reliability_console.py", "test_serving_reliability.py", "test_grpo.py",
                   "test_sweep.py", "test_data_sources_tokenise.py", "test_sweep_optuna.py")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker must collect the same order: this one is fixed
        rank = {name: i for i, name in enumerate(COSTLIEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@functools.cache
def _register_configs() -> None:
    from medgpt.config import register_configs

    register_configs()  # once per process: ~0.05 s a call, and the suite composes hundreds of times


def compose(overrides: list[str] | None = None):
    """The composed config for `overrides`, as `python launch.py <overrides>` would see it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    _register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return hydra_compose(config_name="config", overrides=overrides or [])


# read once, when a library is imported: a run that sets them needs an interpreter of its own
IMPORT_TIME_ENV = {"HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "TRANSFORMERS_CACHE"}


def launch(*args: str, timeout: int = 300, env: dict | None = None, subprocess_only: bool = False,
           input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python launch.py args...` from the project root, `input` (if given) on its stdin; returns the finished process
    (never raises).

    In this process by default (a fresh interpreter costs ~9 s of CPU importing torch and transformers, and the fast
    suite launches ~80 runs); in a child process with `subprocess_only=True` (signals, first-time warnings), when `env`
    gives an import-time variable a value this process does not have, or when called from a worker thread (concurrent
    runs share no Hydra state).
    """
    import_time_change = any(os.environ.get(k) != v for k, v in (env or {}).items() if k in IMPORT_TIME_ENV)
    if subprocess_only or threading.current_thread() is not threading.main_thread() or import_time_change:
        full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | (env or {})  # errors as users see them
        return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=full_env, input=input)
    return launch_in_process(*args, env=env, input=input)


def launch_in_process(*args: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """`python launch.py args...` inside this interpreter, with stdout/stderr captured and global state restored."""
    import io
    import logging
    import signal
    from contextlib import redirect_stderr, redirect_stdout

    from hydra.core.global_hydra import GlobalHydra

    from medgpt.cli import main

    saved = (sys.argv, sys.stdin, dict(os.environ), os.getcwd(), logging.getLogger().handlers[:], logging.getLogger().level,
             {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)})
    import torch

    os.environ.pop("HYDRA_FULL_ERROR", None)
    os.environ.update(env or {})
    threads = torch.get_num_threads()
    if env and "OMP_NUM_THREADS" in env:  # what the variable does in a fresh process (torch read it at import here)
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    sys.argv = ["launch.py", *args]
    sys.stdin = io.StringIO(input or "")  # input() reads it; empty: end of input at once, as `< /dev/null`
    os.chdir(ROOT)
    out, err = io.StringIO(), io.StringIO()
    code: object = 0
    GlobalHydra.instance().clear()
    # Hydra's logging setup (dictConfig) closes every live handler of the process, pytest's capture streams
    # included; let it close only the handlers this run creates.
    import logging.config

    before = set(logging._handlerList)
    clear_all = logging.config._clearExistingHandlers

    def clear_this_runs_handlers():
        logging._handlers.clear()
        logging.shutdown([ref for ref in logging._handlerList[:] if ref not in before])

    logging.config._clearExistingHandlers = clear_this_runs_handlers
    try:
        with redirect_stdout(out), redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code
    finally:
        logging.config._clearExistingHandlers = clear_all
        GlobalHydra.instance().clear()
        argv, stdin, environ, cwd, handlers, level, signals = saved
        sys.argv, sys.stdin = argv, stdin
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        root = logging.getLogger()
        for h in root.handlers:
            if h not in handlers:
                h.close()
        root.handlers, root.level = handlers, level
        for s, h in signals.items():
            signal.signal(s, h)
        torch.set_num_threads(threads)
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(["launch.py", *args], returncode, out.getvalue(), err.getvalue())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from medgpt.modeling.embedded import embedded_path

    return embedded_path("tiny", os.environ.get("MEDGPT_CACHE", str(Path.home() / ".cache" / "medgpt")))


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from medgpt.modeling.loader import load_tokenizer

    return load_tokenizer(str(tiny_path))


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def dialogue(i: int, turns: int = 1, system: str | None = None) -> dict:
    conv = [{"from": "system", "value": system}] if system else []
    for t in range(turns):
        conv += [{"from": "human", "value": f"Question {i}.{t}: is a temperature of 38.{t} C a fever?"},
                 {"from": "gpt", "value": f"Answer {i}.{t}: yes, 38.{t} C counts as a fever in adults; rest and drink fluids."}]
    return {"conversations": conv}
