"""The `medgpt` console script: the same as `python launch.py` (Hydra overrides and all)."""

from pathlib import Path

import hydra

from medgpt.config import register_configs
from medgpt.run import run

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def main() -> None:
    register_configs()
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)(run)()
