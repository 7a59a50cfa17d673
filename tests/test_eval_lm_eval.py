"""Cross-check of eval=mcq with lm-evaluation-harness on the shipped MCQ sample and the tiny model: the same prompts
(medgpt renders them; medgpt/evaluation/lm_eval_tasks/medgpt_mcq.yaml scores them), so lm-eval's per-choice
log-likelihoods, `acc` and `acc_bytes` / `acc_norm` must equal medgpt's loglik, accuracy_sum and accuracy with
eval.normalize=byte. The questions/s of both are printed (a record, not a benchmark: the machine is shared)."""

from __future__ import annotations

import time

import pytest
from conftest import ROOT, read_jsonl
from test_eval import eval_cfg

from medgpt.evaluation.modes import evaluate

pytest.importorskip("lm_eval")
# the chat prompt without its final newline: lm-eval moves a prompt's trailing whitespace into every continuation
# (medgpt.evaluation.lm_eval_tasks explains why that matters for the normalised scores)
ASSISTANT = "<|im_start|>assistant\nAnswer:"


def medgpt_cfg(tmp_path):
    cfg = eval_cfg("template=chatml", "eval.target=text", "eval.normalize=byte", "eval.batch_size=8", "hardware=cpu")  # fp32, as lm-eval runs
    cfg.template.assistant_start = ASSISTANT
    return cfg


@pytest.mark.slow
def test_lm_eval_scores_equal_medgpts(tmp_path, tiny_path, capsys):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from medgpt.evaluation.lm_eval_tasks import TASK, TASK_DIR, export_prompts

    cfg = medgpt_cfg(tmp_path)
    ours = evaluate(cfg, tmp_path / "medgpt")
    rows = {r["id"]: r for r in read_jsonl(ours["predictions"])}
    prompts = read_jsonl(export_prompts(cfg, tmp_path / "prompts.jsonl"))
    assert len(prompts) == len(rows) == 100 and prompts[0]["prompt"].endswith(ASSISTANT)

    started = time.perf_counter()
    model = HFLM(pretrained=str(tiny_path), device="cpu", batch_size=8, dtype="float32")
    out = lm_eval.simple_evaluate(model=model, tasks=[TASK], log_samples=True, num_fewshot=0,
                                  task_manager=TaskManager(include_path=str(TASK_DIR), metadata={"prompts": str(tmp_path / "prompts.jsonl")}))
    theirs_s = time.perf_counter() - started
    samples = out["samples"][TASK]
    assert len(samples) == 100
    for s in samples:
        doc, row = s["doc"], rows[s["doc"]["id"]]
        lls = [float(r[0]) for r in s["filtered_resps"]]
        assert lls == pytest.approx([row["loglik"][k] for k in doc["letters"]], abs=2e-3)  # fp32, other batch shapes
        assert s["acc"] == float(row["predicted_sum"] == row["answer"])
        assert s["acc_bytes"] == float(row["correct"])  # medgpt decided by the per-byte score
    metrics = out["results"][TASK]
    assert metrics["acc,none"] == pytest.approx(ours["accuracy_sum"])
    assert metrics["acc_bytes,none"] == pytest.approx(ours["accuracy"]) == pytest.approx(metrics["acc_norm,none"])  # ASCII text
    with capsys.disabled():
        print(f"\nmcq cross-check on {len(samples)} questions (tiny model, CPU): medgpt {ours['questions_per_s']:.1f} questions/s, "
              f"lm-eval {len(samples) / theirs_s:.1f} questions/s (model load included); acc {metrics['acc,none']:.3f}, "
              f"acc_bytes {metrics['acc_bytes,none']:.3f}")


def test_the_task_definition_reads_medgpts_prompts(tmp_path):
    """Fast: the exported prompts are exactly what eval=mcq renders, and the task YAML names them (no model run)."""
    import yaml

    from medgpt.evaluation import mcq
    from medgpt.evaluation.lm_eval_tasks import TASK_DIR, export_prompts
    from medgpt.evaluation.lm_eval_tasks.utils import load_prompts

    cfg = medgpt_cfg(tmp_path)
    cfg.eval.limit = 3
    rows = read_jsonl(export_prompts(cfg, tmp_path / "p.jsonl"))
    items = mcq.prepare(cfg.eval, ROOT).items
    assert [r["id"] for r in rows] == [it.id for it in items]
    first = items[0]
    assert rows[0]["choices"] == list(first.options.values()) and rows[0]["letters"][rows[0]["gold"]] == first.answer
    assert rows[0]["prompt"] == f"<|im_start|>user\n{mcq.user_turn(first, 'text')}<|im_end|>\n{ASSISTANT}"
    task = yaml.safe_load((TASK_DIR / "medgpt_mcq.yaml").read_text().replace("!function", ""))
    assert (task["doc_to_text"], task["doc_to_choice"], task["doc_to_target"], task["target_delimiter"]) == ("prompt", "choices", "gold", "")
    assert {m["metric"] for m in task["metric_list"]} == {"acc", "acc_norm", "acc_bytes"}
    assert load_prompts(str(tmp_path / "p.jsonl"))["test"]["gold"] == [r["gold"] for r in rows]
