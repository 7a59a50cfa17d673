"""Continued pretraining (method=pt): arrives with its own issue; composing the config works today."""

from medgpt.errors import ConfigError
from medgpt.registry import register


@register("pt")
def pt(cfg, run_dir):
    raise ConfigError("method=pt is not implemented yet (it comes with the PT/DPO issue); use method=sft for now.")
