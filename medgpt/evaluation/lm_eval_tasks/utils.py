"""Dataset loader of the medgpt_mcq lm-eval task: the JSONL medgpt exported (export_prompts), as its test split."""

from __future__ import annotations


def load_prompts(prompts: str, **_):
    import datasets

    return datasets.DatasetDict({"test": datasets.load_dataset("json", data_files=str(prompts), split="train")})
