"""DPO's reference log-probs, precomputed once, are cached beside the tokenised data and read back only for the same
rows, reference weights and precision."""

from __future__ import annotations

import os

import torch
from datasets import Dataset

from medgpt.stages.preference import Reference, ReferenceCache, precompute_reference


class CountingReference(Reference):
    def __init__(self, weights):
        super().__init__("frozen", "a frozen test model", weights=str(weights))
        self.calls = 0

    def logps(self, policy, batch, labelled_only=True):
        self.calls += 1
        x = batch["x"].float()
        return -x, -2 * x


def collate(rows):
    return {"x": torch.tensor([r["x"] for r in rows])}


def test_precomputed_reference_log_probs_are_read_back_only_for_the_same_rows_weights_and_precision(tmp_path):
    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"weights v1")
    rows = Dataset.from_dict({"x": [1, 2, 3, 4, 5]})
    ref, policy = CountingReference(weights), torch.nn.Linear(1, 1)
    cache = ReferenceCache(tmp_path / "cache", {"dtype": "torch.float32"})

    first = precompute_reference(ref, policy, rows, collate, 2, cache)
    assert ref.calls == 3 and first["ref_chosen_logps"] == [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert len(list((tmp_path / "cache" / "reference").glob("*.json"))) == 1

    again = precompute_reference(ref, policy, rows, collate, 2, cache)  # a second run over the same pairs: no forward
    assert ref.calls == 3 and again["ref_rejected_logps"] == first["ref_rejected_logps"] == [-2.0, -4.0, -6.0, -8.0, -10.0]

    precompute_reference(ref, policy, rows.select([0, 1, 2]), collate, 2, cache)  # other rows
    assert ref.calls == 5
    precompute_reference(ref, policy, rows, collate, 2, ReferenceCache(tmp_path / "cache", {"dtype": "torch.bfloat16"}))
    assert ref.calls == 8  # another precision
    st = (weights / "model.safetensors").stat()
    os.utime(weights / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the reference's weights changed
    precompute_reference(ref, policy, rows, collate, 2, cache)
    assert ref.calls == 11


def test_an_unreadable_or_short_cache_entry_is_computed_again(tmp_path):
    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"w")
    rows = Dataset.from_dict({"x": [1, 2]})
    ref, cache = CountingReference(weights), ReferenceCache(tmp_path / "cache", {})
    precompute_reference(ref, torch.nn.Linear(1, 1), rows, collate, 8, cache)
    cache.path(ref, rows).write_text('{"chosen": [0.0], "rejected": [0.0]}')  # one value for two rows
    out = precompute_reference(ref, torch.nn.Linear(1, 1), rows, collate, 8, cache)
    assert ref.calls == 2 and out["ref_chosen_logps"] == [-1.0, -2.0]
    cache.path(ref, rows).write_text("not json")
    precompute_reference(ref, torch.nn.Linear(1, 1), rows, collate, 8, cache)
    assert ref.calls == 3
