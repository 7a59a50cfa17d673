"""eval.baseline=true: a run's starting model evaluated beside it, and a paired test of the difference.

    python launch.py mode=eval run=latest eval=mcq eval.baseline=true
    -> <run>/eval/mcq/baseline/{results,predictions}.json[l]   the starting model's own folder (resumable like any other)
    -> <run>/eval/mcq/results.json gains `baseline` (its metrics) and `paired` (the test)

The starting model is what training started from, without what it learnt: the folder summary.json records as
`base_model_path` (the pretrained model, or the previous stage's merged weights in a pipeline; an adapter's base),
loaded with the run's own model settings and chat template, so the two evaluations differ only by the weights.

Paired over the same questions (medgpt.evaluation.stats.paired): MCQ by the exact McNemar test on the questions that
changed (right -> wrong, wrong -> right); generation (ROUGE-L) and judge (mean grade) by the exact sign test on the
questions that got worse or better. `difference` = after - before (accuracy points, ROUGE-L, grade).
"""

from __future__ import annotations

import copy

from omegaconf import DictConfig, OmegaConf, open_dict

from medgpt.errors import ModelError
from medgpt.evaluation.stats import paired
from medgpt.tracking.rundir import RunDir


def starting_model(run: RunDir) -> str:
    """The folder (or name) the run started from, as training recorded it."""
    path = run.base_model_path() or run.read_summary().root_model_path
    if not path:
        saved = OmegaConf.load(run.config)
        path = OmegaConf.select(saved, "model.init_from") or OmegaConf.select(saved, "model.name_or_path")
    if not path:
        raise ModelError(f"run {run.path} does not record its starting model (no base_model_path in summary.json).")
    return str(path)


def baseline_target(cfg: DictConfig, target):
    """A Target for the starting model of `target.run`: results under the run's eval/, the run's summary untouched."""
    from medgpt.evaluation.modes import Target

    run = target.run
    start = starting_model(run)
    saved = OmegaConf.load(run.config)
    c = copy.deepcopy(cfg)
    _copy_known(saved.model, c.model)
    with open_dict(c):
        c.model.name_or_path, c.model.init_from = start, None
    if cfg.template.name == "auto" and "template" in saved:  # the run's own template, as serving reads the run
        _copy_known(saved.template, c.template)
    info = {"model": start, "run": str(run.path), "adapter": None, "weights": "baseline"}
    return Target(run, None, info, model_key=start, cfg=c)


def _copy_known(saved: DictConfig, node: DictConfig) -> None:
    """The saved values of the keys this version's schema knows (a run saved by an older medgpt may lack some)."""
    with open_dict(node):
        for key in node:
            if key in saved:
                node[key] = saved[key]


def compare_rows(suite, before: dict, before_rows: list[dict], after_rows: list[dict]) -> dict:
    """What results.json gains: the baseline's metrics, the paired test, and one line for the console."""
    binary = suite.__name__.endswith(".mcq")
    test = paired({r["id"]: suite.per_question(r) for r in before_rows}, {r["id"]: suite.per_question(r) for r in after_rows}, binary)
    name = "McNemar" if binary else "sign test"
    diff = test["difference"]
    text = (f"starting model {test['before']:.3f} -> this run {test['after']:.3f} ({diff:+.3f}) on {test['n']} paired questions; "
            f"exact {name} p = {test['p_value']:.4f} ({test['better']} better, {test['worse']} worse)") if test["n"] else \
        "no question was scored by both the starting model and this run"
    return {"baseline": {k: before.get(k) for k in ("model", "weights", "folder", *suite.SUMMARY_METRICS) if k in before},
            "paired": test, "paired_text": text}
