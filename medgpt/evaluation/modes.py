"""mode=eval: `python launch.py mode=eval run=<dir>|latest eval=mcq|generation|judge [eval.<key>=...]`, or `model=<name>`
without `run=` for an untrained model.

    run=<dir>   results go to <run>/eval/<folder>/ (a pipeline's root: its last stage). Only completed runs are
                evaluated (a failed, running, interrupted or crashed one is refused in one sentence); nothing of
                the run but its eval/ folder is written, results.json under the run's update lock, and for the
                suite's default settings its summary.json gets flat keys "eval/<suite>/<metric>". The command's log
                (Hydra's train.log) goes into that eval folder too, so no stray outputs/ directory is left.
    model=<m>   results go to the Hydra run directory (outputs/<date>/<time>-eval-<model>/ or hydra.run.dir), which
                gets config.yaml and eval/<folder>/ (never a summary.json: it is not a training run).
    eval.baseline=true   (run=<dir> only) also the run's starting model, in eval/<folder>/baseline/, and a paired
                test of the difference in results.json (medgpt.evaluation.baseline).

<folder> is the suite's name for its default settings, else `<suite>-<hash of the settings>` (medgpt.evaluation.folder).
A suite is a module with the same few functions (mcq.py, generation.py, judge.py):
    settings(e, root) -> dict          what changes its predictions (names the folder; recorded in results.json)
    prepare(e, root) -> data           the questions (`data.items`, each with an `id`) and `data.files`; raises on bad data
    predict(loaded, cfg, data, todo, write, bar) -> dict   scores `todo` (e = cfg.eval), `write(rows)` per batch; extra counters
    metrics(rows, e) -> dict           over every row of the folder; flat(metrics) -> summary values; describe(m) -> str
    per_question(row) -> float | None  a row's paired score (eval.baseline, the pipeline's table); MAIN: the main metric
Questions already in predictions.jsonl are skipped, so an interrupted evaluation continues where it stopped; a user
error while predicting (an unreachable judge) still writes results.json over the rows done, marked `incomplete`.
`run_suite(cfg, target, summary=True)` is how a run evaluates itself after training (medgpt.evaluation.after).
"""

from __future__ import annotations

import copy
import importlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from medgpt.errors import ConfigError, MedgptError, ModelError
from medgpt.evaluation.common import default_node, rel
from medgpt.evaluation.folder import EvalFolder, file_digest, folder_name
from medgpt.registry import register
from medgpt.tracking.rundir import RunDir, read_json, redirect_log_files, resolve_run, trained_run

log = logging.getLogger(__name__)
SUITES = {"mcq": "medgpt.evaluation.mcq", "generation": "medgpt.evaluation.generation", "judge": "medgpt.evaluation.judge"}
STATIC_BATCH_WAIT_MS = 1000  # the engine waits for a whole batch: the same batches on every run (deterministic)


@dataclass
class Target:
    """Where the results go and what is evaluated."""

    owner: RunDir  # the directory that gets eval/
    run: RunDir | None  # a finished training run (its summary.json gets the flat metrics)
    info: dict = field(default_factory=dict)  # model, run, adapter: for results.json
    model_key: str | None = None  # a bare model's name_or_path: the folder never mixes two models
    cfg: DictConfig | None = None  # the config to load it with, when not the command's (eval.baseline: the starting model)


def suite_module(name: str):
    if name not in SUITES:
        raise ConfigError(f"eval={name} is not a suite (suites: {', '.join(SUITES)}).")
    return importlib.import_module(SUITES[name])


@register("eval")
def evaluate(cfg: DictConfig, log_dir: Path) -> dict:
    """mode=eval: what is evaluated (refused in one sentence when it cannot be), then its suite."""
    return run_suite(cfg, resolve_target(cfg, log_dir), log_dir)


