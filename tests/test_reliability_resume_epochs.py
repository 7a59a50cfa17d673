"""Resume in a later epoch with method.group_by_length=true (the default): the length-grouped sampler is seeded per
epoch (seed + epoch), so a run interrupted in epoch 2 and resumed sees the same batches as the uninterrupted run,
for the plain Trainer (SFT) and for the PreferenceTrainer (DPO)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import dialogue, launch, read_jsonl, write_jsonl

EPOCHS, CUT = 3, 7  # 9 train examples, batch 2: 5 steps an epoch, 15 in all; step 7 is in epoch 2


def _dialogues(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        row = dialogue(i, turns=1 + i % 3)
        row["conversations"][-1]["value"] += " More detail." * (i % 4)  # lengths vary: grouping by length matters
        rows.append(row)
    return rows


def _pairs(n: int) -> list[dict]:
    return [{"conversations": [{"from": "human", "value": f"Question {i}: is 38.{i % 10} C a fever?" + " Please explain." * (i % 3)}],
             "chosen": f"Yes, 38.{i % 10} C is a fever in adults." + " Rest and drink fluids." * (i % 4),
             "rejected": "No." + " It is nothing." * (i % 2)} for i in range(n)]


def _interrupted_and_full(folder, extra: tuple[str, ...]):
    with ThreadPoolExecutor(2) as pool:  # the two independent runs side by side (each is deterministic on its own)
        full_job = pool.submit(launch, *extra, f"hydra.run.dir={folder / 'full'}")
        cut_job = pool.submit(launch, *extra, f"hydra.run.dir={folder / 'cut'}", env={"MEDGPT_TEST_INTERRUPT_AT_STEP": str(CUT)})
        full, cut = full_job.result(), cut_job.result()
    assert full.returncode == 0, full.stderr[-2000:]
    assert cut.returncode == 130, cut.stderr[-2000:]
    resumed = launch(f"run={folder / 'cut'}", "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return [json.loads((folder / name / "summary.json").read_text()) for name in ("full", "cut")]


def _assert_same_run(folder, full: dict, cut: dict) -> None:
    assert cut["status"] == "completed" and cut["resumed_from"].endswith(f"checkpoint-{CUT}")
    assert cut["steps"] == full["steps"] == 15 and cut["epochs"] == full["epochs"] == EPOCHS
    assert cut["tokens_seen"] == full["tokens_seen"]  # the same batches: the same (non-padding) tokens
    full_rows, cut_rows = read_jsonl(folder / "full/metrics.jsonl"), read_jsonl(folder / "cut/metrics.jsonl")
    losses = lambda rows: [(r["step"], r["loss"]) for r in rows if "loss" in r]  # noqa: E731
    assert [s for s, _ in losses(cut_rows)] == [s for s, _ in losses(full_rows)] == list(range(1, 16))
    for (step, a), (_, b) in zip(losses(full_rows), losses(cut_rows)):
        assert b == pytest.approx(a, abs=1e-4), step
    seen = lambda rows: [r["tokens_seen"] for r in rows if "tokens_seen" in r]  # noqa: E731
    assert seen(cut_rows) == seen(full_rows)


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_sft_resumed_in_epoch_2_matches_the_uninterrupted_run(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", _dialogues(12))
    full, cut = _interrupted_and_full(tmp_path, (
        "model=tiny", "debug=smoke", f"data.train_files=[{data}]", "data.eval_files=[]", "data.eval_split=0.25",
        "method.max_steps=-1", f"method.epochs={EPOCHS}", "method.group_by_length=true", "method.learning_rate=1e-2",
        "method.lr_scheduler=linear", "method.warmup_ratio=0", "method.sample_questions=0"))
    _assert_same_run(tmp_path, full, cut)


@pytest.mark.slow  # several end-to-end runs: make test-slow (in CI) keeps the fast suite fast
def test_dpo_resumed_in_epoch_2_matches_the_uninterrupted_run(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs(12))
    full, cut = _interrupted_and_full(tmp_path, (
        "model=tiny", "method=dpo", "debug=smoke", f"data.train_files=[{data}]", "data.eval_files=[]", "data.eval_split=0.25",
        "method.max_steps=-1", f"method.epochs={EPOCHS}", "method.group_by_length=true", "method.learning_rate=1e-3",
        "method.lr_scheduler=linear", "method.warmup_ratio=0"))
    _assert_same_run(tmp_path, full, cut)


def test_sampler_order_depends_on_seed_and_epoch_only():
    import torch

    from medgpt.stages.sampling import EpochSeededLengthGroupedSampler

    lengths = [3, 9, 4, 12, 7, 5, 8, 2, 11, 6, 10, 1]
    a, b = EpochSeededLengthGroupedSampler(2, lengths=lengths, seed=42), EpochSeededLengthGroupedSampler(2, lengths=lengths, seed=42)
    torch.manual_seed(123)  # the global RNG plays no part
    b.set_epoch(2)
    a.set_epoch(0)
    first = list(a)
    a.set_epoch(2)
    torch.manual_seed(999)
    assert list(a) == list(b)  # epoch 2 alone (a resumed run) == epoch 2 after epochs 0 and 1
    assert sorted(first) == list(range(len(lengths))) and list(a) != first  # a new order each epoch
