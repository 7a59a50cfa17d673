"""Preference optimisation (method=dpo): arrives with its own issue; composing the config works today."""

from medgpt.errors import ConfigError
from medgpt.registry import register


@register("dpo")
def dpo(cfg, run_dir):
    raise ConfigError("method=dpo is not implemented yet (it comes with the PT/DPO issue); use method=sft for now.")
