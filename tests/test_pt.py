"""Continued pretraining data: packing boundaries, pads out of the loss, and the stage end to end."""

from __future__ import annotations

import json

from conftest import launch, read_jsonl

from medgpt.data.collate import PadCollator, chunk_documents, pack_documents
from medgpt.data.tokenize import IGNORE

EOS, PAD = 2, 0
DOCS = [[11, 12, 13, EOS], [21, 22, EOS], [31, 32, 33, 34, 35, 36, EOS]]


def test_positions_restart_per_document_and_first_tokens_are_not_predicted_across_documents():
    rows = pack_documents(DOCS, block=8, pad_token_id=PAD)
    assert rows[0]["input_ids"] == [11, 12, 13, EOS, 21, 22, EOS, 31]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 0]
    # 21 and 31 start new documents: predicting them from the previous document would cross a boundary
    assert rows[0]["labels"] == [11, 12, 13, EOS, IGNORE, 22, EOS, IGNORE]


def test_long_document_continues_and_last_block_is_padded_out_of_the_loss():
    rows = pack_documents(DOCS, block=8, pad_token_id=PAD)
    assert len(rows) == 2 and all(len(r["input_ids"]) == 8 for r in rows)
    assert rows[1]["input_ids"] == [32, 33, 34, 35, 36, EOS, PAD, PAD]
    assert rows[1]["labels"] == [32, 33, 34, 35, 36, EOS, IGNORE, IGNORE]
    assert rows[1]["position_ids"] == [0, 1, 2, 3, 4, 5, 0, 1]  # pads form their own block
    assert len(pack_documents(DOCS, block=8, pad_token_id=PAD, drop_last=True)) == 1


def test_without_packing_every_pad_is_out_of_the_loss():
    batch = PadCollator(PAD)(chunk_documents(DOCS, block=5))
    assert batch["input_ids"].shape == (4, 5)
    assert ((batch["attention_mask"] == 0) == (batch["labels"] == IGNORE)).all()  # exactly the pads are unlabelled


def test_pt_stage_runs_on_text_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(f"Document {i}: the heart pumps blood through the body." for i in range(30)))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"Record {i}: insulin lowers blood glucose."}) for i in range(10)))
    res = launch("model=tiny", "method=pt", "debug=smoke", f"data.train_files=[{tmp_path}/a.txt,{tmp_path}/b.jsonl]",
                 "data.format=text", "data.eval_files=[]", "data.eval_split=0.1", "method.max_length=64", "method.learning_rate=5e-3",
                 f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-2000:]
    s = json.loads((tmp_path / "run/summary.json").read_text())
    # smoke: data.max_samples=32 per source (30 + 10 records), 4 held out
    assert s["status"] == "completed" and s["stage"] == "pt" and s["data"]["train"]["documents"] == 36
    # it learns: 8 steps at lr 5e-3 on this repetitive text take the held-out loss from ~10.8 to ~10.3 nats
    assert s["eval_loss"] < s["eval_loss_before"] - 0.2 and s["eval_perplexity"] > 1
    assert [r["step"] for r in read_jsonl(tmp_path / "run/metrics.jsonl") if "loss" in r] == list(range(1, 9))


def test_pt_refuses_dialogues(tmp_path):
    res = launch("model=tiny", "method=pt", "data=sharegpt", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 1 and "method=pt needs text data" in res.stdout + res.stderr
