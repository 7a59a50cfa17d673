"""Continued pretraining (method=pt).

Supports: `.txt` files (one document per line) and `.jsonl`/`.json` with a `text` field; documents
end with the eos token and are packed into `method.max_length` blocks with per-document position ids
(attention never crosses documents, and a document's first token is never predicted from the one
before); the last partial block is padded with pads out of the loss (`method.drop_last_block=true`
drops it). With `method.packing=false` each document is its own row and every pad position is
excluded from the loss. LoRA / QLoRA / full fine-tuning, `model.init_from`, eval loss and perplexity
before and after.
Refuses: dialogue or preference data (use method=sft or method=dpo).

Writes: metrics.jsonl, plots/loss.png, adapter/ or model/ (tokenizer + chat template), summary.json;
checkpoints/ when interrupted or stopped by the loss watchdog.
"""

from __future__ import annotations

from dataclasses import dataclass

from medgpt.config import MethodConfig
from medgpt.stages.protocol import Stage, register_stage


@dataclass
class PTMethodConfig(MethodConfig):
    packing: bool = True
    drop_last_block: bool = False


def build_data(ctx):
    from medgpt.data.pt_data import build_pt_data

    return build_pt_data(ctx.cfg, ctx.setup.tokenizer, ctx.setup.template)


STAGE = register_stage(Stage(name="pt", schema=PTMethodConfig, formats=("text",), build_data=build_data))
