"""Vocabulary extension (medgpt.modeling.vocab): added tokens, their mean-initialised rows, training only those rows
(PEFT trainable_token_indices, tied lm_head kept tied), a small adapter, and the token surviving train -> merge -> serve.

Fast: one tiny model trained in-process for a few steps (module fixture), saved as a run directory by hand, merged
with merge_run and loaded by serving. The launch.py path (train, mode=merge, serve) is the slow test at the end.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, compose, launch, write_jsonl
from omegaconf import OmegaConf

from medgpt.errors import ConfigError
from medgpt.modeling.vocab import (
    BASE_CHANGES,
    add_token_rows,
    base_changes,
    extend_tokenizer,
    record_base_changes,
    requested_tokens,
    trainable_rows,
)

TOKENS = ["糖尿病", "高血压"]


def _placement():
    from medgpt.modeling.loader import Placement

    return Placement("cpu", torch.float32, "sdpa")


# --- the tokens asked for ---------------------------------------------------------------------------------------


def test_tokens_from_the_list_and_the_file(tmp_path):
    (tmp_path / "t.txt").write_text("\ufeff糖尿病\n\n  高血压 \n", encoding="utf-8")
    cfg = OmegaConf.create({"add_tokens": ["hypertension"], "add_tokens_file": "t.txt"})
    assert requested_tokens(cfg, tmp_path) == ["hypertension", "糖尿病", "高血压"]  # relative to the root; BOM, blanks, spaces gone


@pytest.mark.parametrize("content,message", [
    (None, r"^model\.add_tokens_file=t\.txt: .*t\.txt does not exist or is not a file \(one token per line\)\.$"),
    ("\n  \n", r"^model\.add_tokens_file=t\.txt: .*t\.txt holds no tokens \(one token per line, blank lines ignored\)\.$"),
])
def test_missing_or_empty_tokens_file_is_one_sentence(tmp_path, content, message):
    if content is not None:
        (tmp_path / "t.txt").write_text(content)
    with pytest.raises(ConfigError, match=message):
        requested_tokens(OmegaConf.create({"add_tokens_file": "t.txt"}), tmp_path)
    with pytest.raises(ConfigError, match=r"^model\.add_tokens holds an empty token"):
        requested_tokens(OmegaConf.create({"add_tokens": ["ok", " "]}), tmp_path)


def test_tokens_already_in_the_vocabulary_are_skipped_and_named(tiny_path, caplog):
    from medgpt.modeling.loader import load_tokenizer

    tok = load_tokenizer(str(tiny_path))
    before = {t: tok(t, add_special_tokens=False)["input_ids"] for t in TOKENS}
    added = extend_tokenizer(tok, [*TOKENS, "the", TOKENS[0]])  # "the" is one token already; a duplicate counts once
    assert added == {49152: before[TOKENS[0]], 49153: before[TOKENS[1]]} and len(tok) == 49154
    assert all(len(ids) > 1 for ids in before.values())
    assert "1 already one token of the vocabulary, skipped: 'the'" in caplog.text
    and_ids = tok("和", add_special_tokens=False)["input_ids"]
    assert tok("患者有糖尿病和高血压", add_special_tokens=False)["input_ids"][-2 - len(and_ids):] == [49152, *and_ids, 49153]
    assert extend_tokenizer(tok, TOKENS) == {}  # a second run starting from this tokenizer adds nothing


# --- train only the new rows, save small, reload, merge, serve -----------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_path, tmp_path_factory):
    """The tiny model with TOKENS added, LoRA + the new rows trained to predict 糖尿病 after 糖尿病, saved as a run."""
    from medgpt.data.templates import SAVED_TEMPLATE, resolve_template
    from medgpt.modeling.adapters import apply_adapter
    from medgpt.modeling.loader import load_model, load_tokenizer

    cfg = compose(["model=tiny", "lora.dropout=0"])
    tok = load_tokenizer(str(tiny_path))
    new = extend_tokenizer(tok, TOKENS)
    model = load_model(str(tiny_path), _placement())
    base = model.get_input_embeddings().weight.detach().clone()
    add_token_rows(model, len(tok), new)
    start = model.get_input_embeddings().weight.detach().clone()
    tied_after_resize = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    peft = apply_adapter(model, cfg.lora, cfg.model, trainable_token_indices=trainable_rows(model, list(new)))
    record_base_changes(peft, base_changes(len(tok), new, None))
    torch.manual_seed(0)
    x = torch.tensor([tok("糖尿病" * 8, add_special_tokens=False)["input_ids"]])
    opt = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=0.1)
    peft.train()
    for _ in range(8):
        opt.zero_grad()
        peft(input_ids=x, labels=x).loss.backward()
        opt.step()
    peft.eval()
    with torch.no_grad():
        logits = peft(input_ids=x).logits
    run = tmp_path_factory.mktemp("vocab") / "run"
    adapter = run / "adapter"
    peft.save_pretrained(adapter)
    template = resolve_template(cfg.template, "chatml", tok)
    tok.chat_template = template.to_jinja()
    tok.save_pretrained(adapter)
    (adapter / SAVED_TEMPLATE).write_text(OmegaConf.to_yaml(OmegaConf.create(template.__dict__)))
    OmegaConf.save({"model": {"name": "tiny", "name_or_path": "tiny", "template": "chatml"}}, run / "config.yaml")
    (run / "summary.json").write_text(json.dumps({"status": "completed", "stage": "sft", "base_model_path": str(tiny_path),
                                                  "dtype": "fp32", "adapter": "lora"}))
    delta = peft.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].detach().clone()
    return dict(run=run, adapter=adapter, new=new, base=base, start=start, delta=delta, x=x, logits=logits, tok=tok,
                tied_after_resize=tied_after_resize, trainable=[n for n, p in peft.named_parameters() if p.requires_grad])


def test_new_rows_start_as_the_mean_of_their_sub_tokens(trained):
    for new_id, sub_ids in trained["new"].items():
        torch.testing.assert_close(trained["start"][new_id], trained["base"][sub_ids].mean(0))
    assert torch.equal(trained["start"][:49152], trained["base"]) and trained["tied_after_resize"]


def test_only_the_new_rows_train_and_lm_head_stays_tied(trained):
    embeddings = [n for n in trained["trainable"] if "lora_" not in n]
    assert embeddings == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    assert trained["delta"].shape == (2, 64) and not torch.allclose(trained["delta"], trained["start"][[49152, 49153]])


def test_the_adapter_holds_the_new_rows_only(trained):
    from safetensors import safe_open

    adapter = trained["adapter"]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert [k for k in keys if "lora_" not in k] == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert (adapter / "adapter_model.safetensors").stat().st_size < 200_000  # PEFT's default would add 2 x 49154 x 64 floats (25 MB)
    changes = json.loads((adapter / BASE_CHANGES).read_text())
    assert changes == {"vocab_size": 49154, "new_token_rows": {str(k): v for k, v in trained["new"].items()}, "rope_scaling": None}


def test_reloaded_base_plus_adapter_is_the_trained_model(trained, tiny_path):
    from peft import PeftModel

    from medgpt.modeling.loader import load_model

    base = load_model(str(tiny_path), _placement(), adapter=str(trained["adapter"]))  # resized + mean rows, as trained
    assert base.get_input_embeddings().weight.shape[0] == 49154
    torch.testing.assert_close(base.get_input_embeddings().weight, trained["start"])
    model = PeftModel.from_pretrained(base, trained["adapter"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=trained["x"]).logits, trained["logits"])


@pytest.fixture(scope="module")
def merged(trained):
    from medgpt.stages.merge import merge_run

    return merge_run(trained["run"], "fp32", parity_prompts=1)


def test_merge_keeps_the_token_its_row_and_every_other_row(trained, merged):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = json.loads((merged / "merge_report.json").read_text())
    assert report["greedy_equal"] and report["max_logit_diff"] < 5e-3  # LoRA merged in fp32: rounding only
    card = (merged / "README.md").read_text()  # merged/ carries a model card like every export
    assert "(merged: float32 safetensors)" in card and "mode=merge run=<run>" in card and "Not medical advice" in card
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok("糖尿病", add_special_tokens=False)["input_ids"] == [49152]
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    weight = model.get_input_embeddings().weight.detach()
    assert torch.equal(weight[[49152, 49153]], trained["delta"])  # the trained rows
    assert torch.equal(weight[:49152], trained["base"])  # every other row unchanged
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=trained["x"]).logits, trained["logits"], atol=5e-3, rtol=1e-4)


@pytest.mark.parametrize("weights", ["adapter", "merged"])
def test_serving_generates_the_new_token(trained, merged, weights):
    import shutil

    from medgpt.serving.engine import SamplingParams
    from medgpt.serving.loading import load

    run = trained["run"].parent / f"served-{weights}"
    shutil.copytree(trained["run"], run, ignore=shutil.ignore_patterns("merged" if weights == "adapter" else "none"))
    loaded = load(compose(["model=tiny", f"run={run}", f"paths.root={ROOT}"]))
    try:
        assert loaded.artefacts.weights == weights
        ids = trained["tok"]("糖尿病糖尿病", add_special_tokens=False)["input_ids"]
        assert ids == [49152, 49152]
        got = loaded.engine.generate([ids], SamplingParams(max_tokens=2, temperature=0))[0]
        assert got.text.startswith("糖尿病"), got.text  # greedy: the trained row wins
    finally:
        loaded.engine.close()


def test_vocab_methods_only(tmp_path):
    """dpo/kto/rm/grpo load a second model (reference, reward) without the added tokens: refused before any weights load."""
    from medgpt.stages.training import prepare

    cfg = compose(["model=tiny", "method=dpo", f"paths.root={ROOT}", 'model.add_tokens=["糖尿病"]'])
    with pytest.raises(ConfigError, match=r"^model\.add_tokens adds 1 new tokens, which method=dpo cannot train"):
        prepare(cfg)


# --- end to end through launch.py --------------------------------------------------------------------------------


@pytest.mark.slow
def test_token_survives_train_merge_serve_through_launch(tmp_path, tiny_path):
    rows = [{"conversations": [{"from": "human", "value": f"问题 {i}: 什么是糖尿病?"},
                               {"from": "gpt", "value": f"回答 {i}: 糖尿病是一种代谢疾病。糖尿病 糖尿病"}]} for i in range(24)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    (tmp_path / "tokens.txt").write_text("糖尿病\nthe\n")
    run = tmp_path / "run"
    res = launch("model=tiny", "debug=smoke", f"data.train_files=[{data}]", "data.eval_split=0.2", f"hydra.run.dir={run}",
                 f"model.add_tokens_file={tmp_path / 'tokens.txt'}", "method.learning_rate=0.05", "model.rope_scaling=linear")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 already one token of the vocabulary, skipped: 'the'" in res.stderr + res.stdout
    changes = json.loads((run / "adapter" / BASE_CHANGES).read_text())
    assert changes["vocab_size"] == 49153 and list(changes["new_token_rows"]) == ["49152"]
    assert changes["rope_scaling"] == {"type": "linear", "factor": 2.0}
    from safetensors.torch import load_file

    start = load_file(tiny_path / "model.safetensors")["model.embed_tokens.weight"][changes["new_token_rows"]["49152"]]
    trained = load_file(run / "adapter" / "adapter_model.safetensors")["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    assert (trained[0] - start.mean(0)).abs().max() > 1e-4  # the data used the new id: its row moved from the mean it started at
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size < 400_000
    res = launch("mode=merge", f"run={run}", f"hydra.run.dir={tmp_path / 'merge'}")
    assert res.returncode == 0 and "greedy outputs equal: True" in res.stdout, res.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run / "merged")
    assert tok("糖尿病", add_special_tokens=False)["input_ids"] == [49152]
    model = AutoModelForCausalLM.from_pretrained(run / "merged", dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape[0] == 49153
    assert model.config.rope_parameters["rope_type"] == "linear" and model.config.max_position_embeddings == 4096
    import shutil

    from medgpt.serving.loading import load

    adapter_only = tmp_path / "adapter-only"
    shutil.copytree(run, adapter_only, ignore=shutil.ignore_patterns("merged", "checkpoints"))
    for served, weights in ((run, "merged"), (adapter_only, "adapter")):  # both see the same vocabulary and context
        loaded = load(compose(["model=tiny", f"run={served}", f"paths.root={ROOT}"]))
        try:
            assert loaded.artefacts.weights == weights and loaded.context_length == 4096
            assert loaded.text_ids("糖尿病") == [49152]
        finally:
            loaded.engine.close()


def test_an_untied_output_matrix_gets_its_own_mean_rows_and_trains_them():
    from transformers import LlamaConfig, LlamaForCausalLM

    from medgpt.modeling.adapters import apply_adapter

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))
    inputs, outputs = model.get_input_embeddings().weight.detach().clone(), model.lm_head.weight.detach().clone()
    add_token_rows(model, 102, {100: [3, 4], 101: [5, 6, 7]})
    assert model.get_input_embeddings().weight.shape[0] == model.lm_head.weight.shape[0] == 102
    torch.testing.assert_close(model.get_input_embeddings().weight[101], inputs[[5, 6, 7]].mean(0))
    torch.testing.assert_close(model.lm_head.weight[100], outputs[[3, 4]].mean(0))
    rows = trainable_rows(model, [101, 100])
    assert rows == {"embed_tokens": [100, 101], "lm_head": [100, 101]}
    cfg = compose(["model=tiny"])
    peft = apply_adapter(model, cfg.lora, cfg.model, trainable_token_indices=rows)
    assert sorted(n for n, p in peft.named_parameters() if p.requires_grad and "lora_" not in n) == [
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta.default",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
