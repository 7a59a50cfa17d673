"""Training methods chained in one run directory (method=pipeline, e.g. experiment=medical_pipeline: PT -> SFT -> DPO).

Each stage in `pipeline.stages` (any declared method: medgpt.stages.protocol) is composed like a
command line of its own — `method=<stage>`, `data=<pipeline.data[stage]>` (a stage without an entry
uses its method's default data), the pipeline's own command-line overrides (model=..., debug=smoke,
hardware=..., ...), then `pipeline.overrides[stage]` — and runs in `<run>/<i>-<stage>/` with the full
run layout, initialised from the previous stage (`model.init_from`: its merged weights and its
template). The last stage's adapter is merged (`pipeline.merge`). The root summary.json lists every
stage's metrics (the common ones and those its method reports), held-out eval loss after each stage included.

`pipeline.eval=[mcq, ...]` (else eval.after) evaluates the starting model and every stage when it has finished
(medgpt.evaluation.after; the starting model as stage 1's eval.baseline): each stage's run directory gets its eval/
folders and eval/<suite>/<metric> keys, the root summary.json the last stage's keys and `eval_stages`, a
stage-by-stage table (each row's paired test against the row before it), printed at the end.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from medgpt import registry
from medgpt.config import validate
from medgpt.errors import ConfigError
from medgpt.evaluation.after import evaluate_run, suites
from medgpt.evaluation.stages import format_stage_table, stage_table
from medgpt.registry import register
from medgpt.stages.protocol import methods
from medgpt.tracking.rundir import RunDir

log = logging.getLogger(__name__)
NOT_PASSED_ON = ("experiment=", "method=", "data=", "pipeline.", "hydra.", "model.init_from=", "+pipeline.", "tag=")
REPORTED = ("eval_loss_before", "eval_loss", "train_loss", "steps", "tokens_seen")  # every stage's row


def stage_overrides(cfg: DictConfig, stage: str, previous: str | None) -> list[str]:
    passed_on = [o for o in HydraConfig.get().overrides.task if not o.lstrip("~+").startswith(NOT_PASSED_ON)]
    data = [f"data={cfg.pipeline.data[stage]}"] if stage in cfg.pipeline.data else []  # else the method's default data
    overrides = [f"method={stage}", *data, *passed_on, *cfg.pipeline.overrides.get(stage, [])]
    return overrides + ([f"model.init_from={previous}"] if previous else [])


def _stage_log(stage_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(RunDir(stage_dir).log_file(0))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


@register("pipeline")
def pipeline(cfg: DictConfig, run_dir: RunDir) -> dict:
    declared = methods()
    unknown = [s for s in cfg.pipeline.stages if s not in declared]
    if unknown or not cfg.pipeline.stages:
        raise ConfigError(f"pipeline.stages={list(cfg.pipeline.stages)}: use a sequence of {', '.join(declared)}.")
    previous, results = cfg.model.init_from, []
    evals = _stage_evals(cfg)
    for i, stage in enumerate(cfg.pipeline.stages, 1):
        overrides = stage_overrides(cfg, stage, previous)
        sub = compose(config_name="config", overrides=overrides)
        validate(sub)
        run = RunDir.claim(Path(run_dir) / f"{i}-{stage}", named_by_user=True)
        log.info("pipeline stage %d/%d: %s -> %s", i, len(cfg.pipeline.stages), stage, run)
        run.write_config(sub)
        run.start(sub, overrides)
        run.begin_summary()
        handler, started = _stage_log(run.path), time.time()
        try:
            summary = registry.get(stage)(sub, run)
        except BaseException as e:
            run.finish("failed", {"wall_time_s": round(time.time() - started, 2)}, error=f"{e}")
            raise
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
            run.release()
        summary = run.finish("completed", {"wall_time_s": round(time.time() - started, 2), **summary})
        keys = REPORTED + declared[stage].reported
        results.append({"stage": stage, "run_dir": str(run), "data": sub.data.name,
                        **{k: summary.get(k) for k in keys if summary.get(k) is not None}})
        if evals is not None:
            evals.append((stage, evaluate_run(sub, run.path, suites(cfg), baseline=i == 1)))
            results[-1].update({k: v for k, v in run.read_summary().extra.items() if k.startswith("eval/")})
        previous = str(run)
    merged = None
    last = RunDir(previous)
    if cfg.pipeline.merge and last.weights() and last.weights()[0] == "adapter":
        from medgpt.stages.merge import merge_run

        merged = str(merge_run(last.path, cfg.merge.dtype, cfg.merge.parity_prompts))
    for r in results:
        log.info("stage %-4s held-out eval loss %s -> %s", r["stage"], _fmt(r.get("eval_loss_before")), _fmt(r.get("eval_loss")))
    table = {}
    if evals:
        table = {"eval_stages": stage_table(evals), **{k: v for k, v in results[-1].items() if k.startswith("eval/")}}
        print(format_stage_table(table["eval_stages"]), flush=True)
    return {"stage": "pipeline", "stages": results, "final_run": previous, "merged": merged,
            "eval_loss": results[-1].get("eval_loss"), "template": last.read_summary().template, **table}


def _stage_evals(cfg: DictConfig) -> list | None:
    """[] when the stages are to be evaluated (pipeline.eval or eval.after), else None."""
    if not suites(cfg):
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        log.warning("pipeline.eval: skipped under %s processes (evaluate the stages with mode=eval run=<stage dir>)",
                    os.environ.get("WORLD_SIZE"))
        return None
    return []


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"
