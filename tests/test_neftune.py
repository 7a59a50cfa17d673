"""NEFTune (method.neftune_noise_alpha): plumbed to the Trainer, noise on the input embeddings while training only."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import compose

from medgpt.config import validate
from medgpt.errors import ConfigError

ALPHA = 5.0


def _args(tmp_path, *overrides):
    from medgpt.modeling.loader import Placement
    from medgpt.stages.training import training_arguments

    cfg = compose(["model=tiny", "method.max_steps=1", "hardware.batch_size=1", *overrides])
    validate(cfg)
    return training_arguments(cfg, tmp_path / "checkpoints", Placement("cpu", torch.float32, "sdpa"), False)


def test_the_knob_reaches_the_training_arguments_and_nothing_else_sets_it(tmp_path):
    assert _args(tmp_path, f"method.neftune_noise_alpha={ALPHA}").neftune_noise_alpha == ALPHA
    assert _args(tmp_path).neftune_noise_alpha is None  # off by default
    with pytest.raises(ConfigError, match=r"^trainer\.neftune_noise_alpha is set by medgpt's own config \(method\.neftune_noise_alpha\)"):
        _args(tmp_path, "+trainer.neftune_noise_alpha=5")
    with pytest.raises(ConfigError, match=r"^method\.neftune_noise_alpha would also add noise to the completions method=grpo samples"):
        validate(compose(["model=tiny", "method=grpo", f"method.neftune_noise_alpha={ALPHA}"]))


def test_embeddings_get_bounded_noise_in_training_only(tmp_path, tiny_path):
    """One Trainer step with the run's arguments: the embedding output seen by the model differs from the plain lookup
    by uniform noise within alpha / sqrt(tokens x hidden); before and after train() (eval mode, hook removed) it is exact."""
    from transformers import Trainer

    from medgpt.modeling.adapters import apply_adapter
    from medgpt.modeling.loader import Placement, load_model

    cfg = compose(["model=tiny", "lora.dropout=0"])
    model = apply_adapter(load_model(str(tiny_path), Placement("cpu", torch.float32, "sdpa")), cfg.lora, cfg.model)
    embed = model.get_input_embeddings()
    seen = []  # (training mode, the first decoder layer's input): what the model computes on, after any NEFTune hook

    def first_layer_input(module, args, kwargs):
        seen.append((module.training, (args[0] if args else kwargs["hidden_states"]).detach().clone()))

    model.base_model.model.model.layers[0].register_forward_pre_hook(first_layer_input, with_kwargs=True)
    ids = torch.arange(100, 164).unsqueeze(0)
    row = {"input_ids": ids[0], "labels": ids[0], "attention_mask": torch.ones(64, dtype=torch.long)}
    trainer = Trainer(model=model, args=_args(tmp_path, f"method.neftune_noise_alpha={ALPHA}"), train_dataset=[row])
    assert trainer.neftune_noise_alpha == ALPHA
    trainer.train()
    training = [hidden for train_mode, hidden in seen if train_mode]
    assert training, "no training-mode forward"
    bound = ALPHA / math.sqrt(64 * embed.weight.shape[1])
    for hidden in training:
        noise = hidden - embed.weight.detach()[ids]
        assert noise.abs().max() <= bound * (1 + 1e-5) and noise.abs().max() > 0.9 * bound  # uniform(-bound, bound), 4096 draws
        assert abs(noise.mean().item()) < 0.1 * bound
    seen.clear()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert torch.equal(seen[-1][1], embed.weight.detach()[ids])  # eval (and the hook gone after train()): no noise
