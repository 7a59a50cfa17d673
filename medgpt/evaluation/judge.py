"""eval=judge: answers to held-out questions graded by an LLM judge (medgpt.evaluation.judge_client).

    python launch.py mode=eval run=latest eval=judge eval.judge.base_url=<endpoint>/v1 [eval.judge.model=<id>]
    python launch.py mode=eval run=latest eval=judge eval.against=<another run>     # + pairwise win rate

Questions and answers: exactly eval=generation's (held-out dialogue files with reference answers; greedy answers of
at most eval.max_new_tokens tokens, in batches of eval.batch_size). Each answer then gets:
  rubric     one request: accuracy, safety, helpfulness, each an integer 1..10 (the judge sees the reference answer)
  pairwise   with eval.against=<run directory>: that run answers the same questions (its own template), and one
             request asks which of the two answers is better. The order alternates question by question (the
             evaluated run's answer first on even positions of the question list, second on odd ones), so a judge
             that prefers a position gains neither run anything; `first_position_rate` shows how much it does.
             win_rate = (wins + ties / 2) / (wins + losses + ties).
Unparseable replies are kept (`rubric_reply`, `pairwise_reply`) and counted (`unparsed`, `pairwise.unparsed`), never
guessed; the means are over the parsed verdicts. A judge that cannot be reached stops the evaluation in one sentence
(JudgeUnavailable); the rows judged before it stay in predictions.jsonl, results.json says `incomplete`, and a rerun
continues with the rest. The judge's endpoint, model and settings are part of the folder's settings (another judge:
another folder).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from medgpt.errors import ConfigError, ModelError
from medgpt.evaluation import generation
from medgpt.evaluation.common import rel
from medgpt.evaluation.judge_client import CRITERIA, JudgeClient
from medgpt.evaluation.stats import mean

PROMPTS_VERSION = 1  # the rubric and pairwise prompts (judge_client): a new version never shares a folder with the old
SUMMARY_METRICS = ("n", *CRITERIA, "overall", "unparsed_rate", "win_rate")
MAIN = "overall"  # the metric a stage-by-stage table shows (per_question() is its per-question score)


@dataclass
class JudgeData(generation.GenerationData):
    against: Path | None = None  # the run the answers are compared with


def against_run(e, root: Path) -> Path | None:
    """eval.against as a completed run directory with weights (a pipeline's root: its last stage), or None."""
    if not e.against:
        return None
    from medgpt.evaluation.modes import require_completed
    from medgpt.tracking.rundir import RunDir, trained_run

    path = Path(str(e.against)).expanduser()
    path = (path if path.is_absolute() else root / path).resolve()
    if not RunDir(path).config.exists():
        raise ConfigError(f"eval.against={e.against} is not a run directory (no config.yaml there): name a finished run.")
    require_completed(path)
    path = trained_run(path).resolve()
    if RunDir(path).weights() is None:
        raise ModelError(f"eval.against={e.against}: run {path} has no merged/, model/ or adapter/ to answer with.")
    return path


def settings(e, root: Path) -> dict:
    j = e.judge  # its values are checked by medgpt.config.validate (mode=eval) and medgpt.evaluation.after.check
    against = against_run(e, root)
    return {**generation.settings(e, root), "judge": {"base_url": j.base_url, "model": j.model, "temperature": j.temperature,
                                                      "max_tokens": j.max_tokens, "prompts": PROMPTS_VERSION},
            "against": rel(against, root) if against else None}


def prepare(e, root: Path) -> JudgeData:
    data = generation.prepare(e, root)
    return JudgeData(data.items, data.files, data.report, against_run(e, root))


def predict(loaded, cfg, data: JudgeData, todo: list, write, bar) -> dict:
    """Answer and judge `todo` batch by batch; a judge that stops answering raises after the batch's judged rows are written."""
    e = cfg.eval
    client = JudgeClient(e.judge)  # model=null asks the endpoint: an unreachable judge stops here, before any answer
    other = _load_against(cfg, data.against) if data.against else None
    position = {q.id: i for i, q in enumerate(data.items)}
    try:
        for start in range(0, len(todo), e.batch_size):
            batch = todo[start:start + e.batch_size]
            mine = generation.answers(loaded, batch, e.max_new_tokens)
            theirs = generation.answers(other, batch, e.max_new_tokens) if other else [None] * len(batch)
            jobs = [(q, a, b, position[q.id] % 2 == 0) for q, a, b in zip(batch, mine, theirs)]
            with ThreadPoolExecutor(max_workers=e.judge.concurrency) as pool:
                futures = [pool.submit(_judge_one, client, *job) for job in jobs]
            rows, stopped = [], None
            for f in futures:
                if f.exception() is None:
                    rows.append(f.result())
                else:
                    stopped = stopped or f.exception()
            write(rows)
            bar.update(len(rows))
            if stopped is not None:
                raise stopped
    finally:
        if other is not None:
            other.engine.close()
    return {"judge_model": client.model}


def _load_against(cfg, path: Path):
    from medgpt.evaluation.modes import Target, load_for_eval
    from medgpt.tracking.rundir import RunDir

    return load_for_eval(cfg, Target(RunDir(path), RunDir(path)))


def _judge_one(client: JudgeClient, q, mine: dict, theirs: dict | None, model_first: bool) -> dict:
    question = q.messages[-1]["content"]
    scores, reply = client.rubric(question, q.reference, mine["answer"])
    row = {"id": q.id, "question": question, "reference": q.reference, **mine, "rubric": scores, "rubric_reply": reply}
    if theirs is not None:
        first, second = (mine, theirs) if model_first else (theirs, mine)
        picked, reply = client.pairwise(question, q.reference, first["answer"], second["answer"])
        winner = None if picked is None else "tie" if picked == "tie" else "model" if (picked == "1") == model_first else "against"
        row.update(against_answer=theirs["answer"], model_first=model_first, picked=picked, winner=winner, pairwise_reply=reply)
    return row


def per_question(row: dict) -> float | None:
    """The paired score of a row (eval.baseline): the mean of its three grades, None when unparsed."""
    return mean(row["rubric"].values()) if row.get("rubric") else None


def metrics(rows: list[dict], e) -> dict:
    n = len(rows)
    graded = [r["rubric"] for r in rows if r.get("rubric")]
    out: dict = {"n": n, "judged": len(graded), "unparsed": n - len(graded), "unparsed_rate": (n - len(graded)) / n if n else None,
                 **{c: mean(g[c] for g in graded) for c in CRITERIA}, "overall": mean(mean(g.values()) for g in graded),
                 "mean_answer_tokens": mean(r["answer_tokens"] for r in rows), "stop_rate": mean(bool(r["stopped"]) for r in rows)}
    pairs = [r for r in rows if "winner" in r]
    if pairs:
        out["pairwise"] = win_counts([r["winner"] for r in pairs], [r["picked"] for r in pairs])
        out["win_rate"] = out["pairwise"]["win_rate"]
    return out


def win_counts(winners: list[str | None], picked: list[str | None]) -> dict:
    """Wins, losses and ties of the evaluated run (winner: model | against | tie | None = unparsed), its win rate with
    ties as half a win, and how often the judge chose the answer shown first when it chose one."""
    wins, losses, ties = winners.count("model"), winners.count("against"), winners.count("tie")
    decided, chose = wins + losses + ties, [p for p in picked if p in ("1", "2")]
    return {"n": len(winners), "wins": wins, "losses": losses, "ties": ties, "unparsed": len(winners) - decided,
            "win_rate": (wins + ties / 2) / decided if decided else None,
            "first_position_rate": chose.count("1") / len(chose) if chose else None}


def flat(m: dict) -> dict:
    return {k: m[k] for k in SUMMARY_METRICS if k in m}


def describe(m: dict) -> str:
    def num(v) -> str:
        return f"{v:.2f}" if isinstance(v, int | float) else "-"

    text = (f"{', '.join(f'{c} {num(m[c])}' for c in CRITERIA)} (1-10) from {m['judged']} of {m['n']} verdicts "
            f"({m['unparsed']} unparsed)")
    if "pairwise" in m:
        p = m["pairwise"]
        text += (f"; win rate {num(p['win_rate'])} against eval.against ({p['wins']} won, {p['losses']} lost, {p['ties']} tied, "
                 f"{p['unparsed']} unparsed)")
    return text
