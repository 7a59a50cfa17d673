"""Reward modelling (method=rm): the pairwise loss by hand, pair data with margins, a smoke run, a learning signal,
the scoring endpoint (POST /v1/rewards) and score_texts, and dialogue data refused by the declaration."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose, launch, read_jsonl, write_jsonl

from medgpt.data.formats import load_records
from medgpt.errors import DataError

SUMMARY_FIELDS = ("margin", "center_rewards_coefficient", "eval_accuracy_before", "eval_accuracy_after", "eval_margin_before", "eval_margin")
HELD_OUT = ROOT / "data/eval/medical_dpo_eval_en.jsonl"  # dpo_demo's eval file: the default held-out pairs of method=rm
KEY = "rm-key"


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


# --- (1) the loss against a hand computation ---------------------------------------------------------------------------

RC, RR = [1.5, -0.2, 0.3], [0.5, 0.4, 0.3]  # rewards of three pairs: chosen ahead, behind, tied


@pytest.mark.parametrize("margin,center", [(0.0, 0.0), (0.7, 0.0), ([0.0, 1.0, 2.5], 0.0), (0.0, 0.01), (0.7, 0.5)])
def test_loss_matches_the_hand_computation(margin, center):
    from medgpt.stages.reward import reward_loss

    margins = margin if isinstance(margin, list) else [margin] * len(RC)
    pairwise = [-log_sigmoid(c - r - m) for c, r, m in zip(RC, RR, margins)]
    centering = center * sum((c + r) ** 2 for c, r in zip(RC, RR)) / len(RC)
    expected = sum(pairwise) / len(pairwise) + centering
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    loss, metrics = reward_loss(t(RC), t(RR), t(margin) if isinstance(margin, list) else margin, center)
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    assert metrics["rewards/margins"].tolist() == pytest.approx([c - r for c, r in zip(RC, RR)])
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.0, 0.5]  # a tie counts half


def test_loss_gradient_pushes_chosen_up_and_rejected_down():
    from medgpt.stages.reward import reward_loss

    chosen, rejected = torch.tensor([0.0, 0.0], requires_grad=True), torch.tensor([0.0, 0.0], requires_grad=True)
    loss, _ = reward_loss(chosen, rejected, torch.tensor([0.0, 1.0]))
    loss.backward()
    # d/dr_c of −log σ(r_c − r_r − m) = −σ(−(r_c − r_r − m)), averaged over 2 pairs
    assert chosen.grad.tolist() == pytest.approx([-0.5 / 2, -(1 / (1 + math.exp(-1))) / 2])
    assert rejected.grad.tolist() == pytest.approx([-g for g in chosen.grad.tolist()])


def test_collator_stacks_pairs_and_fills_missing_margins():
    from medgpt.stages.reward import RewardCollator

    rows = [{"chosen_input_ids": [5, 6, 7], "chosen_labels": [-100, 6, 7], "rejected_input_ids": [5, 8], "rejected_labels": [-100, 8],
             "margin": 2.0},
            {"chosen_input_ids": [9], "chosen_labels": [9], "rejected_input_ids": [9, 10, 11, 12], "rejected_labels": [9, 10, 11, 12],
             "margin": math.nan}]
    batch = RewardCollator(pad_token_id=0, default_margin=0.25)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "margin"}  # no token labels reach the classifier
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [5, 8, 0, 0], [9, 10, 11, 12]]  # [chosen; rejected]
    assert batch["attention_mask"].sum(-1).tolist() == [3, 1, 2, 4]
    assert batch["margin"].tolist() == [2.0, 0.25]


# --- pair data: both preference forms, per-pair margins ----------------------------------------------------------------

def test_pairs_in_both_forms_with_their_own_margins(tmp_path, tokenizer):
    from medgpt.data.dpo_data import encode_pairs
    from medgpt.data.templates import load_template
    from medgpt.stages.methods.rm import pair_margins

    nested = {"conversations": [{"from": "human", "value": "Is 38.5 C a fever?"}], "chosen": {"from": "gpt", "value": "Yes; rest."},
              "rejected": {"from": "gpt", "value": "No."}, "margin": 1.5}
    flat = {"system": "", "history": [["Hi", "Hello."]], "question": "Cold or flu?", "response_chosen": "Likely a cold.",
            "response_rejected": "Flu."}
    same = {"conversations": [{"from": "human", "value": "Q?"}], "chosen": "same", "rejected": "same", "margin": 9}
    path = write_jsonl(tmp_path / "pairs.jsonl", [nested, flat, same])
    records, _, fmt = load_records([path])
    assert fmt == "preference" and len(records) == 3
    dataset, stats = encode_pairs(records, load_template("chatml"), tokenizer, 128, 64)
    margins = pair_margins(records)
    assert len(dataset) == len(margins) == 2 and stats["identical_pairs"] == 1  # the identical pair is dropped from both
    assert margins[0] == 1.5 and math.isnan(margins[1])  # the flat record has none: method.margin applies
    assert len(records[1].messages) == 3  # the flat form's history is prompt turns

    bad = write_jsonl(tmp_path / "bad.jsonl", [{**nested, "margin": "big"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: field 'margin' must be a number"):
        load_records([bad])  # read with the record, from any source format


# --- (5) dialogue data is refused by the declaration --------------------------------------------------------------------

def test_rm_on_dialogue_data_is_refused_in_one_sentence():
    from medgpt.stages.lifecycle import check_data_format
    from medgpt.stages.protocol import methods

    cfg = compose(["method=rm", "data=medical_demo", "model=tiny", f"paths.root={ROOT}"])
    with pytest.raises(DataError) as err:
        check_data_format(cfg, methods()["rm"])
    message = str(err.value)
    assert "holds sharegpt data, but method=rm needs preference data; use method=sft" in message
    assert message.count(". ") == 0 and "\n" not in message  # one sentence


# --- (2) a smoke run, shared by the serving tests -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke_run():
    root = Path(tempfile.mkdtemp(prefix="medgpt-rm-"))
    res = launch("model=tiny", "method=rm", "debug=smoke", f"hydra.run.dir={root / 'rm-smoke'}")
    assert res.returncode == 0, res.stderr[-3000:]
    yield root / "rm-smoke"
    shutil.rmtree(root, ignore_errors=True)


def test_smoke_run_completes_with_the_rm_summary(smoke_run):
    s = json.loads((smoke_run / "summary.json").read_text())
    assert s["status"] == "completed" and s["stage"] == "rm" and s["steps"] == 8 and s["artefact"] == "adapter"
    assert set(SUMMARY_FIELDS) <= set(s) and s["margin"] == 0.0 and s["center_rewards_coefficient"] == 0.0
    for key in ("eval_accuracy_before", "eval_accuracy_after"):
        assert 0.0 <= s[key] <= 1.0
    assert s["eval_loss_before"] > 0 and s["eval_perplexity"] is None  # a pairwise loss has no perplexity
    rows = read_jsonl(smoke_run / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert len(train) == 8 and all({"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(r) for r in train)
    assert "eval_rewards/accuracies" in rows[-1]
    adapter = json.loads((smoke_run / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]  # the head is saved whole
    from safetensors import safe_open

    with safe_open(str(smoke_run / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(k.endswith("score.weight") for k in f.keys())


# --- (4) the scoring endpoint and score_texts ---------------------------------------------------------------------------

CONV = [{"role": "user", "content": "Should I take antibiotics for a cold?"},
        {"role": "assistant", "content": "No: colds are caused by viruses; rest and fluids help."}]


@pytest.fixture(scope="module")
def rm_client(smoke_run):
    from fastapi.testclient import TestClient

    from medgpt.serving.api import create_app
    from medgpt.serving.loading import load

    cfg = compose(["model=tiny", f"run={smoke_run}", f"paths.root={ROOT}", f"paths.output_dir={smoke_run.parent}"])
    loaded = load(cfg)
    assert loaded.artefacts.reward_model and loaded.artefacts.adapter_path  # base + adapter, merged in memory
    with TestClient(create_app(loaded, cfg.generation, KEY)) as client:
        yield client, loaded
    loaded.engine.close()


def post(client, path: str, body, key: str | None = KEY):
    return client.post(path, json=body, headers={"Authorization": f"Bearer {key}"} if key else {})


def test_rewards_endpoint_scores_texts(rm_client, smoke_run):
    client, loaded = rm_client
    res = post(client, "/v1/rewards", {"input": ["Rest and drink fluids.", "Take antibiotics at once."]})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["object"] == "list" and body["model"] == smoke_run.name and body["usage"]["prompt_tokens"] > 0
    assert [d["index"] for d in body["data"]] == [0, 1] and all(isinstance(d["score"], float) for d in body["data"])
    assert body["data"][0]["score"] != body["data"][1]["score"]
    # a conversation is rendered through the run's template: the same score as the rendered text itself
    text = loaded.template.render(CONV, loaded.tokenizer.bos_token, loaded.tokenizer.eos_token)
    by_messages = post(client, "/v1/rewards", {"messages": [CONV], "model": smoke_run.name}).json()["data"][0]["score"]
    by_text = post(client, "/v1/rewards", {"input": text}).json()["data"][0]["score"]
    assert by_messages == pytest.approx(by_text, abs=1e-5)
    from medgpt.serving.rewards import score_texts

    assert score_texts(smoke_run, [CONV, text]) == pytest.approx([by_messages, by_text], abs=1e-5)


@pytest.mark.parametrize("body,status,param", [
    ({}, 400, "input"),  # neither input nor messages
    ({"input": "a", "messages": [CONV]}, 400, "input"),  # both
    ({"input": []}, 400, "input"),
    ({"input": ["ok", ""]}, 400, "input"),
    ({"input": 3}, 400, "input"),
    ({"messages": [CONV, CONV[:1]]}, 400, "messages.1"),  # the second conversation has no answer to score
    ({"messages": [[{"role": "doctor", "content": "x"}]]}, 400, "messages.0.0.role"),
    ({"input": "a", "model": "another"}, 404, "model"),
])
def test_rewards_endpoint_refuses_bad_bodies(rm_client, body, status, param):
    client, _ = rm_client
    res = post(client, "/v1/rewards", body)
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_rewards_endpoint_needs_the_key_and_generation_is_refused(rm_client):
    client, _ = rm_client
    assert post(client, "/v1/rewards", {"input": "a"}, key=None).status_code == 401
    assert post(client, "/v1/rewards", {"input": "a"}, key="wrong").status_code == 401
    for path, body in (("/v1/chat/completions", {"messages": CONV}), ("/v1/completions", {"prompt": "A fever is"})):
        res = post(client, path, body)
        assert res.status_code == 400 and "this run is a reward model" in res.json()["error"]["message"], res.text
    assert client.get("/health").json()["status"] == "ok"


def test_score_texts_refuses_a_run_that_is_not_a_reward_model(tmp_path):
    from medgpt.errors import ModelError
    from medgpt.serving.rewards import score_texts

    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "stage": "sft"}))
    with pytest.raises(ModelError, match="is not a reward-model run"):
        score_texts(tmp_path, ["a"])


# --- (3) a learning signal on the demo pairs ----------------------------------------------------------------------------

def held_out_accuracy(run_dir: Path, path: Path = HELD_OUT) -> tuple[float, float, int]:
    """(accuracy with ties counting half, mean margin, pairs) of a trained RM on the pairs of `path`, via score_texts."""
    from medgpt.serving.rewards import score_texts

    records, _, _ = load_records([path])
    conv = lambda r, answer: r.messages + [{"role": "assistant", "content": answer}]  # noqa: E731
    chosen = score_texts(run_dir, [conv(r, r.chosen) for r in records])
    rejected = score_texts(run_dir, [conv(r, r.rejected) for r in records])
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected))
    return wins / len(records), sum(c - r for c, r in zip(chosen, rejected)) / len(records), len(records)


def test_trained_rm_ranks_chosen_above_rejected_more_often_than_at_the_start(tmp_path):
    """Evaluated on the TRAIN pairs (data.eval_files = the train file; with max_samples=48 the eval takes its first 12 pairs,
    all among the 48 trained on), before and after training; the held-out accuracy is printed (pytest -s)."""
    res = launch("model=tiny", "method=rm", "lora=none", "method.learning_rate=1e-3", "method.max_steps=24", "method.max_length=256",
                 "data.max_samples=48", "hardware.batch_size=8", "hardware.eval_batch_size=16", "method.eval_steps=0",
                 "data.eval_files=[data/dpo/medical_demo_en.jsonl]", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "completed" and s["artefact"] == "model"  # full fine-tuning: model/ with the head
    assert s["eval_accuracy_after"] > s["eval_accuracy_before"] and s["eval_accuracy_after"] > 0.5
    assert s["eval_margin"] > s["eval_margin_before"] and s["eval_loss"] < s["eval_loss_before"]
    accuracy, margin, n = held_out_accuracy(tmp_path)
    print(f"\ntiny RM (lora=none, 24 steps): train-pair accuracy {s['eval_accuracy_before']:.3f} -> {s['eval_accuracy_after']:.3f}; "
          f"held-out {HELD_OUT.name}: accuracy {accuracy:.3f}, mean margin {margin:.3f} on {n} pairs")


@pytest.mark.slow
def test_smollm2_rm_ranks_held_out_pairs(tmp_path):
    """SmolLM2-135M, method=rm defaults (LoRA r=16 + the score head, one epoch over the 177 demo pairs): held-out accuracy
    on dpo_demo's 32 eval pairs, before and after (the summary), and again through score_texts."""
    res = launch("model=smollm2-135m", "method=rm", f"hydra.run.dir={tmp_path}", timeout=3600)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    accuracy, margin, n = held_out_accuracy(tmp_path)
    print(f"\nsmollm2-135m RM: held-out accuracy {s['eval_accuracy_before']:.3f} -> {s['eval_accuracy_after']:.3f} "
          f"(score_texts: {accuracy:.3f}, mean margin {margin:.3f}, {n} pairs)")
    assert s["eval_accuracy_after"] > 0.5 and accuracy > 0.5  # more often than not
    assert accuracy == pytest.approx(s["eval_accuracy_after"], abs=1 / n)  # serving scores as training evaluated