def run_suite(cfg: DictConfig, target: Target, log_dir: Path | None = None, loaded=None, summary: bool | None = None) -> dict:
    """eval=<suite> on `target` (and, with eval.baseline=true, on its starting model); returns results.json's content.

    `loaded` (medgpt.serving.loading.Loaded, left open): a model already in memory; else the target's is loaded when
    there is work to do. `summary`: write the flat eval/<suite>/<metric> keys into the run's summary.json — None: only
    for the suite's default settings (mode=eval), True: always (a run evaluating itself at its end, eval.after)."""
    e, root = cfg.eval, Path(cfg.paths.root)
    suite = suite_module(e.name)
    data = suite.prepare(e, root)  # a bad file or record stops here, before any model is loaded
    settings = {**suite.settings(e, root), "template": cfg.template.name}
    if cfg.get("quantize", "none") != "none":  # quantize=int8|nf4|fp4 answers differently: its own eval/<suite>-<hash>/ folder
        settings["quantize"] = cfg.quantize
    try:
        defaults = {**suite.settings(default_node(e.name), root), "template": "auto"}
    except ConfigError:  # the suite's default files are gone: every folder gets a hash
        defaults = None
    name = folder_name(e.name, settings, defaults)
    files = {rel(p, root): file_digest(p) for p in dict.fromkeys(data.files)}
    if target.run is None and not target.owner.config.exists():
        target.owner.path.mkdir(parents=True, exist_ok=True)
        target.owner.write_config(cfg)
    results, rows = _evaluate(cfg, target, suite, data, name, {"suite": e.name, "settings": settings, "model": target.model_key,
                                                               "files": files}, log_dir, loaded)
    flat = {f"eval/{e.name}/{k}": v for k, v in suite.flat(results).items()}
    if e.baseline:
        from medgpt.evaluation.baseline import baseline_target, compare_rows

        if target.run is None:
            raise ConfigError("eval.baseline=true compares a trained run with its starting model: pass run=<run directory>.")
        base = baseline_target(cfg, target)
        base_results, base_rows = _evaluate(cfg, base, suite, data, f"{name}/baseline",
                                            {"suite": e.name, "settings": settings, "model": base.model_key, "files": files})
        results = {**results, **compare_rows(suite, base_results, base_rows, rows)}
        EvalFolder(target.owner, name, {}).write_results(results)
        flat.update({f"eval/{e.name}/baseline/{k}": v for k, v in suite.flat(base_results).items()})
        flat.update({f"eval/{e.name}/{k}": results["paired"][k] for k in ("difference", "p_value")})
    if target.run is not None and (summary or (summary is None and name == e.name)):
        target.run.update_summary(flat)
    print(f"eval {e.name}: {suite.describe(results)}" + (f"\n  {results['paired_text']}" if "paired_text" in results else "")
          + f"\n  results: {EvalFolder(target.owner, name, {}).results}", flush=True)
    return results


def _evaluate(cfg: DictConfig, target: Target, suite, data, name: str, guard: dict, log_dir: Path | None = None,
              loaded=None) -> tuple[dict, list[dict]]:
    """One folder: the questions not yet in its predictions.jsonl, then results.json over all of them. A user error
    while predicting (e.g. an unreachable judge) writes results.json over the rows done (`incomplete`) and is raised."""
    e = cfg.eval
    folder = EvalFolder(target.owner, name, guard)
    with folder.claimed():
        if target.run is not None and log_dir is not None:  # the log goes beside the results, not into a stray directory
            redirect_log_files(Path(log_dir), folder.path)
        done = folder.done()
        todo = [it for it in data.items if it.id not in done]
        print(f"eval {e.name}{' (baseline: the starting model)' if name.endswith('/baseline') else ''}: {len(data.items)} questions; "
              f"{len(data.items) - len(todo)} already in {folder.predictions}; {len(todo)} to go", flush=True)
        counters, speed, stopped = {}, None, None
        if todo:
            try:
                counters, speed = _predict(cfg, target, suite, data, todo, folder, loaded)
            except MedgptError as error:
                stopped = error
        rows_by_id = folder.done()
        rows = [rows_by_id[it.id] for it in data.items if it.id in rows_by_id]
        metrics = suite.metrics(rows, e)
        previous = read_json(folder.results)
        recorded = {**({"target": e.target, "normalize": e.normalize} if e.name == "mcq" else {}), **guard["settings"]}
        results = {"suite": e.name, **metrics,
                   "questions_per_s": speed if speed is not None else previous.get("questions_per_s"),
                   "computed": len(todo), "resumed": len(data.items) - len(todo), **counters, **target.info,
                   **recorded, "folder": name, "settings": guard["settings"], **data.report,
                   "predictions": str(folder.predictions)}
        if stopped is not None:
            results.update(incomplete=f"{len(rows)} of {len(data.items)} questions done: {stopped}",
                           computed=len(rows) - results["resumed"])
        folder.write_results(results)
    if stopped is not None:
        raise stopped
    return results, rows


