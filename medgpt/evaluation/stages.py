"""The pipeline's stage-by-stage evaluation table (pipeline.eval): the starting model, then every stage.

Each row holds, per suite, the suite's main metric (mcq: accuracy, generation: ROUGE-L, judge: the mean grade)
under its summary key (eval/<suite>/<metric>) and the paired test against the row before it on the same questions
(medgpt.evaluation.stats.paired: exact McNemar for MCQ, exact sign test otherwise): `eval/<suite>/difference`
and `eval/<suite>/p_value`. The starting model's row is stage 1's eval.baseline; the other rows compare the
predictions.jsonl of two stages.
"""

from __future__ import annotations

from pathlib import Path

from medgpt.evaluation.modes import suite_module
from medgpt.evaluation.stats import paired
from medgpt.tracking.runs import read_jsonl


def _scores(suite, results: dict) -> dict:
    return {r["id"]: suite.per_question(r) for r in read_jsonl(Path(results["predictions"]))}


def stage_table(evals: list[tuple[str, dict[str, dict]]]) -> list[dict]:
    """Rows for [(stage, {suite: results.json}), ...] in pipeline order (the first stage evaluated with its baseline)."""
    rows = []
    first = evals[0][1]
    start = {"stage": "start"}
    for name, res in first.items():
        if "baseline" in res:
            start[f"eval/{name}/{suite_module(name).MAIN}"] = res["baseline"].get(suite_module(name).MAIN)
    rows.append(start)
    previous: dict[str, dict] = {}
    for stage, by_suite in evals:
        row = {"stage": stage}
        for name, res in by_suite.items():
            suite = suite_module(name)
            row[f"eval/{name}/{suite.MAIN}"] = res.get(suite.MAIN)
            if name in previous:
                test = paired(_scores(suite, previous[name]), _scores(suite, res), binary=name == "mcq")
            else:
                test = res.get("paired")
            if test:
                row[f"eval/{name}/difference"], row[f"eval/{name}/p_value"] = test["difference"], test["p_value"]
        previous = by_suite
        rows.append(row)
    return rows


def format_stage_table(rows: list[dict]) -> str:
    """The table as the console shows it: one line per row, each suite's metric with its change and p-value."""
    metrics = [k for k in rows[-1] if k.startswith("eval/") and not k.endswith(("/difference", "/p_value"))]

    def cell(row: dict, key: str) -> str:
        value = row.get(key)
        if not isinstance(value, int | float):
            return "-"
        base = key.rsplit("/", 1)[0]
        diff, p = row.get(f"{base}/difference"), row.get(f"{base}/p_value")
        return f"{value:.3f}" + (f" ({diff:+.3f}, p={p:.3f})" if isinstance(diff, int | float) and isinstance(p, int | float) else "")

    lines = ["pipeline evaluation, stage by stage (change and paired p-value against the row above):",
             "  " + "stage".ljust(8) + "".join(m.ljust(34) for m in metrics)]
    lines += ["  " + str(r["stage"]).ljust(8) + "".join(cell(r, m).ljust(34) for m in metrics) for r in rows]
    return "\n".join(lines)
