"""mode=chat through stdin (history across turns, /reset, /system) and mode=predict (formats, resume) on a finished tiny run."""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace

import pytest
from conftest import launch, read_jsonl, write_jsonl
from test_serving_support import tiny_run

IM = "<|im_start|>{role}\n{content}<|im_end|>\n"


def shown_prompts(stdout: str) -> list[str]:
    """The prompts printed by /show (each starts with a chatml turn and ends with the generation prompt)."""
    return [chunk.split("<|im_start|>assistant\n\nyou> ")[0] + "<|im_start|>assistant\n"
            for chunk in stdout.split("you> <|im_start|>")[1:] if chunk.strip()]


def test_chat_keeps_history_and_obeys_commands(tmp_path):
    lines = ["What is a fever?", "And a high one?", "/show", "/reset", "Third question", "/show", "/system Be brief.", "Fourth", "/show"]
    res = launch("mode=chat", f"run={tiny_run()}", "generation.max_new_tokens=5", "generation.temperature=0",
                       f"hydra.run.dir={tmp_path}", input="\n".join(lines) + "\n")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert f"run directory  {tiny_run()}" in out and "template       chatml" in out
    answers = [a.split("\nyou> ")[0] for a in out.split("assistant> ")[1:]]
    assert len(answers) == 4 and out.rstrip().endswith("bye")  # the input ended (Ctrl-D): a clean goodbye
    assert "Traceback" not in res.stderr
    second, third, fourth = ("<|im_start|>" + p for p in shown_prompts(out))
    # turn 2 carries turn 1 (question AND answer) before the new question
    first_answer = answers[0].strip()
    assert second == (IM.format(role="user", content="What is a fever?") + IM.format(role="assistant", content=first_answer)
                      + IM.format(role="user", content="And a high one?") + "<|im_start|>assistant\n")
    assert third == IM.format(role="user", content="Third question") + "<|im_start|>assistant\n"  # /reset forgot turns 1-2
    assert fourth == (IM.format(role="system", content="Be brief.") + IM.format(role="user", content="Fourth")
                      + "<|im_start|>assistant\n")


def test_chat_commands_without_a_model():
    from medgpt.serving.chat import ChatSession

    out = io.StringIO()
    chat = ChatSession(loaded=None, generation=None, out=out)  # commands never touch the model
    chat.history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert chat.command("/system You are careful.") and chat.system == "You are careful." and chat.history == []
    assert chat.command("/show") and "(nothing sent yet)" in out.getvalue()
    assert chat.command("/bogus") and "unknown command /bogus" in out.getvalue()
    assert chat.command("/system") and chat.system is None
    assert chat.command("/exit") is False


def predict(tmp_path, inp, out, *extra):
    return launch("mode=predict", f"run={tiny_run()}", f"predict.input={inp}", f"predict.output={out}", "predict.batch_size=3",
                  "generation.max_new_tokens=6", "generation.temperature=0", f"hydra.run.dir={tmp_path / 'log'}", *extra, timeout=240)


def test_predict_reads_every_format_and_resumes_without_duplicates(tmp_path):
    rows = [
        {"prompt": "What is a fever?", "id": "a"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is 38 C a fever?"}]},
        {"conversations": [{"from": "human", "value": "Headache?"}, {"from": "gpt", "value": "Rest and drink water."}]},
        {"prompt": "Cough for a week?"},
        {"prompt": "Sore throat?"},
    ]
    inp, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    res = predict(tmp_path, inp, out)
    assert res.returncode == 0, res.stderr[-3000:]
    first = read_jsonl(out)
    assert [r["line"] for r in first] == [1, 2, 3, 4, 5]
    assert first[0]["id"] == "a" and first[0]["prompt"] == "What is a fever?" and "messages" not in first[0]
    assert first[1]["messages"][0] == {"role": "system", "content": "Be brief."} and first[1]["prompt"] == "Is 38 C a fever?"
    assert first[2]["reference"] == "Rest and drink water." and first[2]["prompt"] == "Headache?"
    for r in first:
        assert r["finish_reason"] in ("stop", "length") and r["prompt_tokens"] > 0 and 1 <= r["completion_tokens"] <= 6
        assert r["completion_tokens"] == 6 if r["finish_reason"] == "length" else True
    assert "predict: 5 prompts" in res.stdout and "0 already answered" in res.stdout

    # a crash after two rows, with half a third row written: the rerun keeps those two and answers the rest once
    out.write_text("".join(json.dumps(r) + "\n" for r in first[:2]) + '{"line": 3, "prompt": "Head')
    res = predict(tmp_path, inp, out)
    assert res.returncode == 0, res.stderr[-3000:]
    again = read_jsonl(out)
    assert [r["line"] for r in again] == [1, 2, 3, 4, 5] and again[:2] == first[:2]
    assert [r["output"] for r in again] == [r["output"] for r in first]  # greedy: the same answers
    assert "2 already answered" in res.stdout and "3 to go" in res.stdout



def test_predict_reads_txt_one_prompt_per_line(tmp_path):
    from medgpt.serving.predict import read_inputs

    inp = tmp_path / "in.txt"
    inp.write_text("What is a fever?\n\nIs 38 C a fever?\n")
    assert [(i["line"], i["messages"]) for i in read_inputs(inp)] == [(1, [{"role": "user", "content": "What is a fever?"}]),
                                                                     (3, [{"role": "user", "content": "Is 38 C a fever?"}])]


def test_predict_input_errors_name_the_file_and_line(tmp_path):
    from medgpt.errors import ConfigError, DataError
    from medgpt.serving.predict import check_paths, read_inputs

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"question": "no known field"}])
    with pytest.raises(DataError, match=f"{re.escape(str(bad))}:2: expected an object with 'prompt'"):
        read_inputs(bad)
    ends = write_jsonl(tmp_path / "ends.jsonl", [{"messages": [{"role": "system", "content": "s"}]}])
    with pytest.raises(DataError, match="ends.jsonl:1: the conversation must end with a user turn"):
        read_inputs(ends)
    for inp, out, message in [(None, None, "needs predict.input"), (tmp_path / "missing.txt", None, "does not exist"),
                              (bad, tmp_path / "out.csv", "must be a .jsonl"), (bad, bad, "must differ")]:
        with pytest.raises(ConfigError, match=message):
            check_paths(SimpleNamespace(input=str(inp) if inp else None, output=str(out) if out else None))
    assert check_paths(SimpleNamespace(input=str(bad), output=None))[1] == tmp_path / "bad.predictions.jsonl"
