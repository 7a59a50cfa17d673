"""mode=eval: loglik scoring against the model's own log-softmax, self-consistent results, resume, settings
folders, writing into a finished run, refusals, and the text metrics on hand-computed pairs.

Everything runs in this process on the tiny model (evaluate(cfg, dir) is what launch.py calls), except two
launch.py runs that check the exit status and the one-sentence message a user sees."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, compose, launch, read_jsonl, write_jsonl

from medgpt.errors import ConfigError, DataError
from medgpt.evaluation import generation, mcq
from medgpt.evaluation.folder import folder_name, settings_hash
from medgpt.evaluation.modes import evaluate
from medgpt.evaluation.stats import wilson
from medgpt.evaluation.textmetrics import corpus_bleu, rouge_l, tokenize
from medgpt.tracking.rundir import read_json, write_json

QUESTIONS = [
    ("Which organ makes insulin?", {"A": "Liver", "B": "Pancreas", "C": "Spleen", "D": "Kidney"}, "B", "endocrinology"),
    ("Normal adult resting heart rate?", {"A": "20-40", "B": "60-100", "C": "120-160", "D": "180-220"}, "B", "cardiology"),
    ("Vitamin deficient in scurvy?", {"A": "Vitamin C", "B": "Vitamin D", "C": "Vitamin K"}, "A", "nutrition"),
    ("Bone of the thigh?", {"A": "Tibia", "B": "Humerus", "C": "Femur", "D": "Radius", "E": "Ulna"}, "C", "anatomy"),
    ("Gas exchanged in the alveoli?", {"A": "Oxygen", "B": "Nitrogen", "C": "Helium", "D": "Argon"}, "A", "physiology"),
    ("Cell that carries oxygen?", {"A": "Neutrophil", "B": "Platelet", "C": "Lymphocyte", "D": "Erythrocyte"}, "D", "haematology"),
]


def mcq_file(path: Path, n: int = len(QUESTIONS)) -> Path:
    """MedQA-form questions (what data/eval/mcq/medical_mcq_en.jsonl holds)."""
    rows = [{"question": q, "options": o, "answer_idx": a, "answer": o[a], "subject": s} for q, o, a, s in QUESTIONS[:n]]
    return write_jsonl(path, rows)


def eval_cfg(*overrides: str):
    return compose(["mode=eval", "model=tiny", f"paths.root={ROOT}", *overrides])


def consistent(folder: Path) -> tuple[dict, list[dict]]:
    """results.json and predictions.jsonl, checked against each other the way an outside reader would."""
    res, rows = read_json(folder / "results.json"), read_jsonl(folder / "predictions.jsonl")
    assert res["n"] == len(rows) == len({r["id"] for r in rows})
    assert res["accuracy"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
    for r in rows:
        assert r["predicted"] == max(r["scores"], key=r["scores"].get)
        assert r["correct"] == (r["predicted"] == r["answer"])
    assert res["ci95"] == pytest.approx(wilson(sum(r["correct"] for r in rows), len(rows)))
    return res, rows


# --- statistics and text metrics on hand-computed values ------------------------------------------------------

def test_wilson_interval_known_values():
    assert wilson(50, 100) == pytest.approx([0.4038, 0.5962], abs=1e-4)
    assert wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)  # never below 0, unlike the normal approximation
    assert wilson(10, 10) == pytest.approx([0.7225, 1.0], abs=1e-4)
    assert wilson(0, 0) == [0.0, 1.0]


def test_rouge_and_bleu_on_hand_made_pairs():
    hyp, ref = "The cat sat on the mat today.", "the cat sat on the red mat today"
    # LCS = all 7 answer words of the 8 reference words: P = 1, R = 7/8, F = 2PR/(P+R) = 14/15
    assert rouge_l(hyp, ref) == pytest.approx(14 / 15)
    # n-gram precisions 7/7, 5/6, 3/5, 2/4 -> geometric mean 0.25 ** (1/4); brevity penalty exp(1 - 8/7)
    bleu, tok = corpus_bleu(["the cat sat on the mat today"], [ref])
    assert tok == "13a" and bleu == pytest.approx(100 * 0.25 ** 0.25 * 2.718281828 ** (1 - 8 / 7), abs=1e-3)
    # Chinese by characters: answer 6 characters, all in the 7 of the reference -> F = 12/13
    assert tokenize("发烧要多喝水 OK") == ["发", "烧", "要", "多", "喝", "水", "ok"]
    assert rouge_l("发烧要多喝水", "发烧时要多喝水") == pytest.approx(12 / 13)
    bleu, tok = corpus_bleu(["发烧要多喝水"], ["发烧时要多喝水"])  # precisions 6/6, 4/5, 2/4, 1/3; BP exp(1 - 7/6)
    assert tok == "zh" and bleu == pytest.approx(100 * (0.8 * 0.5 / 3) ** 0.25 * 2.718281828 ** (1 - 7 / 6), abs=1e-3)
    assert rouge_l("", ref) == 0.0


def test_letter_extraction():
    letters = ["A", "B", "C", "D"]
    for text, want in [("B", "B"), ("(C)", "C"), ("C. Femur", "C"), ("Answer: D", "D"), ("The answer is (A).", "A"),
                       ("I think the answer is B because", "B"), ("答案：C", "C"), ("答案是 B", "B"), ("选D", "D"),
                       ("A fever is common.", None), ("The answer is E", None), ("no idea", None), ("", None)]:
        assert mcq.extract_letter(text, letters) == want, text


# --- scoring ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_path)).eval()


def direct_loglik(model, prompt: list[int], cont: list[int]) -> float:
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([prompt + cont])).logits[0].float().log_softmax(-1)
    return sum(float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(cont))


def test_loglik_equals_the_models_own_log_softmax(tiny_model):
    from medgpt.evaluation.loglik import _without_cache, continuation_logliks

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]  # different lengths: left padding must not change anything
    conts = [[[20], [21, 22, 23], [24, 25]], [[30, 31], [32]]]
    got = continuation_logliks(tiny_model, prompts, conts, pad_id=2)
    want = [[direct_loglik(tiny_model, p, c) for c in cs] for p, cs in zip(prompts, conts)]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)
    # the fallback for caches that cannot be indexed gives the same tail sums
    longer = [(0, 1), (0, 2), (1, 0)]
    tails = _without_cache(tiny_model, prompts, conts, longer, 2)
    for (i, j), tail in zip(longer, tails):
        first = direct_loglik(tiny_model, prompts[i], conts[i][j][:1])
        assert first + tail == pytest.approx(want[i][j], abs=1e-4)


def test_mcq_scores_are_the_letter_logprob_after_the_rendered_prompt(tmp_path, tiny_model, tokenizer):
    """Hand-check one question: the prompt rendered with chatml, the letter's log-prob at its last position."""
    # hardware=cpu: the hand check is an fp32 model; hardware=auto is bf16 on a CPU with avx512_bf16 (medgpt.modeling.precision)
    cfg = eval_cfg(f"eval.files=[{mcq_file(tmp_path / 'q.jsonl', 2)}]", "hardware=cpu")
    evaluate(cfg, tmp_path / "bare")
    res, rows = consistent(tmp_path / "bare" / "eval" / folder_of(tmp_path / "bare"))
    item = SimpleNamespace(question=QUESTIONS[0][0], options=QUESTIONS[0][1])
    prompt = ("<|im_start|>user\n" + mcq.user_turn(item, "letter") + "<|im_end|>\n<|im_start|>assistant\n")
    assert mcq.user_turn(item, "letter") == ("Which organ makes insulin?\n\nA. Liver\nB. Pancreas\nC. Spleen\nD. Kidney\n\n"
                                             "Answer with the letter of the correct option.")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for letter in "ABCD":
        want = direct_loglik(tiny_model, ids, tokenizer(letter, add_special_tokens=False)["input_ids"])
        assert rows[0]["scores"][letter] == pytest.approx(want, abs=1e-4)
    assert rows[0]["tokens"] == {"A": 1, "B": 1, "C": 1, "D": 1}


