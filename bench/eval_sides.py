"""Evaluation sides of `make bench`: medgpt's `mode=eval eval=mcq` and lm-evaluation-harness on the same prompts.

The same questions (the shipped sample, data/eval/mcq/medical_mcq_en.jsonl, the first `limit`), the same model
folder, fp32, batch 8. medgpt: `medgpt.evaluation.modes.evaluate` (what `launch.py mode=eval eval=mcq` runs) into a
fresh folder each repetition. lm-eval: the task medgpt/evaluation/lm_eval_tasks/medgpt_mcq.yaml scoring the prompts
eval=mcq renders (exported once, before timing), `lm_eval.simple_evaluate` on an `HFLM` of the same folder. Each
repetition is timed whole, model load included on both sides (a user's run loads it too); value = questions/s.
Writes: temporary folders only.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.harness import scratch  # noqa: E402


def _cfg(model: str, limit: int):
    from bench.train_sides import compose

    return compose(["mode=eval", f"model={model}", "eval=mcq", f"eval.limit={limit}", "eval.batch_size=8", "hardware=cpu"])


def medgpt_eval(model: str, limit: int):
    from medgpt.evaluation.modes import evaluate

    cfg = _cfg(model, limit)

    def measure() -> dict:
        started = time.perf_counter()
        res = evaluate(cfg, Path(scratch("medgpt-bench-eval-")))
        seconds = time.perf_counter() - started
        return {"value": res["n"] / seconds, "questions": res["n"], "seconds": round(seconds, 3), "accuracy": res["accuracy"]}

    return measure


def lm_eval_harness(model: str, limit: int):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from medgpt.evaluation.lm_eval_tasks import TASK, TASK_DIR, export_prompts
    from medgpt.modeling.loader import resolve_model_path

    cfg = _cfg(model, limit)
    folder = resolve_model_path(cfg.model.name_or_path, cfg.paths.cache_dir, cfg.model.revision)
    prompts = export_prompts(cfg, Path(scratch("lm-eval-bench-")) / "prompts.jsonl")

    def measure() -> dict:
        started = time.perf_counter()
        lm = HFLM(pretrained=folder, device="cpu", batch_size=8, dtype="float32")
        out = lm_eval.simple_evaluate(model=lm, tasks=[TASK], num_fewshot=0,
                                      task_manager=TaskManager(include_path=str(TASK_DIR), metadata={"prompts": str(prompts)}))
        seconds = time.perf_counter() - started
        n = out["n-samples"][TASK]["effective"] if "n-samples" in out else limit
        return {"value": n / seconds, "questions": n, "seconds": round(seconds, 3), "accuracy": out["results"][TASK]["acc,none"]}

    return measure
