"""The labelled-positions path (medgpt.modeling.token_logps, medgpt.stages.token_loss) against the full-logits one:
equal log-probs, losses and gradients (fp32, up to float summation order), and the cases that must fall back."""

from __future__ import annotations

import pytest
import torch
from conftest import compose

from medgpt.data.tokenize import IGNORE
from medgpt.modeling.token_logps import LabelledLogps, fallback_reason, sequence_logps, sequence_logps_from_logits

TOL = dict(rtol=1e-5, atol=1e-5)


def test_chunked_logps_and_their_gradient_equal_log_softmax():
    torch.manual_seed(0)
    hidden = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(11, 5, dtype=torch.float64), torch.randn(11, dtype=torch.float64)
    targets = torch.tensor([0, 3, 10, 3, 7, 1, 2])
    upstream = torch.randn(7, dtype=torch.float64)
    for chunk in (1, 3, 7, 100):  # one row per chunk, a ragged last chunk, exactly one chunk, larger than the input
        fused = LabelledLogps.apply(hidden, weight, bias, targets, chunk)
        (g_fused,) = torch.autograd.grad((fused * upstream).sum(), hidden)
        full = (hidden @ weight.T + bias).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
        (g_full,) = torch.autograd.grad((full * upstream).sum(), hidden)
        torch.testing.assert_close(fused, full)
        torch.testing.assert_close(g_fused, g_full)
    low = LabelledLogps.apply(hidden.detach().bfloat16(), weight.bfloat16(), None, targets, 4)
    assert low.dtype == torch.float32  # bf16 hidden states: the softmax and the log-probs in fp32, as the full path upcasts


def test_no_labelled_position_gives_empty_logps():
    out = LabelledLogps.apply(torch.randn(0, 4, requires_grad=True), torch.randn(6, 4), None, torch.zeros(0, dtype=torch.long), 8)
    assert out.shape == (0,)


@pytest.fixture(scope="module")
def lora_model(tiny_path):
    from medgpt.modeling.adapters import apply_adapter
    from medgpt.modeling.loader import load_model, resolve_placement

    cfg = compose(["model=tiny", "hardware=cpu", "lora=lora", "lora.dropout=0"])
    model = load_model(str(tiny_path), resolve_placement(cfg.hardware, full_finetune=False), None, False)
    model = apply_adapter(model, cfg.lora, cfg.model)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # B = 0 at init would make the adapter a no-op and its gradients trivial
    return model


def padded_batch(vocab: int):
    torch.manual_seed(2)
    ids = torch.randint(5, vocab, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, 5:] = 0
    labels = ids.clone()
    labels[:, :4] = IGNORE  # the prompt
    labels[mask == 0] = IGNORE
    labels[0, 7] = IGNORE  # a hole in the middle (a second user turn)
    return {"input_ids": ids, "attention_mask": mask}, labels


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_sequence_logps_and_lora_gradients_equal_the_full_logits(lora_model):
    inputs, labels = padded_batch(lora_model.config.vocab_size)
    results = {}
    for labelled_only in (True, False):
        lora_model.zero_grad()
        sums, counts = sequence_logps(lora_model, inputs, labels, labelled_only)
        (sums / counts).sum().backward()
        results[labelled_only] = (sums.detach(), counts, lora_grads(lora_model))
    (s1, c1, g1), (s0, c0, g0) = results[True], results[False]
    assert fallback_reason(lora_model) is None and c1.tolist() == c0.tolist() == [7, 5, 1]
    torch.testing.assert_close(s1, s0, **TOL)
    assert set(g1) == set(g0) and len(g1) > 0
    for name in g1:
        torch.testing.assert_close(g1[name], g0[name], **TOL)


def test_lm_trainer_loss_equals_transformers_loss_with_gradient_accumulation_counts(lora_model, tmp_path):
    from transformers import Trainer, TrainingArguments

    from medgpt.stages.token_loss import LMTrainer

    inputs, labels = padded_batch(lora_model.config.vocab_size)
    batch = {**inputs, "labels": labels}
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    losses, grads = {}, {}
    for cls in (LMTrainer, Trainer):
        trainer = cls(model=lora_model, args=args)
        for items in (None, torch.tensor(40)):  # a plain mean, and the sum over the accumulated batch's 40 labelled tokens
            lora_model.zero_grad()
            loss = trainer.compute_loss(lora_model, dict(batch), num_items_in_batch=items)
            loss.backward()
            losses[cls, items is None], grads[cls, items is None] = loss.item(), lora_grads(lora_model)
    for mean in (True, False):
        assert losses[LMTrainer, mean] == pytest.approx(losses[Trainer, mean], rel=1e-6)
        for name, g in grads[Trainer, mean].items():
            torch.testing.assert_close(grads[LMTrainer, mean][name], g, **TOL)
    assert losses[Trainer, False] == pytest.approx(losses[Trainer, True] * 13 / 40, rel=1e-6)  # 13 labelled tokens here


def test_the_full_logits_reference_sums_labelled_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[IGNORE, 3, IGNORE, 5]])
    logps, n = sequence_logps_from_logits(logits, labels)
    lp = logits.log_softmax(-1)
    assert n.item() == 2 and logps.item() == pytest.approx((lp[0, 0, 3] + lp[0, 2, 5]).item(), abs=1e-5)


def test_a_trainable_head_or_an_unknown_model_type_falls_back(lora_model, tiny_path):
    from medgpt.modeling.loader import load_model, resolve_placement

    cfg = compose(["model=tiny", "hardware=cpu"])
    full = load_model(str(tiny_path), resolve_placement(cfg.hardware, full_finetune=True), None, False)
    full.requires_grad_(True)
    assert fallback_reason(full) == "the output head trains (full fine-tuning)"
    full.requires_grad_(False)
    assert fallback_reason(full) is None
    full.config.model_type = "gemma2"  # soft-capped logits
    assert "gemma2" in fallback_reason(full)


def test_fused_loss_false_and_fsdp_take_the_full_logits(lora_model, tmp_path, caplog):
    from transformers import TrainingArguments

    from medgpt.stages.token_loss import LMTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = LMTrainer(model=lora_model, args=args)
    with caplog.at_level("INFO", logger="medgpt.stages.token_loss"):
        assert trainer.labelled_only(lora_model) is True
    off = LMTrainer(model=lora_model, args=args)
    off.fused_loss = False
    assert off.labelled_only(lora_model) is False
    sharded = LMTrainer(model=lora_model, args=args)
    sharded.is_fsdp_enabled = True
    assert sharded.labelled_only(lora_model) is False
    assert "labelled positions only" in caplog.text
