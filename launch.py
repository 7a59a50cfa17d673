"""medgpt's entry point: Hydra composes conf/ into a run and medgpt.run dispatches it.

    python launch.py                         # SFT (LoRA) of the embedded SmolLM2-135M on the demo data
    python launch.py method=dpo model=qwen0.5b --cfg job
    python launch.py -m method.learning_rate=1e-4,2e-4 lora.r=8,16
"""

import hydra

from medgpt.config import register_configs
from medgpt.run import run

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg):
    return run(cfg)


if __name__ == "__main__":
    main()
