"""`trainer.<field>`: any other TrainingArguments field reaches the Trainer; unknown and medgpt-managed fields are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT, compose

from medgpt.errors import ConfigError


def _args(overrides):
    from medgpt.modeling.loader import resolve_placement
    from medgpt.stages.training import training_arguments

    cfg = compose(["model=tiny", f"paths.root={ROOT}", *overrides])
    return training_arguments(cfg, Path("/tmp/medgpt-test/checkpoints"), resolve_placement(cfg.hardware), has_eval=False)


def test_other_fields_pass_through():
    args = _args(["+trainer.optim=adafactor", "+trainer.adam_beta2=0.95"])
    assert args.optim == "adafactor" and args.adam_beta2 == 0.95
    assert args.learning_rate == 2e-4  # medgpt's own fields still come from their groups


@pytest.mark.parametrize("override,message", [
    ("+trainer.optimm=adafactor", "trainer.optimm is not a TrainingArguments field"),
    ("+trainer.learning_rate=0.1", r"trainer.learning_rate is set by medgpt's own config \(method.learning_rate\)"),
    ("+trainer.per_device_train_batch_size=8", r"\(hardware.batch_size\)"),
])
def test_unknown_or_managed_fields_are_one_sentence(override, message):
    with pytest.raises(ConfigError, match=message):
        _args([override])
