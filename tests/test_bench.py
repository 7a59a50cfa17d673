"""`make bench` (bench/run.py, bench/harness.py): alternation, medians, peak RSS, errors recorded per row, the ratio
arithmetic, latest.json's shape and the README table. Fast tests use stand-in sides (this module's functions, run in
the harness's child processes); the slow one runs BENCH_QUICK=1 (tiny model, 2 steps, 1 repetition) end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))

from bench import run as bench_run  # noqa: E402
from bench.harness import Side, measure_group, ratio  # noqa: E402


def fixed_side(values: list[float], fail_at: int | None = None):
    """A stand-in side: returns `values` in turn, with the time it was asked (to check the alternation)."""
    state = {"i": 0}
    if fail_at == -1:
        raise ValueError("cannot start here")

    def measure() -> dict:
        i = state["i"]
        state["i"] += 1
        if i == fail_at:
            raise RuntimeError("broke at repetition 2")
        time.sleep(0.01)
        return {"value": values[i], "at": time.monotonic_ns()}

    return measure


@pytest.fixture(scope="module")
def measured():
    sides = [Side("medgpt", "test_bench:fixed_side", {"values": [30.0, 10.0, 20.0]}),
             Side("peer", "test_bench:fixed_side", {"values": [5.0, 50.0, 4.0]}),
             Side("broken", "test_bench:fixed_side", {"values": [1.0, 1.0, 1.0], "fail_at": 1}),
             Side("unstartable", "test_bench:fixed_side", {"values": [], "fail_at": -1})]
    return measure_group(sides, 3, log=lambda *a: None)


def test_sides_alternate_and_report_medians_and_peak_rss(measured):
    assert measured["medgpt"]["median"] == 20.0 and measured["peer"]["median"] == 5.0
    stamps = sorted((r["at"], name) for name in ("medgpt", "peer") for r in measured[name]["runs"])
    assert [name for _, name in stamps] == ["medgpt", "peer"] * 3  # A B A B A B, never A A
    assert measured["medgpt"]["peak_rss_mb"] > 5  # a child process' own VmHWM (an interpreter at least)
    assert measured["medgpt"]["error"] is None


def test_a_failing_side_records_its_error_and_no_number(measured):
    assert measured["broken"]["error"] == "RuntimeError: broke at repetition 2" and measured["broken"]["median"] is None
    assert len(measured["broken"]["runs"]) == 1  # not asked again after it failed
    assert measured["unstartable"]["error"] == "ValueError: cannot start here" and measured["unstartable"]["runs"] == []


def test_ratio_is_medgpt_over_peer_and_none_without_both():
    assert ratio(241.0, 194.0) == pytest.approx(1.242) and ratio(None, 3.0) is None and ratio(3.0, 0) is None


def fake(median: float, **run) -> dict:
    return {"median": median, "runs": [{"value": median, **run}], "error": None, "peak_rss_mb": 100.0}


def test_sft_rows_pick_trls_fastest_variant_and_compute_the_fraction_of_the_gemm_peak():
    s = bench_run.settings(quick=True)
    group = next(g for g in bench_run.groups(s) if g["name"] == "sft")
    res = {"medgpt": fake(300.0, n_params=100_000_000, gemm_gflops=400.0), "trl_grouped": fake(240.0), "trl_padding_free": fake(200.0),
           "trl_packing": fake(250.0), "padded_trainer": {**fake(100.0), "peak_rss_mb": 120.0}}
    rows = {r["name"]: r for r in bench_run.rows_of(group, res, s, set(bench_run.ROWS))}
    trl = rows["sft_vs_trl"]
    assert (trl["medgpt"], trl["peer"], trl["ratio"], trl["peer_variant"]) == (300.0, 250.0, 1.2, "trl_packing")
    assert trl["config"]["peer_variants_tokens_per_s"] == {"trl_grouped": 240.0, "trl_padding_free": 200.0, "trl_packing": 250.0}
    padded = rows["sft_vs_padded_trainer"]
    assert (padded["ratio"], padded["peak_rss_mb"]) == (3.0, {"medgpt": 100.0, "peer": 120.0})
    frac = rows["sft_fraction_of_limit"]
    assert frac["medgpt"] == pytest.approx(6 * 100e6 * 300 / 1e9) == 180.0 and frac["peer"] == 400.0 and frac["ratio"] == 0.45
    assert "6 * N * tokens/s" in frac["config"]["formula"]


def test_the_bf16_row_runs_both_sides_in_bf16_and_the_default_row_each_sides_own_default():
    s = bench_run.settings(quick=True)
    groups = {g["name"]: g for g in bench_run.groups(s)}
    sides = {side.name: side for side, _ in groups["sft_bf16"]["sides"]}
    assert set(sides) == {"medgpt", "trl_grouped", "trl_padding_free", "trl_packing"}  # the peer variants of sft_vs_trl
    assert sides["medgpt"].kwargs["overrides"] == [*groups["sft"]["overrides"], "hardware.dtype=bf16"]
    assert all(side.kwargs["bf16"] is True for name, side in sides.items() if name != "medgpt")
    assert all("bf16" not in side.kwargs for side, _ in groups["sft"]["sides"])  # the fp32 pair stays fp32 on both sides
    default = {side.name: side for side, _ in groups["sft_default"]["sides"]}
    assert "hardware=auto" in default["medgpt"].kwargs["overrides"] and "hardware=cpu" not in default["medgpt"].kwargs["overrides"]
    assert "bf16" not in default["trl_default"].kwargs  # SFTConfig's own bf16 default (True)
    ran = {"medgpt": "frozen bfloat16, trained float32, bf16 autocast", "trl_grouped": "frozen float32, trained float32, bf16 autocast"}
    res = {"medgpt": fake(200.0, precision=ran["medgpt"]), "trl_grouped": fake(160.0, precision=ran["trl_grouped"]),
           "trl_padding_free": fake(100.0, precision=ran["trl_grouped"])}
    rows = bench_run.rows_of(groups["sft_bf16"], res, s, set(bench_run.ROWS))
    assert [r["name"] for r in rows] == ["sft_vs_trl_bf16"]  # the padded-trainer and GEMM rows come from the fp32 group only
    r = rows[0]
    assert (r["medgpt"], r["peer"], r["ratio"], r["peer_variant"], r["goal"]) == (200.0, 160.0, 1.25, "trl_grouped", 1.3)
    assert r["config"]["dtype"] == "bf16 autocast (both sides)" and r["config"]["precision"]["medgpt"] == ran["medgpt"]


def test_precision_is_read_from_the_trainer():
    from types import SimpleNamespace

    import torch

    from bench.train_sides import precision

    model = torch.nn.Sequential(torch.nn.Linear(2, 2).bfloat16(), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(bf16=True, fp16=False))
    assert precision(trainer) == "frozen bfloat16, trained float32, bf16 autocast"
    trainer.args.bf16 = False
    model[0].float().requires_grad_(True)
    assert precision(trainer) == "frozen none, trained float32, no autocast"


def test_peers_train_without_gradient_checkpointing_as_medgpt_does():
    from conftest import compose

    from bench.train_sides import _common_args

    cfg = compose(bench_run.train_overrides(bench_run.settings(quick=True), "sft", 2, []))
    args = _common_args(cfg, "/tmp/unused")
    assert args["gradient_checkpointing"] is False is cfg.hardware.gradient_checkpointing  # TRL 1.16 defaults it on


def test_serving_rows_come_from_the_phases_of_each_repetition_and_a_broken_peer_is_recorded():
    s = bench_run.settings(quick=True)
    group = next(g for g in bench_run.groups(s) if g["name"] == "serve")
    medgpt = {"runs": [{"value": 80, "values": {"sequential": 20, "c8": 80, "c32": 200, "mean_completion_tokens": 4}},
                       {"value": 100, "values": {"sequential": 10, "c8": 100, "c32": 220, "mean_completion_tokens": 4}}],
              "median": 90, "error": None, "peak_rss_mb": 500.0}
    peer = {"runs": [], "median": None, "error": "RuntimeError: transformers serve exited with 1", "peak_rss_mb": None}
    rows = {r["name"]: r for r in bench_run.rows_of(group, {"medgpt": medgpt, "transformers_serve": peer}, s, set(bench_run.ROWS))}
    assert (rows["serve_vs_sequential"]["medgpt"], rows["serve_vs_sequential"]["peer"], rows["serve_vs_sequential"]["ratio"]) == (90, 15, 6.0)
    ts = rows["serve_vs_transformers_serve_32"]
    assert (ts["medgpt"], ts["peer"], ts["ratio"]) == (210, None, None)
    assert ts["error"] == "transformers_serve: RuntimeError: transformers serve exited with 1"
    assert "transformers serve exited with 1" in bench_run.markdown({"machine": bench_run.machine(), "results": [ts]})


def test_readme_table_replaces_only_its_own_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nintro\n")
    bench_run.update_readme(readme, "| a |\n")
    bench_run.update_readme(readme, "| b |\n")
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.count(bench_run.README_START) == 1
    assert "| b |" in text and "| a |" not in text


def test_unknown_rows_are_refused_in_one_sentence(monkeypatch, capsys):
    monkeypatch.setenv("BENCH_ROWS", "sft_vs_trl,sft_vs_unsloth")
    assert bench_run.main() == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("BENCH_ROWS names unknown rows ['sft_vs_unsloth']; the rows are: sft_vs_trl,") and "\n" not in err
    assert bench_run.selected_rows("pt_vs_run_clm, eval_vs_lm_eval") == {"pt_vs_run_clm", "eval_vs_lm_eval"}


@pytest.mark.slow
def test_quick_bench_writes_every_row_with_consistent_ratios(tmp_path):
    """BENCH_QUICK=1 end to end (tiny model, every side for real): latest.json's shape and arithmetic."""
    out = tmp_path / "quick.json"
    env = {**os.environ, "BENCH_QUICK": "1", "BENCH_OUT": str(out)}
    proc = subprocess.run([sys.executable, "bench/run.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"cpu", "cpu_count", "torch", "trl", "date"} <= set(result["machine"]) and result["quick"] is True
    rows = {r["name"]: r for r in result["results"]}
    assert set(rows) == set(bench_run.ROWS)
    for r in rows.values():
        assert set(r) >= {"name", "medgpt", "peer", "unit", "ratio", "config"} and isinstance(r["config"], dict)
        assert r.get("error") is None, r
        assert r["medgpt"] > 0 and r["peer"] > 0 and r["ratio"] == pytest.approx(r["medgpt"] / r["peer"], rel=1e-2)  # numbers rounded to 3 decimals
        assert r["peak_rss_mb"]["medgpt"] > 100 and r["peak_rss_mb"]["peer"] > 100
    assert rows["sft_vs_trl"]["peer_variant"] in ("trl_grouped", "trl_padding_free", "trl_packing")
    assert rows["dpo_vs_trl"]["peer_variant"] in ("trl_precompute", "trl_no_precompute")
