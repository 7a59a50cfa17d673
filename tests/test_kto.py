"""KTO (method=kto): loss parity with TRL 1.16's KTOTrainer, unpaired and derived-from-paired data, runs on tiny."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, launch, read_jsonl, write_jsonl
from omegaconf import OmegaConf

from medgpt.data.formats import Record, load_records
from medgpt.data.templates import load_template
from medgpt.data.tokenize import IGNORE
from medgpt.errors import ConfigError, DataError
from medgpt.stages.kto_loss import kl_estimate, kto_loss

# --- loss parity with TRL: its own _compute_loss on a fake model that returns fixed per-token log-probs ---


class FakeModel:
    """Returns per-token log-probs chosen per input: `table` maps an input_ids tensor to its [B, L-1] log-probs."""

    training = True

    def __init__(self, table: list[tuple[torch.Tensor, torch.Tensor]]):
        self.table = table

    def __call__(self, input_ids, **kwargs):
        log_probs = next(lp for ids, lp in self.table if torch.equal(ids, input_ids))
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros_like(log_probs), mean_logits=torch.zeros_like(log_probs))


def trl_kto(loss_type, beta, w_d, w_u, labels, policy, ref, kl_policy=None, ref_kl=None):
    """TRL's KTOTrainer._compute_loss (precomputed reference log-probs), run on a minimal trainer object."""
    from trl.trainer.kto_trainer import KTOTrainer as TRLKTOTrainer

    b, width = policy.shape[0], policy.shape[1] + 1
    ids = torch.arange(b * width).view(b, width)
    table = [(ids, policy)]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.ones_like(ids),
             "label": torch.tensor(labels), "ref_logps": ref.sum(-1)}
    if kl_policy is not None:
        kl_ids = ids + 10_000
        table.append((kl_ids, kl_policy))
        batch |= {"KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(ids), "KL_completion_mask": torch.ones_like(ids),
                  "ref_KL_logps": ref_kl.sum(-1)}
    t = object.__new__(TRLKTOTrainer)
    t.model = FakeModel(table)
    t.accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x)
    t.calculate_KL, t.precompute_ref_logps, t.aux_loss_enabled = kl_policy is not None, True, False
    t.loss_type, t.beta, t.desirable_weight, t.undesirable_weight = loss_type, beta, w_d, w_u
    t._metrics, t._total_train_tokens, t._tp_size = {"train": defaultdict(list)}, 0, 1
    loss = t._compute_loss(t.model, batch, return_outputs=False)
    return loss, {k: v[0] for k, v in t._metrics["train"].items()}


CASES = {  # loss, beta, w_d, w_u, labels, KL shift (positive: a KL above 0; negative: clamped to 0)
    "kto": ("kto", 0.3, 1.3, 0.7, [True, False, True, False, False], 2.0),
    "kto-kl-clamped": ("kto", 0.1, 1.0, 1.0, [True, True, False, False], -5.0),
    "kto-desirable-only": ("kto", 0.5, 1.0, 2.0, [True, True, True], 1.0),
    "apo_zero_unpaired": ("apo_zero_unpaired", 0.2, 1.0, 1.5, [False, True, False, True], None),
}


@pytest.mark.parametrize("case", CASES)
def test_loss_matches_trl(case):
    loss_type, beta, w_d, w_u, labels, shift = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    b, n = len(labels), 7
    per_token = lambda: -torch.rand(b, n, generator=g) * 3  # noqa: E731
    policy, ref = per_token(), per_token()
    kl_policy, ref_kl = (per_token() + shift / n, per_token()) if shift is not None else (None, None)
    expected, trl_metrics = trl_kto(loss_type, beta, w_d, w_u, labels, policy, ref, kl_policy, ref_kl)

    kl = kl_estimate(kl_policy.sum(-1), ref_kl.sum(-1)) if shift is not None else None
    ours, metrics = kto_loss(policy.sum(-1), ref.sum(-1), torch.tensor(labels), kl, beta, w_d, w_u, loss_type)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)
    if kl is not None:
        assert kl.item() == pytest.approx(trl_metrics["kl"], abs=1e-6)
        assert (kl.item() == 0.0) == (shift < 0)  # a negative estimate is clamped
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        if metrics[key].numel():
            assert metrics[key].mean().item() == pytest.approx(trl_metrics[key], abs=1e-5)
        else:
            assert key not in trl_metrics


