"""Preference numerics: ORPO's log(1 - p) is stable as the mean log-prob nears 0, and reward ties (policy ==
reference, before training) count as half in the reward accuracy."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from conftest import ROOT, launch

from medgpt.stages.preference import LossInputs, log1mexp, preference_loss, reward_accuracy


def test_orpo_gradient_is_finite_when_the_mean_log_prob_nears_zero():
    chosen = torch.tensor([-1e-8, -0.3], dtype=torch.float32, requires_grad=True)  # summed log-probs (one token each)
    rejected = torch.tensor([-1e-8, -2.0], dtype=torch.float32, requires_grad=True)
    ones = torch.ones(2)
    naive = (-1e-8 - torch.log1p(-torch.exp(torch.tensor(-1e-8, dtype=torch.float32))))
    assert not torch.isfinite(naive)  # what the naive formula gave: exp(-1e-8) rounds to 1 in float32
    loss, _ = preference_loss(LossInputs(chosen, rejected, ones, ones), "orpo", beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_log1mexp_gradient_at_minus_1e_8_is_finite_and_right():
    x = torch.tensor(-1e-8, dtype=torch.float32, requires_grad=True)
    value = log1mexp(x)
    value.backward()
    assert value.item() == pytest.approx(math.log(1e-8), rel=1e-4)  # 1 - exp(x) ~ -x for x near 0
    assert torch.isfinite(x.grad) and x.grad.item() == pytest.approx(-1e8, rel=1e-3)  # d/dx = exp(x) / (exp(x) - 1) ~ 1/x
    naive = torch.tensor(-1e-8, dtype=torch.float32, requires_grad=True)
    torch.log1p(-torch.exp(naive)).backward()
    assert not torch.isfinite(naive.grad)  # the bug this replaces


@pytest.mark.parametrize("x", [-30.0, -5.0, -1.0, -0.7, -math.log(2), -0.69, -0.5, -0.1, -1e-3, -1e-6])
def test_log1mexp_matches_the_naive_formula_where_it_is_stable(x):
    expected = math.log(-math.expm1(x)) if x > -0.5 else math.log1p(-math.exp(x))  # float64 reference
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        t = torch.tensor(x, dtype=dtype, requires_grad=True)
        value = log1mexp(t)
        value.backward()
        assert value.item() == pytest.approx(expected, rel=rel, abs=1e-30)
        assert t.grad.item() == pytest.approx(math.exp(x) / math.expm1(x), rel=max(rel, 1e-6))
    if x < -0.1:  # where the naive formula is fine in float32, the values agree
        naive = torch.log1p(-torch.exp(torch.tensor(x, dtype=torch.float32))).item()
        assert log1mexp(torch.tensor(x, dtype=torch.float32)).item() == pytest.approx(naive, rel=1e-5)


def test_orpo_loss_matches_the_naive_formula_in_float64():
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    x = LossInputs(t([-3.0, -8.0]), t([-6.0, -5.0]), t([2.0, 4.0]), t([3.0, 5.0]))
    loss, _ = preference_loss(x, "orpo", beta=0.3)
    expected = 0.0
    for pc, pr, lc, lr in ((-3.0, -6.0, 2, 3), (-8.0, -5.0, 4, 5)):
        ac, ar = pc / lc, pr / lr
        odds = (ac - ar) - (math.log(1 - math.exp(ac)) - math.log(1 - math.exp(ar)))
        expected += (-ac + 0.3 * math.log1p(math.exp(-odds))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-10)


def test_identical_policy_and_reference_have_reward_accuracy_one_half():
    torch.manual_seed(0)
    policy_c, policy_r = -torch.rand(64) * 300, -torch.rand(64) * 300  # summed log-probs of 64 pairs
    noise = lambda v: v * (1 + (torch.rand_like(v) - 0.5) * 2e-6)  # noqa: E731 - the same text, differently padded batches
    x = LossInputs(policy_c, policy_r, torch.full((64,), 50.0), torch.full((64,), 50.0), noise(policy_c), noise(policy_r))
    _, metrics = preference_loss(x, "sigmoid", beta=0.1)
    assert (metrics["rewards/margins"] != 0).any()  # the noise is there ...
    assert metrics["rewards/accuracies"].mean().item() == 0.5  # ... and counts as a tie, not as wins or losses
    assert metrics["rewards/ties"].tolist() == [1.0] * 64
    exact = LossInputs(policy_c, policy_r, torch.full((64,), 50.0), torch.full((64,), 50.0), policy_c.clone(), policy_r.clone())
    assert preference_loss(exact, "sigmoid", beta=0.1)[1]["rewards/accuracies"].tolist() == [0.5] * 64


def test_reward_accuracy_counts_wins_losses_and_ties():
    c, r = torch.tensor([0.5, -0.2, 0.0, 1e-9]), torch.tensor([0.1, 0.3, 0.0, 0.0])
    assert reward_accuracy(c, r, torch.zeros(4)).tolist() == [1.0, 0.0, 0.5, 0.5]


def test_untrained_dpo_policy_has_held_out_reward_accuracy_one_half(tmp_path):
    # the policy equals the reference before training; the reference log-probs are precomputed in other batches
    res = launch("model=tiny", "method=dpo", "data=dpo_demo", "debug=smoke", "method.precompute_reference=true",
                 "method.max_steps=2", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["eval_reward_accuracy_before"] == 0.5
    pairs = s["data"]["eval"]["examples"]
    before = next(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "eval_rewards/ties" in line)
    assert before["step"] == 0 and before["eval_rewards/ties"] == 1.0  # every held-out pair is a tie before training
    # make demo-pipeline prints the tie counts beside the accuracy
    spec = importlib.util.spec_from_file_location("demo_pipeline", ROOT / "scripts/demo_pipeline.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.reward_ties(tmp_path)[0] == f"{pairs} of {pairs} tied"