def folder_of(owner: Path, prefix: str = "mcq") -> str:
    found = sorted(p.name for p in (owner / "eval").iterdir() if p.name.split("-")[0] == prefix)
    assert len(found) == 1, found
    return found[0]


def test_bare_model_eval_is_consistent_resumable_and_deterministic(tmp_path, monkeypatch):
    files = f"eval.files=[{mcq_file(tmp_path / 'q.jsonl')}]"
    out = tmp_path / "bare"
    first = evaluate(eval_cfg(files, "eval.batch_size=4"), out)
    folder = out / "eval" / folder_of(out)
    res, rows = consistent(folder)
    assert res["n"] == 6 and res["computed"] == 6 and res["model"] == "tiny" and res["run"] is None
    assert set(res["per_subject"]) == {s for *_, s in QUESTIONS} and res["scoring"] == "loglik" and res["shots"] == 0
    assert (out / "config.yaml").exists() and not (out / "summary.json").exists()  # a bare eval is not a training run
    assert first["questions_per_s"] > 0 and res["accuracy_norm"] == res["accuracy_sum"] == res["accuracy"]  # letters: 1 token each

    # a second run computes nothing: the model is not even loaded
    def no_model(*a, **k):
        raise AssertionError("nothing should be computed")

    with monkeypatch.context() as m:
        m.setattr("medgpt.evaluation.modes.load_for_eval", no_model)
        again = evaluate(eval_cfg(files, "eval.batch_size=4"), out)
    assert again["computed"] == 0 and again["resumed"] == 6 and len(read_jsonl(folder / "predictions.jsonl")) == 6

    # a crash after 3 rows (and half a fourth): the rerun computes the other 3, with the same scores
    lines = (folder / "predictions.jsonl").read_text().splitlines()
    (folder / "predictions.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    resumed = evaluate(eval_cfg(files, "eval.batch_size=4"), out)
    assert resumed["computed"] == 3 and resumed["resumed"] == 3
    after = read_jsonl(folder / "predictions.jsonl")
    assert [r["id"] for r in after] == [r["id"] for r in rows]
    for a, b in zip(after, rows):
        assert a["predicted"] == b["predicted"] and a["scores"] == pytest.approx(b["scores"], abs=1e-4)


def test_settings_name_the_folder(tmp_path):
    defaults = {"files": ["a.jsonl"], "scoring": "loglik"}
    assert folder_name("mcq", dict(defaults), defaults) == "mcq"
    changed = {**defaults, "files": ["b.jsonl"]}
    assert folder_name("mcq", changed, defaults) == f"mcq-{settings_hash(changed)}" != folder_name("mcq", {**defaults, "shots": 1}, defaults)
    assert len(settings_hash(changed)) == 8
    files = f"eval.files=[{mcq_file(tmp_path / 'q.jsonl', 3)}]"
    out = tmp_path / "bare"
    evaluate(eval_cfg(files), out)
    evaluate(eval_cfg(files, "eval.normalize=token", "eval.target=text"), out)
    names = sorted(p.name for p in (out / "eval").iterdir())
    assert len(names) == 2 and all(n.startswith("mcq-") for n in names)
    text = next(n for n in names if read_json(out / "eval" / n / "results.json")["target"] == "text")
    res, rows = consistent(out / "eval" / text)
    assert res["normalize"] == "token" and res["settings"]["target"] == "text"
    for r in rows:  # the deciding score is the sum per token, and the sums are kept beside it
        assert r["scores"] == pytest.approx({k: r["loglik"][k] / r["tokens"][k] for k in r["scores"]})


def test_shots_are_earlier_turns():
    item = SimpleNamespace(question="Q?", options={"A": "x", "B": "y"}, answer="B")
    shot = SimpleNamespace(question="Solved?", options={"A": "yes", "B": "no"}, answer="A")
    msgs = mcq.messages(item, [shot], "text")
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == "yes" and msgs[0]["content"].startswith("Solved?\n\nA. yes\nB. no")
    assert mcq.messages(item, [shot], "letter")[1]["content"] == "A"
    zh = SimpleNamespace(question="发热的定义？", options={"A": "x", "B": "y"})
    assert mcq.user_turn(zh, "letter").endswith("请直接回答正确选项的字母。")


# --- a finished run ----------------------------------------------------------------------------------------------

def fake_run(root: Path, tiny_path: Path, status: str = "completed") -> Path:
    """A run directory as training leaves it, with the tiny model's weights as its model/ (no training needed)."""
    from omegaconf import OmegaConf

    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(compose(["model=tiny", f"paths.root={ROOT}"]), resolve=True))
    write_json(run / "summary.json", {"status": status, "version": 2, "train_loss": 1.5, "template": "chatml"})
    if status == "completed":
        shutil.copytree(tiny_path, run / "model")
    return run


