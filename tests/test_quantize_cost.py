"""medgpt.export.cost (what scripts/quantise_table.py calls): a row per quantize setting with the deltas against
the unquantised reference, and the Markdown table. Values here are structural (no timing claims on a shared CPU)."""

from __future__ import annotations

import pytest
from conftest import ROOT, compose
from test_export_support import adapter_run

from medgpt.export.cost import markdown, measure, with_deltas


def test_rows_deltas_and_table():
    rows = with_deltas([{"quantize": "none", "memory_mb": 12.3, "load_s": 1.0, "tokens_per_s": 100.0, "heldout_loss": 2.5,
                         "mcq_accuracy": 0.5, "mcq_ci95": [0.4, 0.6]},
                        {"quantize": "nf4", "memory_mb": 6.1, "load_s": 1.5, "tokens_per_s": 40.0, "heldout_loss": 2.75,
                         "mcq_accuracy": 0.45, "mcq_ci95": [0.35, 0.55]}])
    assert rows[1]["heldout_loss_delta"] == 0.25 and rows[1]["mcq_accuracy_delta"] == -0.05 and rows[0]["heldout_loss_delta"] == 0
    assert markdown(rows).splitlines()[-1] == "| nf4 | 6.1 | 1.50 | 40.0 | 2.7500 (+0.2500) | 0.450 [0.350, 0.550] (-0.050) |"


@pytest.mark.slow  # two loads, generation and the held-out loss: ~25 s (quantised loading itself is in test_quantize.py)
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_measure_loads_the_run_quantised(tmp_path, tiny_path):
    run = adapter_run(tmp_path, tiny_path, "sft-cost", seed=5)
    cfg = compose(["mode=eval", "model=tiny", f"paths.root={ROOT}", f"run={run}", "serve.max_batch_size=2"])
    ref, nf4 = (measure(cfg, kind, requests=2, max_tokens=3, mcq=False) for kind in ("none", "nf4"))
    assert (ref["quantize"], nf4["quantize"]) == ("none", "nf4")
    assert nf4["memory_mb"] < ref["memory_mb"] and ref["tokens_per_s"] > 0 and nf4["tokens_per_s"] > 0
    assert 0 < abs(nf4["heldout_loss"] - ref["heldout_loss"]) < 0.5 and 5 < ref["heldout_loss"] < 15  # random tiny model: ~ln(49152)
