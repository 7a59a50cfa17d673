"""The cost of quantising a run: `python scripts/quantise_table.py run=<run dir> [kinds=none,int8,nf4,fp4] [...]`.

One row per quantize setting (none first: the reference) from medgpt.export.cost.measure — weights' memory,
load time, tokens/s through the hf engine, held-out loss and MCQ accuracy with its Wilson interval (mode=eval's
own suite), with the deltas against the unquantised model — printed as a Markdown table and written to
`<run>/export/quantise_table.json` + `.md`. Timings are only meaningful on an otherwise idle machine: run it
when nothing else is running. Other `key=value` arguments are medgpt overrides (hardware=cpu, eval.limit=50, ...).
Options: kinds=<comma list>, requests=<n> (prompts decoded together, default 8), max_tokens=<n> (default 64), mcq=false.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OWN = ("kinds", "requests", "max_tokens", "mcq")


def main(argv: list[str]) -> int:
    from hydra import compose, initialize_config_dir

    from medgpt.config import register_configs
    from medgpt.export.cost import markdown, measure, with_deltas
    from medgpt.tracking.rundir import resolve_run, trained_run

    own = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in OWN)
    overrides = [a for a in argv if a.split("=", 1)[0] not in OWN]
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=["mode=eval", f"paths.root={ROOT}", *overrides])
    if not cfg.run:
        print("error: pass run=<run directory> (or run=latest)", file=sys.stderr)
        return 1
    run_dir = trained_run(resolve_run(cfg.run, Path(cfg.paths.output_dir)).resolve())
    kinds = own.get("kinds", "none,int8,nf4,fp4").split(",")
    if kinds[0] != "none":
        kinds = ["none", *[k for k in kinds if k != "none"]]
    rows = with_deltas([measure(cfg, k, int(own.get("requests", 8)), int(own.get("max_tokens", 64)), mcq=own.get("mcq", "true") != "false")
                        for k in kinds])
    table = markdown(rows)
    out = run_dir / "export"
    out.mkdir(exist_ok=True)
    (out / "quantise_table.json").write_text(json.dumps({"run": str(run_dir), "rows": rows}, indent=2))
    (out / "quantise_table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