def test_eval_of_a_finished_run_writes_only_its_eval_folder_and_summary_keys(tmp_path, tiny_path):
    run = fake_run(tmp_path, tiny_path)
    config_before = (run / "config.yaml").read_text()
    res = evaluate(eval_cfg(f"run={run}"), tmp_path / "log")  # the default settings: the shipped 100 questions
    assert (run / "eval" / "mcq" / "results.json").exists()
    res, rows = consistent(run / "eval" / "mcq")
    assert res["run"] == str(run.resolve()) and res["weights"] == "model" and res["n"] == 100
    assert res["files"] == ["data/eval/mcq/medical_mcq_en.jsonl"] and res["format"] == {"data/eval/mcq/medical_mcq_en.jsonl": "medqa"}
    summary = read_json(run / "summary.json")
    assert summary["eval/mcq/accuracy"] == res["accuracy"] and summary["eval/mcq/ci95_lo"] == res["ci95"][0]
    assert summary["eval/mcq/n"] == 100 and summary["train_loss"] == 1.5 and summary["status"] == "completed"
    assert (run / "config.yaml").read_text() == config_before
    assert sorted(p.name for p in run.iterdir()) == [".update.lock", "config.yaml", "eval", "model", "summary.json"]
    # other settings: their own folder, and summary.json keeps the default folder's numbers
    other = evaluate(eval_cfg(f"run={run}", "eval.limit=5"), tmp_path / "log")
    assert other["n"] == 5 and other["folder"].startswith("mcq-")
    assert read_json(run / "summary.json")["eval/mcq/n"] == 100


