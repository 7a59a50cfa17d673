"""Preference optimisation: loss numerics for every loss type, data in both MedicalGPT forms, references."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, launch, write_jsonl

from medgpt.data.formats import load_records
from medgpt.data.templates import load_template
from medgpt.data.tokenize import IGNORE, encode_response
from medgpt.errors import DataError
from medgpt.stages.preference import LossInputs, preference_loss

# two pairs: summed log-probs (policy, reference) and response lengths
PC, PR, RC, RR = [-12.0, -20.0], [-15.0, -18.0], [-13.0, -19.0], [-14.0, -19.5]
LC, LR = [6, 10], [5, 9]
BETA, EPS, GAMMA = 0.3, 0.1, 0.5


def log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z))


def expected(loss: str) -> float:
    """The published formulas, written out with math on plain floats (independent of the implementation)."""
    out = []
    for pc, pr, rc, rr, lc, lr in zip(PC, PR, RC, RR, LC, LR):
        d = (pc - pr) - (rc - rr)
        ac, ar = pc / lc, pr / lr
        if loss == "sigmoid":
            v = -log_sigmoid(BETA * d) * (1 - EPS) - log_sigmoid(-BETA * d) * EPS
        elif loss == "robust":
            v = (-log_sigmoid(BETA * d) * (1 - EPS) + log_sigmoid(-BETA * d) * EPS) / (1 - 2 * EPS)
        elif loss == "hinge":
            v = max(0.0, 1 - BETA * d)
        elif loss == "ipo":
            v = ((ac - ar) - (rc / lc - rr / lr) - 1 / (2 * BETA)) ** 2
        elif loss == "orpo":
            odds = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
            v = -ac - BETA * log_sigmoid(odds)
        else:  # simpo
            z = BETA * (ac - ar) - GAMMA
            v = -log_sigmoid(z) * (1 - EPS) - log_sigmoid(-z) * EPS
        out.append(v)
    return sum(out) / len(out)


@pytest.mark.parametrize("loss", ["sigmoid", "robust", "hinge", "ipo", "orpo", "simpo"])
def test_loss_matches_the_formula(loss):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    x = LossInputs(t(PC), t(PR), t(LC), t(LR), t(RC), t(RR))
    value, metrics = preference_loss(x, loss, BETA, EPS, sft_weight=0.0, simpo_gamma=GAMMA)
    assert value.item() == pytest.approx(expected(loss), abs=1e-5)
    assert metrics["rewards/accuracies"].tolist() == [0.5 if a == b else float(a > b)  # a tie counts as half
                                                      for a, b in zip(metrics["rewards/chosen"], metrics["rewards/rejected"])]


def test_sft_weight_adds_the_chosen_nll():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    x = LossInputs(t(PC), t(PR), t(LC), t(LR), t(RC), t(RR))
    plain, _ = preference_loss(x, "sigmoid", BETA)
    mixed, _ = preference_loss(x, "sigmoid", BETA, sft_weight=0.5)
    nll = sum(-pc / lc for pc, lc in zip(PC, LC)) / 2
    assert mixed.item() - plain.item() == pytest.approx(0.5 * nll, abs=1e-6)


def test_both_medicalgpt_preference_forms_load():
    nested, _, fmt = load_records([ROOT / "data/dpo/medical_demo_en.jsonl"])
    flat, _, fmt_flat = load_records([ROOT / "data/dpo/medical_demo_flat_en.jsonl"])
    assert fmt == fmt_flat == "preference" and len(nested) >= 150 and len(flat) >= 20
    for rec in nested + flat:
        assert rec.messages[-1]["role"] == "user" and rec.chosen and rec.rejected and rec.chosen != rec.rejected
    assert any(len(r.messages) > 1 for r in flat)  # history turns become prompt turns


def test_response_only_labels_and_left_truncated_prompt(tokenizer):
    chatml = load_template("chatml")
    prompt = [{"role": "user", "content": "Earlier question"}, {"role": "assistant", "content": "Earlier answer"},
              {"role": "user", "content": "background " * 200 + "final question?"}]
    enc = encode_response(prompt, "Final answer.", chatml, tokenizer, max_length=96, max_prompt_length=48)
    assert enc.prompt_truncated and len(enc.input_ids) <= 96
    assert tokenizer.decode([t for t in enc.labels if t != IGNORE]) == "Final answer.<|im_end|>"  # not "Earlier answer"
    assert "final question?" in tokenizer.decode(enc.input_ids) and "Earlier question" not in tokenizer.decode(enc.input_ids)


def test_bad_preference_records(tmp_path):
    ok = {"conversations": [{"from": "human", "value": "Q?"}], "chosen": "good", "rejected": "bad"}
    path = write_jsonl(tmp_path / "p.jsonl", [ok, {"conversations": [{"from": "human", "value": "Q?"}], "chosen": "good"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing field 'rejected'"):
        load_records([path])
    records, report, _ = load_records([path], on_error="skip")
    assert len(records) == 1 and report.skipped == 1


def test_identical_pairs_are_dropped_and_counted(tokenizer):
    from medgpt.data.dpo_data import encode_pairs
    from medgpt.data.formats import Record

    prompt = [{"role": "user", "content": "Q?"}]
    recs = [Record("x:1", prompt, chosen="same", rejected="same"), Record("x:2", prompt, chosen="good", rejected="bad")]
    ds, stats = encode_pairs(recs, load_template("chatml"), tokenizer, 64, 32)
    assert len(ds) == 1 and stats["identical_pairs"] == 1


# --- reference selection ---

def _cfg(loss="sigmoid", reference="auto", lora="lora"):
    return SimpleNamespace(method=SimpleNamespace(loss=loss, reference=reference), lora=SimpleNamespace(name=lora, quantization=None),
                           model=SimpleNamespace(trust_remote_code=False), paths=SimpleNamespace(output_dir=str(ROOT / "outputs")))


def _setup(tiny_path, init_from=None):
    from medgpt.modeling.loader import Placement

    return SimpleNamespace(init_from=init_from, model_path=str(tiny_path), root_model_path=str(tiny_path),
                           placement=Placement("cpu", torch.float32, "sdpa"))


def test_reference_selection(tiny_path):
    from medgpt.stages.preference import choose_reference

    policy = torch.nn.Linear(2, 2)
    assert choose_reference(_cfg(loss="orpo"), _setup(tiny_path), policy).kind == "none"
    assert choose_reference(_cfg(loss="simpo"), _setup(tiny_path), policy).kind == "none"
    fresh = choose_reference(_cfg(), _setup(tiny_path), policy)
    assert fresh.kind == "adapter-disabled" and "base model" in fresh.description
    after_sft = choose_reference(_cfg(), _setup(tiny_path, init_from="/runs/sft"), policy)
    assert after_sft.kind == "adapter-disabled" and "run /runs/sft" in after_sft.description  # the SFT policy, not the base
    full = choose_reference(_cfg(lora="none"), _setup(tiny_path), policy)
    assert full.kind == "frozen" and full.model is not policy and not any(p.requires_grad for p in full.model.parameters())
    base = choose_reference(_cfg(reference="base"), _setup(tiny_path, init_from="/runs/sft"), policy)
    assert base.kind == "frozen" and "base model" in base.description and base.model is not None


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_dpo_run_records_reference_and_rewards(tmp_path, tiny_path):
    res = launch("model=tiny", "method=dpo", "data=dpo_demo", "debug=smoke", "method.precompute_reference=true",
                 f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["base_model_path"] == str(tiny_path)
    assert s["reference"] == {"kind": "adapter-disabled", "precomputed": True,
                              "description": f"the starting policy (the base model {tiny_path}): the policy with its LoRA adapter disabled"}
    assert s["eval_loss_before"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert len(train) == 8 and all({"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(r) for r in train)
    assert "eval_rewards/accuracies" in rows[-1] and "eval_perplexity" not in rows[-1]