def test_policy_equal_to_reference_gives_half_weighted():
    logps = torch.tensor([-10.0, -20.0, -30.0])
    loss, _ = kto_loss(logps, logps.clone(), torch.tensor([True, False, False]), torch.tensor(0.0), 0.1, 2.0, 1.0)
    assert loss.item() == pytest.approx((2.0 * 0.5 + 0.5 + 0.5) / 3)


# --- data: unpaired records, pairs split in two, the mismatched KL rows ---

Q = [{"role": "user", "content": "Is 38.5 C a fever?"}]


def test_unpaired_records_parse(tmp_path):
    rows = [{"messages": Q, "completion": "Yes.", "label": True},
            {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "Bad answer."}], "label": False},
            {"messages": Q, "completion": {"role": "assistant", "content": "As a turn."}, "label": 1, "system_prompt": "Be brief."}]
    recs, _, fmt = load_records([write_jsonl(tmp_path / "u.jsonl", rows)])
    assert fmt == "unpaired"
    assert [(r.completion, r.label) for r in recs] == [("Yes.", True), ("Bad answer.", False), ("As a turn.", True)]
    assert all(r.messages[-1]["role"] == "user" for r in recs) and recs[2].messages[0] == {"role": "system", "content": "Be brief."}
    demo, _, _ = load_records([ROOT / "data/kto/medical_demo_en.jsonl"])
    held, _, _ = load_records([ROOT / "data/kto/medical_eval_en.jsonl"], "unpaired")
    assert len(demo) == 100 and sum(r.label for r in demo) == 50 and len(held) == 32 and sum(r.label for r in held) == 16


@pytest.mark.parametrize("row, message", [
    ({"messages": Q, "completion": "Yes."}, r"u\.jsonl:2: missing field 'label' \(true if the completion is a desirable answer"),
    ({"messages": Q, "completion": "Yes.", "label": "yes"}, r"u\.jsonl:2: field 'label' must be true or false"),
    ({"messages": Q, "label": True}, r"u\.jsonl:2: an unpaired record needs a 'completion' field or a final assistant turn"),
])
def test_bad_unpaired_records_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "u.jsonl", [{"messages": Q, "completion": "Yes.", "label": True}, row])
    with pytest.raises(DataError, match=message):
        load_records([path], "unpaired")
    assert len(load_records([path], "unpaired", on_error="skip")[0]) == 1


def test_pairs_become_one_desirable_and_one_undesirable(tokenizer):
    from medgpt.data.kto_data import encode_unpaired

    recs = [Record("x:1", Q, chosen="Yes, it is.", rejected="No."), Record("x:2", Q, chosen="same", rejected="same"),
            Record("x:3", Q, completion="Maybe.", label=False)]
    ds, stats = encode_unpaired(recs, load_template("chatml"), tokenizer, 64, 32)
    assert ds["label"] == [True, False, False] and stats["from_pairs"] == 1 and stats["identical_pairs"] == 1
    assert [tokenizer.decode([t for t in labels if t != IGNORE]) for labels in ds["completion_labels"]] == [
        "Yes, it is.<|im_end|>", "No.<|im_end|>", "Maybe.<|im_end|>"]