def test_command_line_eval_of_a_run_leaves_no_stray_directory(tmp_path, tiny_path):
    run = fake_run(tmp_path, tiny_path)
    res = launch("mode=eval", f"run={run}", "eval.limit=2", f"hydra.run.dir={tmp_path / 'log'}")
    assert res.returncode == 0, res.stderr[-2000:]
    folder = run / "eval" / folder_of(run)
    assert "accuracy" in res.stdout and f"results: {folder / 'results.json'}" in res.stdout
    assert (folder / "train.log").exists() and not (tmp_path / "log").exists()  # the log went beside the results
    assert "eval/mcq/accuracy" not in read_json(run / "summary.json")  # eval.limit is not the default suite


def test_a_folder_never_mixes_data_or_models(tmp_path, monkeypatch):
    q = mcq_file(tmp_path / "q.jsonl", 2)
    out = tmp_path / "bare"
    evaluate(eval_cfg(f"eval.files=[{q}]"), out)
    mcq_file(q, 3)  # the same file, now with another question
    with pytest.raises(ConfigError, match="holds predictions for different data files .*move that folder away"):
        evaluate(eval_cfg(f"eval.files=[{q}]"), out)
    with pytest.raises(ConfigError, match="holds the evaluation of model tiny, not smollm2-135m"):
        evaluate(compose(["mode=eval", "model=smollm2-135m", f"paths.root={ROOT}", f"eval.files=[{q}]"]), out)


@pytest.mark.parametrize("status,words", [("failed", "failed, so there is nothing to evaluate"), ("running", "is still running"),
                                          ("interrupted", "was interrupted: continue it with .*resume=true")])
def test_unfinished_runs_are_refused(tmp_path, tiny_path, status, words):
    run = fake_run(tmp_path, tiny_path, status)
    with pytest.raises(ConfigError, match=f"^run {re.escape(str(run))} {words}"):
        evaluate(eval_cfg(f"run={run}"), tmp_path / "log")
    assert not (run / "eval").exists()


def test_bad_input_is_one_sentence(tmp_path, tiny_path):
    with pytest.raises(ConfigError, match=r"^eval.files: .*missing.jsonl does not exist"):
        evaluate(eval_cfg("eval.files=[missing.jsonl]"), tmp_path / "a")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "Z"}])
    with pytest.raises(DataError, match="bad.jsonl:1: answer 'Z'"):
        evaluate(eval_cfg(f"eval.files=[{bad}]"), tmp_path / "b")
    with pytest.raises(ConfigError, match="eval.shots=9"):
        evaluate(eval_cfg(f"eval.files=[{mcq_file(tmp_path / 'q.jsonl')}]", "eval.shots=9"), tmp_path / "c")
    assert not (tmp_path / "a" / "eval").exists()
    # as users see it: exit 1, one line, no traceback, no directory left behind
    run = fake_run(tmp_path / "f", tiny_path, "failed")
    res = launch("mode=eval", f"run={run}", f"hydra.run.dir={tmp_path / 'log'}")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: run {run} failed, so there is nothing to evaluate")
    assert not (tmp_path / "log").exists()


