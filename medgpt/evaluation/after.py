"""A training run that evaluates itself at its end (eval.after), and a pipeline after every stage (pipeline.eval).

    python launch.py model=tiny debug=smoke eval.after=[mcq] eval.limit=20
    -> <run>/eval/mcq[-<hash>]/ and summary.json "eval/mcq/accuracy", "eval/mcq/n", ... — the same keys go to
       W&B / TensorBoard with the final summary, into mode=compare tables, and can be a sweep's objective
       (sweep.metric=eval/mcq/accuracy sweep.direction=maximize)

Settings: the suite named by eval=<suite> (default mcq) runs with the command's eval.* settings; any other suite in
the list with its conf/eval/<suite>.yaml plus the command's eval.limit, eval.batch_size and eval.on_error. The keys
always go into summary.json (eval.limit included: eval/<suite>/n says how many questions they cover).
Checked before training (check()): the suite names, the eval values and every suite's files (bad data is one
sentence and no run directory), and that the method can answer (method=rm cannot).
Who evaluates: the process that started the run, after the stage has saved its weights and summary.json says
completed — with launcher=torchrun that is the launcher, after its workers have exited, so exactly one process
evaluates (W&B / TensorBoard were closed by rank 0's worker then: the keys are in summary.json only, as logged).
An evaluation that fails after training leaves the run completed (its weights are fine): the sentence is logged
and kept in summary.json as `eval_error`.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, open_dict

from medgpt.errors import ConfigError, MedgptError
from medgpt.evaluation.common import default_node
from medgpt.tracking.rundir import RunDir

log = logging.getLogger(__name__)
SHARED_KEYS = ("limit", "batch_size", "on_error")  # the command's values reach every suite of the list


def suites(cfg: DictConfig) -> list[str]:
    """The suites a run evaluates itself with: pipeline.eval for method=pipeline (else eval.after), eval.after otherwise."""
    if cfg.method.name == "pipeline" and cfg.pipeline.eval:
        return list(cfg.pipeline.eval)
    return list(cfg.eval.after) if "eval" in cfg else []


def suite_cfg(cfg: DictConfig, name: str) -> DictConfig:
    """`cfg` with the eval node of suite `name` (the command's own, or the suite's defaults with SHARED_KEYS)."""
    c = copy.deepcopy(cfg)
    if cfg.eval.name != name:
        node = default_node(name)
        for key in SHARED_KEYS:
            node[key] = cfg.eval[key]
        with open_dict(c):
            c.eval = node
    with open_dict(c):
        c.eval.after, c.eval.baseline = [], False
    return c


def check(cfg: DictConfig) -> None:
    """Everything eval.after / pipeline.eval can be refused for, before any directory exists."""
    names = suites(cfg)
    if not names:
        return
    from medgpt.config import EvalConfig, check_fields
    from medgpt.evaluation.modes import SUITES, suite_module

    key = "pipeline.eval" if cfg.method.name == "pipeline" and cfg.pipeline.eval else "eval.after"
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ConfigError(f"{key}={names}: {unknown[0]} is not a suite (suites: {', '.join(SUITES)}).")
    if cfg.method.name == "rm":
        raise ConfigError(f"method=rm trains a reward model, which scores texts and cannot answer questions: drop {key}.")
    check_fields(cfg.eval, EvalConfig, "eval.")
    root = Path(cfg.paths.root)
    for name in dict.fromkeys(names):
        c = suite_cfg(cfg, name)
        suite = suite_module(name)
        suite.settings(c.eval, root)
        suite.prepare(c.eval, root)  # reads the files: a bad question is one sentence now, not after training


def evaluate_run(cfg: DictConfig, run_dir: Path, names: list[str], baseline: bool = False) -> dict[str, dict]:
    """Each suite on the run in `run_dir` (its weights saved); returns results.json per suite. The run's summary.json
    gets the flat eval/<suite>/<metric> keys."""
    from medgpt.evaluation.modes import run_suite, run_target

    out = {}
    for name in dict.fromkeys(names):
        c = suite_cfg(cfg, name)
        c.eval.baseline = baseline
        out[name] = run_suite(c, run_target(Path(run_dir)), summary=True)
    return out


def after_training(cfg: DictConfig, run_dir: RunDir, summary: dict) -> dict:
    """eval.after on a completed run; returns its summary.json (with the eval/ keys, or `eval_error`)."""
    names = suites(cfg)
    if not names or summary.get("stage") == "pipeline":  # a pipeline evaluated its stages itself
        return summary
    if int(os.environ.get("RANK", "0") or 0) != 0:
        log.info("eval.after: rank %s does not evaluate (rank 0 does)", os.environ.get("RANK"))
        return summary
    if "launcher" in cfg and cfg.launcher.name != "local" and cfg.logger.name != "none":
        log.info("eval.after: the results go to summary.json; %s got the workers' summary before the evaluation", cfg.logger.name)
    log.info("eval.after: %s on %s", ", ".join(names), run_dir)
    try:
        evaluate_run(cfg, run_dir.path, names)
    except Exception as e:  # noqa: BLE001 - the run's weights are saved and fine; say what failed and keep them
        why = str(e) if isinstance(e, MedgptError) else f"{type(e).__name__}: {e}"
        log.error("eval.after failed (the run itself completed): %s", why)
        print(f"eval.after failed (the run itself completed): {why}", flush=True)
        return run_dir.update_summary({"eval_error": why}).to_dict()
    return run_dir.read_summary().to_dict()
