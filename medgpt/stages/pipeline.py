"""PT -> SFT -> DPO in one run directory (method=pipeline, e.g. experiment=medical_pipeline).

Each stage in `pipeline.stages` is composed like a command line of its own — `method=<stage>`,
`data=<pipeline.data[stage]>`, the pipeline's own command-line overrides (model=..., debug=smoke,
hardware=..., ...), then `pipeline.overrides[stage]` — and runs in `<run>/<i>-<stage>/` with the full
run layout, initialised from the previous stage (`model.init_from`: its merged weights and its
template). The last stage's adapter is merged (`pipeline.merge`). The root summary.json lists every
stage's metrics, held-out eval loss after each stage included.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from medgpt import registry
from medgpt.config import validate
from medgpt.errors import ConfigError
from medgpt.registry import register
from medgpt.tracking import rundir

log = logging.getLogger(__name__)
STAGES = ("pt", "sft", "dpo")
NOT_PASSED_ON = ("experiment=", "method=", "data=", "pipeline.", "hydra.", "model.init_from=", "+pipeline.", "tag=")


def stage_overrides(cfg: DictConfig, stage: str, previous: str | None) -> list[str]:
    if stage not in cfg.pipeline.data:
        raise ConfigError(f"pipeline.data has no data for stage {stage}: add pipeline.data.{stage}=<data option>.")
    passed_on = [o for o in HydraConfig.get().overrides.task if not o.lstrip("~+").startswith(NOT_PASSED_ON)]
    overrides = [f"method={stage}", f"data={cfg.pipeline.data[stage]}", *passed_on, *cfg.pipeline.overrides.get(stage, [])]
    return overrides + ([f"model.init_from={previous}"] if previous else [])


def _stage_log(stage_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(stage_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


@register("pipeline")
def pipeline(cfg: DictConfig, run_dir: Path) -> dict:
    unknown = [s for s in cfg.pipeline.stages if s not in STAGES]
    if unknown or not cfg.pipeline.stages:
        raise ConfigError(f"pipeline.stages={list(cfg.pipeline.stages)}: use a sequence of {', '.join(STAGES)}.")
    previous, results = cfg.model.init_from, []
    for i, stage in enumerate(cfg.pipeline.stages, 1):
        stage_dir = run_dir / f"{i}-{stage}"
        overrides = stage_overrides(cfg, stage, previous)
        log.info("pipeline stage %d/%d: %s -> %s", i, len(cfg.pipeline.stages), stage, stage_dir)
        sub = compose(config_name="config", overrides=overrides)
        rundir.init_run_dir(stage_dir, sub, overrides)
        handler, started = _stage_log(stage_dir), time.time()
        try:
            rundir.write_config(stage_dir, sub)
            validate(sub)
            summary = registry.get(stage)(sub, stage_dir)
        except BaseException as e:
            rundir.finish(stage_dir, "failed", {"wall_time_s": round(time.time() - started, 2)}, error=f"{e}")
            raise
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
        summary = rundir.finish(stage_dir, "completed", {"wall_time_s": round(time.time() - started, 2), **summary})
        results.append({"stage": stage, "run_dir": str(stage_dir), "data": sub.data.name,
                        **{k: summary.get(k) for k in ("eval_loss_before", "eval_loss", "train_loss", "steps", "tokens_seen",
                                                        "eval_reward_accuracy_before", "eval_reward_accuracy", "reference")
                           if summary.get(k) is not None}})
        previous = str(stage_dir)
    merged = None
    if cfg.pipeline.merge and (Path(previous) / "adapter").is_dir():
        from medgpt.stages.merge import merge_run

        merged = str(merge_run(Path(previous), cfg.merge.dtype, cfg.merge.parity_prompts))
    for r in results:
        log.info("stage %-4s held-out eval loss %s -> %s", r["stage"], _fmt(r.get("eval_loss_before")), _fmt(r.get("eval_loss")))
    last = results[-1]
    return {"stage": "pipeline", "stages": results, "final_run": previous, "merged": merged,
            "eval_loss": last.get("eval_loss"), "template": rundir.read_summary(Path(previous)).get("template")}


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"