def _predict(cfg: DictConfig, target: Target, suite, data, todo: list, folder: EvalFolder, loaded=None) -> tuple[dict, float]:
    from tqdm import tqdm

    own = loaded is None
    loaded = load_for_eval(target.cfg or cfg, target) if own else loaded
    total = len(data.items)
    try:
        with folder.appender() as write, tqdm(total=total, initial=total - len(todo), desc=f"eval {cfg.eval.name}", unit="q") as bar:
            started = time.perf_counter()
            counters = suite.predict(loaded, cfg, data, todo, write, bar) or {}
            elapsed = time.perf_counter() - started
    finally:
        if own:
            loaded.engine.close()
    return counters, round(len(todo) / elapsed, 3) if elapsed > 0 else None


def load_for_eval(cfg: DictConfig, target: Target):
    """The model, tokenizer and template as serving loads them (medgpt.serving.loading), on the hf engine with
    static batches of eval.batch_size; loglik scoring uses the engine's model directly."""
    from medgpt.serving.loading import load

    c = copy.deepcopy(cfg)
    with open_dict(c):
        c.run = str(target.run.path) if target.run is not None else None
        c.serve.engine = "hf"
        c.serve.batch_wait_ms = STATIC_BATCH_WAIT_MS
    loaded = load(c, max_batch_size=cfg.eval.batch_size)
    print(loaded.describe("eval"), flush=True)
    return loaded


# --- what is evaluated, and where the results go ---------------------------------------------------------------

_NOT_COMPLETED = {
    "failed": "failed, so there is nothing to evaluate: fix what its summary.json reports and train again",
    "running": "is still running: evaluate it once it has completed",
    "interrupted": "was interrupted: continue it with python launch.py run={path} resume=true, then evaluate it",
    "crashed": "crashed (its process is gone): continue it with python launch.py run={path} resume=true, then evaluate it",
}


def require_completed(path: Path) -> None:
    """One sentence for a run that is not a completed training run."""
    status = RunDir(path).status()
    if status != "completed":
        why = _NOT_COMPLETED.get(status, f"is not a completed training run (status {status}): mode=eval reads a completed one")
        raise ConfigError(f"run {path} {why.format(path=path)}.")


def run_target(trained: Path) -> Target:
    """A Target for the run directory that holds the weights (completed, or finishing: eval.after)."""
    run = RunDir(trained)
    found = run.weights()
    if found is None:
        raise ModelError(f"run {trained} has no merged/, model/ or adapter/ to evaluate; did its training finish?")
    summary = run.read_summary()
    if summary.stage == "rm":
        raise ConfigError(f"run {trained} is a reward model (method=rm): it scores texts and cannot answer questions; "
                          "evaluate a generative run.")
    saved = OmegaConf.load(run.config)
    model = summary.base_model_path or OmegaConf.select(saved, "model.name_or_path")
    info = {"model": str(found[1]) if found[0] != "adapter" else model, "run": str(trained),
            "adapter": str(found[1]) if found[0] == "adapter" else None, "weights": found[0]}
    return Target(run, run, info)


def resolve_target(cfg: DictConfig, log_dir: Path) -> Target:
    if cfg.run:
        path = resolve_run(cfg.run, Path(cfg.paths.output_dir)).resolve()  # run=latest: the newest completed run
        require_completed(path)
        trained = trained_run(path).resolve()  # a pipeline's root directory: its last stage
        if trained != path:
            require_completed(trained)
        return run_target(trained)
    owner = RunDir(log_dir)
    if owner.summary_path.exists():
        raise ConfigError(f"{log_dir} holds a training run: evaluate it with run={log_dir} (hydra.run.dir is for a bare model's results).")
    if owner.config.exists():
        saved = OmegaConf.select(OmegaConf.load(owner.config), "model.name_or_path")
        if saved != cfg.model.name_or_path:
            raise ConfigError(f"{log_dir} holds the evaluation of model {saved}, not {cfg.model.name_or_path}: choose another hydra.run.dir.")
    info = {"model": cfg.model.name_or_path, "run": None, "adapter": None, "weights": "untrained"}
    return Target(owner, None, info, cfg.model.name_or_path)