# --- eval=generation -------------------------------------------------------------------------------------------

def dialogues(folder: Path) -> str:
    """Two held-out files in two formats (each file's format is told on its own); the last answer is the reference."""
    write_jsonl(folder / "d1.jsonl", [
        {"conversations": [{"from": "human", "value": "Is 38.5 C a fever?"}, {"from": "gpt", "value": "yes it is a fever"}]}])
    write_jsonl(folder / "d2.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "发烧怎么办？"}, {"role": "assistant", "content": "发烧时要多喝水"}]}])
    return f"eval.files=[{folder / 'd1.jsonl'},{folder / 'd2.jsonl'}]"


def test_generation_metrics_from_known_answers(tmp_path, monkeypatch):
    """The engine's answers are fixed here, so every number is known: ROUGE-L, BLEU, answer tokens, stop rate."""
    from medgpt.serving.engine import Completion

    canned = {"Is 38.5 C a fever?": Completion("yes it is a fever", "stop", 10, 6),  # 5 tokens + the stop token
              "发烧怎么办？": Completion("发烧要多喝水", "length", 12, 8)}
    loaded = SimpleNamespace(chat_ids=lambda msgs: msgs, engine=SimpleNamespace(close=lambda: None))
    monkeypatch.setattr("medgpt.evaluation.modes.load_for_eval", lambda cfg, target: loaded)
    monkeypatch.setattr(generation, "greedy_answers", lambda ld, prompts, n: [canned[p[-1]["content"]] for p in prompts])
    res = evaluate(eval_cfg("eval=generation", dialogues(tmp_path)), tmp_path / "bare")
    folder = tmp_path / "bare" / "eval" / folder_of(tmp_path / "bare", "generation")
    rows = read_jsonl(folder / "predictions.jsonl")
    assert [r["stopped"] for r in rows] == [True, False] and [r["answer_tokens"] for r in rows] == [5, 8]
    assert rows[0]["rougeL"] == 1.0 and rows[1]["rougeL"] == pytest.approx(12 / 13)
    assert rows[1]["question"] == "发烧怎么办？" and rows[1]["reference"] == "发烧时要多喝水" and rows[1]["id"].endswith("d2.jsonl:1")
    assert res["stop_rate"] == 0.5 and res["mean_answer_tokens"] == 6.5 and res["n"] == 2
    assert res["rougeL"] == pytest.approx((1 + 12 / 13) / 2) and res["bleu_tokenize"] == "zh"
    assert res["bleu"] == pytest.approx(corpus_bleu([r["answer"] for r in rows], [r["reference"] for r in rows])[0])
    assert read_json(folder / "results.json")["rougeL"] == res["rougeL"]
    assert set(res["format"].values()) == {"sharegpt", "messages"}


def test_generation_on_the_tiny_model(tmp_path):
    res = evaluate(eval_cfg("eval=generation", dialogues(tmp_path), "eval.max_new_tokens=4"),
                   tmp_path / "bare")
    rows = read_jsonl(tmp_path / "bare" / "eval" / folder_of(tmp_path / "bare", "generation") / "predictions.jsonl")
    assert len(rows) == res["n"] == 2 and all(0 <= r["answer_tokens"] <= 4 for r in rows)
    assert res["stop_rate"] == sum(r["stopped"] for r in rows) / 2
    assert json.dumps(res)  # results are plain JSON


def test_eval_group_composes_and_is_checked_only_in_mode_eval():
    from medgpt.config import validate

    assert compose(["mode=eval", "eval=generation"]).eval.files == ["data/eval/medical_eval_en.jsonl"]
    assert compose([]).eval.name == "mcq"  # training carries the node, untouched
    validate(compose(["eval.batch_size=0"]))  # training does not read it
    with pytest.raises(ConfigError, match=r"^eval\.batch_size=0 is invalid"):
        validate(compose(["mode=eval", "eval.batch_size=0"]))
    with pytest.raises(ConfigError, match=r"^eval\.normalize='mean' is not one of none, token, byte"):
        validate(compose(["mode=eval", "eval.normalize=mean"]))
