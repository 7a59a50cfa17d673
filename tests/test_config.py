"""Every option of every config group composes; typos and impossible combinations fail early."""

from __future__ import annotations

import pytest
from conftest import CONF, compose, launch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from medgpt.config import validate
from medgpt.errors import ConfigError

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {"model", "data", "method", "lora", "deepspeed", "hardware", "template", "logger", "debug", "experiment"} <= set(GROUPS)
    assert len(OPTIONS) >= 40


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    if group in ("model", "data", "method", "lora", "deepspeed", "hardware", "template", "logger"):
        assert cfg[group].name == option  # each option names itself (run directories and W&B tags use it)
    OmegaConf.to_container(cfg.method, throw_on_missing=True)  # nothing left MISSING
    if group not in ("hardware", "lora") or option not in ("t4", "qlora"):
        validate(cfg)


def test_required_combinations_compose():
    for overrides in (["method=dpo", "model=qwen0.5b"], ["method=pt", "data=pretrain_demo"],
                      ["lora=qlora", "hardware=t4", "deepspeed=zero2"], ["model=llama3-8b", "hardware=a100", "deepspeed=zero3"]):
        compose(overrides)


@pytest.mark.parametrize("override", ["method.learnin_rate=1", "lora.rank=8", "hardware.batchsize=2", "data.train_file=[x]"])
def test_misspelt_key_fails_at_compose(override):
    with pytest.raises(ConfigCompositionException, match="Could not override"):
        compose([override])
    with pytest.raises(ConfigError, match="unknown key"):  # forced in with '+', it is refused before the run
        validate(compose(["+" + override]))


def test_wrong_type_fails_at_compose():
    with pytest.raises(ConfigCompositionException):
        compose(["method.max_length=long"])


def test_knobs_of_other_methods_are_refused():
    compose(["method=dpo", "method.beta=0.2"])
    with pytest.raises(ConfigCompositionException):
        compose(["method=sft", "method.beta=0.2"])


@pytest.mark.parametrize("overrides,message", [
    (["hardware=t4", "hardware.dtype=bf16"], "t4 has no bf16"),
    (["lora=none", "lora.quantization=4bit"], "needs an adapter"),
    (["method.learning_rate=-1"], r"method\.learning_rate=-1\.0 is invalid: it must be > 0"),
    (["data.eval_split=1.5"], "eval_split"),
    (["hardware.dtype=fp8"], "hardware.dtype"),
    (["method=dpo", "method.loss=kto"], "method.loss"),
    (["mode=dance"], "mode"),
    (["fsdp=full_shard", "fsdp.cpu_offload=true", "hardware=cpu"], "fsdp.cpu_offload=true needs GPUs"),
])
def test_cross_field_rules(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose(overrides))


def test_hardware_presets():
    t4, a100 = compose(["hardware=t4"]).hardware, compose(["hardware=a100"]).hardware
    assert (t4.dtype, t4.attn_implementation) == ("fp16", "sdpa")
    assert (a100.dtype, a100.attn_implementation) == ("bf16", "flash_attention_2")


def test_debug_smoke_is_small():
    cfg = compose(["debug=smoke"])
    assert 0 < cfg.method.max_steps <= 8 and cfg.data.max_samples <= 64


def test_experiment_overrides_groups_and_tag():
    cfg = compose(["experiment=sft_lora_demo"])
    assert cfg.tag == "demo" and cfg.model.name == "smollm2-135m" and cfg.lora.name == "lora"


def test_cli_composes_and_rejects_typo():
    ok = launch("method=dpo", "model=qwen0.5b", "--cfg", "job")
    assert ok.returncode == 0 and "Qwen/Qwen2.5-0.5B-Instruct" in ok.stdout
    bad = launch("method.learnin_rate=1", "--cfg", "job")
    assert bad.returncode != 0 and "learnin_rate" in bad.stderr and "Traceback" not in bad.stderr


def test_unknown_mode_lists_modes(tmp_path):
    res = launch("mode=dance", "model=tiny")
    assert res.returncode == 1
    assert "mode='dance'" in res.stderr and "train, serve" in res.stderr and "Traceback" not in res.stderr
    res = launch("mode=eval", "run=latest", f"paths.output_dir={tmp_path}")  # a mode that reads a run, with none there
    assert res.returncode == 1 and f"run=latest: no completed run under {tmp_path}" in res.stderr and "Traceback" not in res.stderr


def test_each_method_brings_its_default_data_and_the_command_line_wins():
    assert compose(["method=pt"]).data.name == "pretrain_demo"
    assert compose(["method=dpo"]).data.name == "dpo_demo"
    assert compose(["method=sft"]).data.name == "medical_demo"
    assert compose(["method=dpo", "data=dpo_flat"]).data.name == "dpo_flat"
    assert compose(["data=pretrain_demo_zh", "method=pt"]).data.name == "pretrain_demo_zh"