def test_collator_builds_the_rotated_kl_rows():
    from medgpt.data.kto_data import UnpairedCollator

    rows = [{"prompt_ids": [1, 2], "completion_ids": [10, 11], "completion_labels": [10, 11], "label": True},
            {"prompt_ids": [3], "completion_ids": [20, 21, 22], "completion_labels": [20, 21, 22], "label": False},
            {"prompt_ids": [4, 5, 6], "completion_ids": [30], "completion_labels": [30], "label": True}]
    batch = UnpairedCollator(0, max_length=5)(rows)
    assert batch["desirable"].tolist() == [True, False, True]
    assert batch["input_ids"].tolist() == [[1, 2, 10, 11], [3, 20, 21, 22], [4, 5, 6, 30]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 10, 11], [IGNORE, 20, 21, 22], [IGNORE, IGNORE, IGNORE, 30]]
    assert batch["kl_input_ids"].tolist() == [[1, 2, 30, 0, 0], [3, 10, 11, 0, 0], [4, 5, 6, 20, 21]]  # x_i with y_(i-1), cut at 5
    assert batch["kl_labels"].tolist() == [[IGNORE, IGNORE, 30, IGNORE, IGNORE], [IGNORE, 10, 11, IGNORE, IGNORE],
                                           [IGNORE, IGNORE, IGNORE, 20, 21]]
    assert "kl_input_ids" not in UnpairedCollator(0, 5, kl=False)(rows)


def test_batch_of_one_is_refused_in_one_sentence():
    from medgpt.stages.methods.kto import check_batch_size

    cfg = lambda loss, b, e: OmegaConf.create({"method": {"loss": loss}, "hardware": {"batch_size": b, "eval_batch_size": e}})  # noqa: E731
    with pytest.raises(ConfigError, match=r"needs hardware\.batch_size >= 2 per device \(got 1\)"):
        check_batch_size(cfg("kto", 1, 8))
    with pytest.raises(ConfigError, match=r"hardware\.eval_batch_size >= 2"):
        check_batch_size(cfg("kto", 4, 1))
    check_batch_size(cfg("apo_zero_unpaired", 1, 1))  # no KL term: a batch of one is fine


# --- runs on the tiny model ---

KTO_METRICS = {"loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"}


def test_kto_smoke_run(tmp_path):
    res = launch("model=tiny", "method=kto", "debug=smoke", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "completed" and s["stage"] == "kto" and s["steps"] == 8
    assert (s["loss"], s["beta"], s["desirable_weight"], s["undesirable_weight"]) == ("kto", 0.1, 1.0, 1.0)
    assert s["reference"]["kind"] == "adapter-disabled" and s["eval_perplexity"] is None
    assert s["eval_loss_before"] == pytest.approx(0.5, abs=1e-4) and s["eval_reward_margin_before"] == pytest.approx(0, abs=1e-4)
    assert all(isinstance(s[k], float) for k in ("eval_kl", "eval_reward_chosen", "eval_reward_rejected", "eval_reward_margin"))
    assert s["data"]["format"] == "unpaired" and s["data"]["train"]["desirable"] == s["data"]["train"]["undesirable"] == 16
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    assert len(train) == 8 and all("kl" in r and r["kl"] >= 0 for r in train)
    assert KTO_METRICS <= set().union(*train)  # a batch holds desirable or undesirable answers or both
    assert {"eval_kl", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins"} <= set(rows[-1])


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_kto_trains_on_preference_pairs(tmp_path):
    res = launch("model=tiny", "method=kto", "data=dpo_demo", "debug=smoke", "method.max_steps=2", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-2000:]
    train = json.loads((tmp_path / "summary.json").read_text())["data"]["train"]
    assert train["from_pairs"] == 32 and train["desirable"] == train["undesirable"] == 32


def test_sft_then_kto_pipeline(tmp_path):
    res = launch("model=tiny", "debug=smoke", "method=pipeline", "pipeline.stages=[sft,kto]", f"hydra.run.dir={tmp_path}", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "completed" and [r["stage"] for r in s["stages"]] == ["sft", "kto"]
    kto = s["stages"][1]
    assert kto["data"] == "kto_demo" and "eval_reward_margin" in kto  # no pipeline.data entry: the method's default data
    sub = json.loads((tmp_path / "2-kto" / "summary.json").read_text())
    assert sub["init_from"].endswith("1-sft") and "1-sft" in sub["reference"]["description"]  # the SFT policy, not the base
