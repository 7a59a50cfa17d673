"""The side-by-side harness of `make bench`: one child process per side, repetitions alternated, medians, peak RSS.

Supports: a group of sides (medgpt and one or more peers) measured in ONE invocation, each side in its own child
process (multiprocessing, spawn) that sets itself up once and then answers "run one repetition" requests; the parent
asks the sides in turn, A B [C ...] A B [C ...], so drifting machine load hits every side alike, and takes the
median of each side's repetitions. Peak memory is each child's peak resident set (VmHWM from /proc/<pid>/status,
read after its last repetition): a side's own process holds only its own model, data and allocator caches, which
an in-process RSS delta or tracemalloc (Python objects only, not torch's buffers) cannot separate. Every child
pays the same interpreter + torch import baseline, so the figures compare like with like.
Refuses: nothing itself; a side that raises reports its error, which the row then records instead of a number.
Writes: each child's scratch folder (`scratch()`: trainer output folders, metrics.jsonl of medgpt's runs, eval
results), removed when the child ends; bench/run.py writes latest.json and the README table.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass, field


@dataclass
class Side:
    """One side of a comparison: `factory(**kwargs)` runs in the child and returns a callable that measures one
    repetition and returns a dict with at least `value` (higher is better)."""

    name: str
    factory: str  # "module:function", importable from the project root
    kwargs: dict = field(default_factory=dict)


def _child(conn, factory: str, kwargs: dict) -> None:
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        module, func = factory.split(":")
        measure = getattr(importlib.import_module(module), func)(**kwargs)
        conn.send({"ready": True})
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which records it in the row
        conn.send({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=6)})
        return
    while True:
        what = conn.recv()
        if what == "stop":
            getattr(measure, "close", lambda: None)()  # a side that started a server stops it
            return
        try:
            conn.send(measure())
        except BaseException as e:  # noqa: BLE001
            conn.send({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=6)})


_SCRATCH: list[str] = []


def scratch(prefix: str) -> str:
    """A new folder inside this process' scratch folder (created on first use, removed when the process exits)."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="medgpt-bench-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return tempfile.mkdtemp(prefix=prefix, dir=_SCRATCH[0])


def peak_rss_mb(pid: int) -> float | None:
    """The peak resident set of process `pid` in MiB (Linux VmHWM), or None where /proc does not say."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def measure_group(sides: list[Side], repetitions: int, log=print) -> dict[str, dict]:
    """Each side's repetitions (alternated across sides), median `value`, peak RSS and error (if any)."""
    ctx = mp.get_context("spawn")
    procs: dict[str, tuple] = {}
    out: dict[str, dict] = {s.name: {"runs": [], "error": None} for s in sides}
    try:
        for s in sides:  # set-up one after another: two model loads at once would skew nothing but take longer
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_child, args=(child, s.factory, s.kwargs), daemon=True)
            p.start()
            procs[s.name] = (p, parent)
            msg = parent.recv()
            if "error" in msg:
                out[s.name]["error"] = msg["error"]
                log(f"  {s.name}: set-up failed: {msg['error']}\n{msg.get('trace', '')}")
        for rep in range(repetitions):
            for s in sides:
                if out[s.name]["error"]:
                    continue
                p, conn = procs[s.name]
                conn.send("run")
                msg = conn.recv()
                if "error" in msg:
                    out[s.name]["error"] = msg["error"]
                    log(f"  {s.name}: repetition {rep + 1} failed: {msg['error']}\n{msg.get('trace', '')}")
                    continue
                out[s.name]["runs"].append(msg)
                log(f"  {s.name:<28} rep {rep + 1}/{repetitions}: {msg['value']:.4g}")
        for s in sides:
            p, conn = procs[s.name]
            out[s.name]["peak_rss_mb"] = peak_rss_mb(p.pid)
    finally:
        for p, conn in procs.values():
            if p.is_alive():
                try:
                    conn.send("stop")
                except OSError:
                    pass
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    for s in sides:
        values = [r["value"] for r in out[s.name]["runs"]]
        out[s.name]["median"] = statistics.median(values) if values and not out[s.name]["error"] else None
    return out


def ratio(ours: float | None, theirs: float | None) -> float | None:
    """medgpt / peer (both "higher is better"), rounded; None when either side has no number."""
    if not ours or not theirs:
        return None
    return round(ours / theirs, 3)


def machine() -> dict:
    """What the numbers were measured on (CPU model, cores, load, library versions)."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor()) \
        if os.path.exists("/proc/cpuinfo") else platform.processor()
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), []) \
        if os.path.exists("/proc/cpuinfo") else []
    versions = {}
    for pkg in ("torch", "transformers", "trl", "peft", "lm_eval"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg.replace("_", "-") if pkg == "lm_eval" else pkg)
        except Exception:  # noqa: BLE001 - not installed
            versions[pkg] = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "bf16_instructions": [f for f in ("avx512_bf16", "amx_bf16") if f in flags],
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": [round(x, 2) for x in os.getloadavg()], "platform": platform.platform(),
            "python": platform.python_version(), **versions, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
