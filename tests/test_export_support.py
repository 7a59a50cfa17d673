"""Run directories made in seconds for the export, quantisation and multi-adapter tests (no training).

`full_run` links a model folder as the run's model/; `adapter_run` saves a LoRA adapter with non-zero, seeded
weights (so each run answers differently) on the tiny model. Both write the summary.json and config.yaml a
completed training run has, and the chatml template beside the weights, as training does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from medgpt.data.templates import SAVED_TEMPLATE, load_template


def _write_run(run: Path, model_name: str, status: str, extra: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(
        {"model": {"name": "tiny", "name_or_path": model_name, "template": "auto", "trust_remote_code": False},
         "template": {"name": "auto"}, "data": {"name": "medical_demo", "train_files": ["data/sft/medical_demo.jsonl"]},
         "method": {"name": "sft"}, "lora": {"name": "lora"}})))
    (run / "summary.json").write_text(json.dumps({"status": status, "version": 2, "stage": "sft", "dtype": "fp32", "steps": 3,
                                                  "template": "chatml", "eval_loss": 10.5, **extra}))


def _save_template(folder: Path) -> None:
    (folder / SAVED_TEMPLATE).write_text(OmegaConf.to_yaml(OmegaConf.create(load_template("chatml").__dict__)))


def full_run(root: Path, model_path: Path, name: str = "full-run", status: str = "completed") -> Path:
    run = root / name
    _write_run(run, str(model_path), status, {"artefact": "model"})
    (run / "model").symlink_to(model_path, target_is_directory=True)
    return run


def adapter_run(root: Path, base: Path, name: str, seed: int, status: str = "completed") -> Path:
    """A completed SFT run of the tiny model whose adapter/ holds random (seeded, non-zero) LoRA weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = root / name
    _write_run(run, "tiny", status, {"artefact": "adapter", "base_model_path": str(base), "adapter": "lora"})
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "lora_B" in name_:
                p.normal_(0, 0.5)  # big enough that the runs' greedy answers differ
    model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "adapter")
    _save_template(run / "adapter")
    return run
