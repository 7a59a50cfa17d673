"""eval=judge: verdict parsing, win-rate arithmetic, the suite against a stub OpenAI-compatible server with fixed
replies (every number known), an unreachable judge (one sentence, the rows judged so far kept and resumed), and the
plumbing once against medgpt's own serving app (the tiny model as the judge: its replies are noise, so unparsed)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, compose, read_jsonl, write_jsonl
from test_eval import eval_cfg, fake_run, folder_of

from medgpt.errors import ConfigError
from medgpt.evaluation import after, generation, judge
from medgpt.evaluation.judge_client import JudgeUnavailable, parse_rubric, parse_winner
from medgpt.evaluation.modes import evaluate
from medgpt.serving.engine import Completion
from medgpt.tracking.rundir import read_json

# --- reading verdicts ------------------------------------------------------------------------------------------------


def test_rubric_replies_are_read_not_guessed():
    assert parse_rubric('{"accuracy": 8, "safety": 9, "helpfulness": 7}') == {"accuracy": 8, "safety": 9, "helpfulness": 7}
    assert parse_rubric('Sure! ```json\n{"Accuracy": "6", "SAFETY": 10.0, "helpfulness": 1}\n```') == {
        "accuracy": 6, "safety": 10, "helpfulness": 1}
    assert parse_rubric("Accuracy: 7/10\nSafety = 9\nHelpfulness: 5") == {"accuracy": 7, "safety": 9, "helpfulness": 5}
    for bad in ('{"accuracy": 8, "safety": 9}', '{"accuracy": 11, "safety": 9, "helpfulness": 7}',
                '{"accuracy": 7.5, "safety": 9, "helpfulness": 7}', '{"accuracy": 0, "safety": 9, "helpfulness": 7}',
                "The answer is good.", "", "accuracy: 8, safety: 9", '{"accuracy": true, "safety": 9, "helpfulness": 7}'):
        assert parse_rubric(bad) is None, bad


def test_pairwise_replies_are_read_not_guessed():
    assert parse_winner('{"winner": "1"}') == "1" and parse_winner('{"winner": 2}') == "2"
    assert parse_winner('I think {"winner": "TIE"}') == "tie" and parse_winner("Winner: 2") == "2"
    for bad in ("Answer 1 is better.", '{"winner": "3"}', '{"best": "1"}', ""):
        assert parse_winner(bad) is None, bad


def test_win_rate_counts_ties_as_half_and_shows_position_bias():
    counts = judge.win_counts(["model", "model", "against", "tie", None], ["1", "2", "1", "tie", None])
    assert counts == {"n": 5, "wins": 2, "losses": 1, "ties": 1, "unparsed": 1, "win_rate": 2.5 / 4,
                      "first_position_rate": 2 / 3}
    assert judge.win_counts([None], ["x"])["win_rate"] is None


# --- a stub OpenAI-compatible judge ----------------------------------------------------------------------------------


class StubJudge:
    """GET /v1/models and POST /v1/chat/completions on 127.0.0.1; `reply(prompt) -> str` decides every answer,
    `fail_after` requests are answered before every later one gets HTTP 500."""

    def __init__(self, reply, fail_after: int | None = None, port: int = 0):
        self.reply, self.fail_after, self.prompts = reply, fail_after, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "stub-judge", "object": "model", "created": 0, "owned_by": "test"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with lock:
                    stub.prompts.append(prompt)
                    count = len(stub.prompts)
                if stub.fail_after is not None and count > stub.fail_after:
                    return self._send(500, {"error": {"message": "judge overloaded", "type": "server_error"}})
                self._send(200, {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": stub.reply(prompt)}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def grader(prompt: str) -> str:
    """Rubric: 'good' answers get 8/9/7, 'bad' ones an unreadable reply. Pairwise: the position of the 'good' answer."""
    if "Answer 1:" in prompt:
        first = prompt.split("Answer 1:")[1].split("Answer 2:")[0]
        second = prompt.split("Answer 2:")[1]
        if ("good" in first) == ("good" in second):
            return '{"winner": "tie"}'
        return json.dumps({"winner": "1" if "good" in first else "2"})
    answer = prompt.split("Answer to grade:")[1]
    return '{"accuracy": 8, "safety": 9, "helpfulness": 7}' if "good" in answer else "I would rather not grade this."


QUESTIONS = ["Is 38.5 C a fever?", "Can I take ibuprofen with asthma?", "How long does a cold last?", "Is chest pain urgent?"]
MINE = {q: a for q, a in zip(QUESTIONS, ["good: yes", "bad: no idea", "good: about a week", "good: call 911"])}
THEIRS = {q: a for q, a in zip(QUESTIONS, ["bad: no", "good: ask a doctor", "good: 7-10 days", "bad: wait"])}


def held_out(folder: Path) -> str:
    write_jsonl(folder / "q.jsonl", [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": f"ref {i}"}]}
                                     for i, q in enumerate(QUESTIONS)])
    return f"eval.files=[{folder / 'q.jsonl'}]"


@pytest.fixture
def canned(monkeypatch):
    """Fixed answers: the evaluated model answers MINE, the eval.against run THEIRS (no model is loaded)."""
    def load(cfg, target):
        return SimpleNamespace(name="against" if target.run is not None and target.run.path.name == "run" else "mine",
                               chat_ids=lambda msgs: msgs, engine=SimpleNamespace(close=lambda: None))

    def answers(loaded, prompts, n):
        table = THEIRS if loaded.name == "against" else MINE
        return [Completion(table[p[-1]["content"]], "stop", 5, 3) for p in prompts]

    monkeypatch.setattr("medgpt.evaluation.modes.load_for_eval", load)
    monkeypatch.setattr(generation, "greedy_answers", answers)


def judge_cfg(url: str, *overrides: str):
    return eval_cfg("eval=judge", f"eval.judge.base_url={url}", "eval.judge.retries=0", *overrides)


def test_rubric_and_pairwise_against_a_stub_judge(tmp_path, tiny_path, canned):
    stub = StubJudge(grader)
    against = fake_run(tmp_path, tiny_path)
    try:
        res = evaluate(judge_cfg(stub.url, held_out(tmp_path), f"eval.against={against}", "eval.batch_size=3"), tmp_path / "bare")
    finally:
        stub.close()
    rows = read_jsonl(tmp_path / "bare" / "eval" / folder_of(tmp_path / "bare", "judge") / "predictions.jsonl")
    good = {"accuracy": 8, "safety": 9, "helpfulness": 7}
    assert [r["rubric"] for r in rows] == [good, None, good, good]
    assert rows[1]["rubric_reply"] == "I would rather not grade this."
    assert res["n"] == 4 and res["judged"] == 3 and res["unparsed"] == 1 and res["unparsed_rate"] == 0.25
    assert (res["accuracy"], res["safety"], res["helpfulness"], res["overall"]) == (8, 9, 7, 8)
    assert res["judge_model"] == "stub-judge" and res["settings"]["against"] == str(against.resolve())
    # the order alternates: the evaluated run's answer first on even positions, second on odd ones
    assert [r["model_first"] for r in rows] == [True, False, True, False]
    pair_prompts = [p for p in stub.prompts if "Answer 1:" in p]
    assert len(pair_prompts) == 4 and all(("Answer 1:\n" + MINE[q] in p) == (i % 2 == 0)
                                          for i, q in enumerate(QUESTIONS) for p in pair_prompts if q in p)
    assert [r["winner"] for r in rows] == ["model", "against", "tie", "model"]
    assert res["pairwise"] == {"n": 4, "wins": 2, "losses": 1, "ties": 1, "unparsed": 0, "win_rate": 0.625, "first_position_rate": 2 / 3}
    assert res["win_rate"] == 0.625


def test_a_judge_that_always_prefers_the_first_answer_gives_a_win_rate_of_one_half(tmp_path, tiny_path, canned):
    stub = StubJudge(lambda p: '{"winner": "1"}' if "Answer 1:" in p else "Accuracy: 5\nSafety: 5\nHelpfulness: 5")
    against = fake_run(tmp_path, tiny_path)
    try:
        res = evaluate(judge_cfg(stub.url, held_out(tmp_path), f"eval.against={against}"), tmp_path / "bare")
    finally:
        stub.close()
    assert res["pairwise"]["win_rate"] == 0.5 and res["pairwise"]["first_position_rate"] == 1.0 and res["overall"] == 5


def test_an_unreachable_judge_is_one_sentence_and_keeps_what_was_judged(tmp_path, canned):
    files = held_out(tmp_path)
    out = tmp_path / "bare"
    stub = StubJudge(grader, fail_after=3)  # 3 verdicts, then HTTP 500
    try:
        with pytest.raises(JudgeUnavailable, match=r"^the judge at .* answered HTTP 500 .*judged so far are kept, rerun to continue"):
            evaluate(judge_cfg(stub.url, files, "eval.batch_size=2", "eval.judge.concurrency=1"), out)
    finally:
        stub.close()
    folder = out / "eval" / folder_of(out, "judge")
    assert len(read_jsonl(folder / "predictions.jsonl")) == 3
    partial = read_json(folder / "results.json")
    assert partial["n"] == 3 and partial["incomplete"].startswith("3 of 4 questions done")
    # nobody listening: one sentence, before any answer is generated
    with pytest.raises(JudgeUnavailable, match=r"^the judge at http://127.0.0.1:9/v1 cannot be reached .*eval.judge.base_url"):
        evaluate(judge_cfg("http://127.0.0.1:9/v1", files, "eval.judge.timeout_s=2", "eval.judge.model=null"), out)
    # a rerun (the judge back at the same address) continues with the one question left
    stub = StubJudge(grader, port=stub.server.server_address[1])
    try:
        again = evaluate(judge_cfg(stub.url, files, "eval.batch_size=2"), out)
    finally:
        stub.close()
    assert again["computed"] == 1 and again["resumed"] == 3 and again["n"] == 4 and "incomplete" not in again
    assert len(stub.prompts) == 1


def test_judge_settings_are_checked_and_name_the_folder(tmp_path):
    from medgpt.config import validate

    with pytest.raises(ConfigError, match=r"^eval\.judge\.concurrency=0 is invalid"):
        validate(judge_cfg("http://x/v1", "eval.judge.concurrency=0"))
    with pytest.raises(ConfigError, match=r"^eval\.judge\.temperature=3.0 is invalid"):
        after.check(compose(["model=tiny", f"paths.root={ROOT}", "eval=judge", "eval.after=[judge]", "eval.judge.temperature=3"]))
    with pytest.raises(ConfigError, match=r"^eval\.against=nowhere is not a run directory"):
        evaluate(judge_cfg("http://x/v1", "eval.against=nowhere"), tmp_path / "bare")
    a = judge.settings(judge_cfg("http://a/v1", held_out(tmp_path)).eval, tmp_path)
    b = judge.settings(judge_cfg("http://b/v1", held_out(tmp_path)).eval, tmp_path)
    assert a["judge"]["base_url"] == "http://a/v1" and a != b and a["against"] is None


@pytest.mark.slow
def test_plumbing_against_medgpts_own_serving_app(tmp_path, tiny_path):
    """The tiny model served by medgpt's OpenAI-compatible app is the judge: every request goes through, and its
    replies (noise) are counted as unparsed, never turned into grades."""
    import socket

    import uvicorn

    from medgpt.serving.api import create_app
    from medgpt.serving.loading import load

    served = compose(["mode=serve", "model=tiny", "serve.model_name=tiny-judge"])
    loaded = load(served, max_batch_size=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(loaded, served.generation), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.05)
        res = evaluate(judge_cfg(f"http://127.0.0.1:{port}/v1", held_out(tmp_path), "eval.limit=2", "eval.max_new_tokens=4",
                                 "eval.judge.max_tokens=16"), tmp_path / "bare")
    finally:
        server.should_exit = True
        thread.join(10)
        loaded.engine.close()
    rows = read_jsonl(tmp_path / "bare" / "eval" / folder_of(tmp_path / "bare", "judge") / "predictions.jsonl")
    assert res["judge_model"] == "tiny-judge" and res["n"] == 2 == len(rows)
    assert all(isinstance(r["rubric_reply"], str) and r["rubric_reply"] for r in rows)
    assert res["unparsed"] == sum(r["rubric"] is None for r in rows) and res["judged"] == 2 - res["unparsed"]

