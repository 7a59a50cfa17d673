"""`make bench`: medgpt side by side with its peers; writes bench/results/latest.json and the table in bench/README.md.

    make bench                                        # every row (~15 min on 2 idle CPU cores before sft_vs_trl_bf16 joined)
    BENCH_ROWS=sft_vs_trl,dpo_vs_trl make bench       # only these rows (their groups' other sides are skipped)
    BENCH_QUICK=1 make bench                          # smoke: tiny model, 2 steps, 1 repetition -> bench/results/quick.json
    BENCH_QUICK=1 BENCH_MODEL=smollm2-135m make bench # the same smoke on the real model (checks its paths, not its speed)

Rows are measured in groups: the sides of a group (medgpt + its peers, each in its own child process) run
alternately A B [C ...] A B ..., `repetitions` times, and each side's median is its number (bench/harness.py).
latest.json: {"machine": {...}, "results": [{"name", "medgpt", "peer", "unit", "ratio", "config", ...}]};
ratio = medgpt / peer (higher is better on both sides). A row whose peer cannot run records the reason in
"error" with null numbers. BENCH_OUT overrides the JSON path; the README table is rewritten by full runs only.
Refuses: an unknown row name in BENCH_ROWS (one sentence naming the known rows, exit 2).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.harness import Side, machine, measure_group, ratio  # noqa: E402

GOALS = {"sft_vs_trl": 1.3, "sft_vs_trl_bf16": 1.3, "sft_default_vs_trl_default": 1.5, "sft_vs_padded_trainer": 2.5, "dpo_vs_trl": 1.5,
         "pt_vs_run_clm": 1.2, "serve_vs_sequential": 5.0, "serve_vs_transformers_serve": 1.5, "serve_vs_transformers_serve_32": 1.5,
         "eval_vs_lm_eval": 2.0}
ROWS = ["sft_vs_trl", "sft_vs_trl_bf16", "sft_default_vs_trl_default", "sft_vs_padded_trainer", "dpo_vs_trl", "pt_vs_run_clm", "serve_vs_sequential",
        "serve_vs_transformers_serve", "serve_vs_transformers_serve_32", "eval_vs_lm_eval", "sft_fraction_of_limit"]
README_START, README_END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"


def settings(quick: bool, model: str | None = None) -> dict:
    """Step counts and sizes: chosen so that the full run takes ~15 minutes on 2 idle CPU cores."""
    if quick:
        return {"model": model or "tiny", "repetitions": 1, "sft_steps": 2, "default_steps": 2, "dpo_steps": 2, "pt_steps": 2, "max_tokens": 4,
                "clients": [8, 32], "eval_limit": 8}
    return {"model": model or "smollm2-135m", "repetitions": 3, "sft_steps": 3, "default_steps": 3, "dpo_steps": 3, "pt_steps": 3,
            "max_tokens": 32, "clients": [8, 32], "eval_limit": 40}


def lora_overrides() -> list[str]:
    return ["lora=lora", "lora.r=8", "lora.alpha=16", "lora.dropout=0"]  # targets: every linear layer but the head


def train_overrides(s: dict, method: str, steps: int, extra: list[str]) -> list[str]:
    return [f"method={method}", f"model={s['model']}", "hardware=cpu", *lora_overrides(), f"method.max_steps={steps}",
            "method.eval_steps=0", "method.sample_questions=0", f"method.logging_steps={steps}", *extra]


def groups(s: dict) -> list[dict]:
    """Each group: its sides (with the rows that need them) and how its rows are made from the medians."""
    sft = train_overrides(s, "sft", s["sft_steps"], ["data=medical_demo", "method.max_length=512", "hardware.batch_size=4"])
    dpo = train_overrides(s, "dpo", s["dpo_steps"], ["data=dpo_demo", "method.max_length=512", "hardware.batch_size=2",
                                                      f"data.max_samples={2 * s['dpo_steps']}"])
    pt = train_overrides(s, "pt", s["pt_steps"], ["data=pretrain_demo", "method.max_length=256", "hardware.batch_size=4"])
    sft_bf16 = [*sft, "hardware.dtype=bf16"]  # both sides bf16 autocast on the CPU (TRL: bf16=True)
    default = [f"model={s['model']}", "method=sft", "hardware=auto", f"method.max_steps={s['default_steps']}", "method.eval_steps=0",
               "method.sample_questions=0"]  # hardware=auto: medgpt's own default (bf16 on CPUs with avx512_bf16/amx_bf16)
    tr = "bench.train_sides"
    trl_variants = ("grouped", "padding_free", "packing")
    return [
        {"name": "sft", "overrides": sft, "sides": [
            (Side("medgpt", f"{tr}:medgpt_stage", {"overrides": sft, "gemm": True}),
             {"sft_vs_trl", "sft_vs_padded_trainer", "sft_fraction_of_limit"}),
            *[(Side(f"trl_{v}", f"{tr}:trl_sft", {"overrides": sft, "variant": v}), {"sft_vs_trl"}) for v in trl_variants],
            (Side("padded_trainer", f"{tr}:padded_trainer", {"overrides": sft}), {"sft_vs_padded_trainer"})]},
        {"name": "sft_bf16", "overrides": sft_bf16, "dtype": "bf16 autocast (both sides)", "sides": [
            (Side("medgpt", f"{tr}:medgpt_stage", {"overrides": sft_bf16}), {"sft_vs_trl_bf16"}),
            *[(Side(f"trl_{v}", f"{tr}:trl_sft", {"overrides": sft_bf16, "variant": v, "bf16": True}), {"sft_vs_trl_bf16"})
              for v in trl_variants]]},
        {"name": "sft_default", "overrides": default, "dtype": "each side's default", "sides": [
            (Side("medgpt", f"{tr}:medgpt_stage", {"overrides": default}), {"sft_default_vs_trl_default"}),
            (Side("trl_default", f"{tr}:trl_sft_default", {"overrides": default, "steps": s["default_steps"]}), {"sft_default_vs_trl_default"})]},
        {"name": "dpo", "overrides": dpo, "sides": [
            (Side("medgpt", f"{tr}:medgpt_stage", {"overrides": dpo, "unit": "pairs"}), {"dpo_vs_trl"}),
            (Side("trl_precompute", f"{tr}:trl_dpo", {"overrides": dpo, "precompute": True}), {"dpo_vs_trl"}),
            (Side("trl_no_precompute", f"{tr}:trl_dpo", {"overrides": dpo, "precompute": False}), {"dpo_vs_trl"})]},
        {"name": "pt", "overrides": pt, "sides": [
            (Side("medgpt", f"{tr}:medgpt_stage", {"overrides": pt}), {"pt_vs_run_clm"}),
            (Side("run_clm", f"{tr}:run_clm", {"overrides": pt}), {"pt_vs_run_clm"})]},
        {"name": "serve", "overrides": [f"model={s['model']}"], "sides": [
            (Side("medgpt", "bench.serve_sides:medgpt_server", {"model": s["model"], "clients": s["clients"], "max_tokens": s["max_tokens"]}),
             {"serve_vs_sequential", "serve_vs_transformers_serve", "serve_vs_transformers_serve_32"}),
            (Side("transformers_serve", "bench.serve_sides:transformers_serve",
                  {"model": s["model"], "clients": s["clients"], "max_tokens": s["max_tokens"]}),
             {"serve_vs_transformers_serve", "serve_vs_transformers_serve_32"})]},
        {"name": "eval", "overrides": [f"model={s['model']}", "eval=mcq", f"eval.limit={s['eval_limit']}"], "sides": [
            (Side("medgpt", "bench.eval_sides:medgpt_eval", {"model": s["model"], "limit": s["eval_limit"]}), {"eval_vs_lm_eval"}),
            (Side("lm_eval", "bench.eval_sides:lm_eval_harness", {"model": s["model"], "limit": s["eval_limit"]}), {"eval_vs_lm_eval"})]},
    ]


def precisions(res: dict) -> dict:
    """{side: the precision its first measurement ran} for the training sides (bench.train_sides.precision)."""
    return {k: v["runs"][0]["precision"] for k, v in res.items() if v.get("runs") and "precision" in v["runs"][0]}


def median_of(side: dict, key: str) -> float | None:
    """The median over a side's repetitions of runs[i]["values"][key] (serving phases)."""
    import statistics

    values = [r["values"][key] for r in side["runs"] if key in r.get("values", {})]
    return statistics.median(values) if values and not side["error"] else None


def row(name: str, ours: float | None, theirs: float | None, unit: str, config: dict, sides: dict, peer: str, **extra) -> dict:
    errors = {k: v["error"] for k, v in sides.items() if k in ("medgpt", peer) and v.get("error")}
    out = {"name": name, "medgpt": _round(ours), "peer": _round(theirs), "unit": unit, "ratio": ratio(ours, theirs), "config": config,
           "peak_rss_mb": {"medgpt": sides.get("medgpt", {}).get("peak_rss_mb"), "peer": sides.get(peer, {}).get("peak_rss_mb")},
           "goal": GOALS.get(name), **extra}
    if errors:
        out["error"] = "; ".join(f"{k}: {v}" for k, v in errors.items())
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def rows_of(group: dict, res: dict, s: dict, wanted: set[str]) -> list[dict]:
    """The result rows a group's measurements make."""
    g, out = group["name"], []
    base = {"model": s["model"], "dtype": group.get("dtype", "fp32 (both sides)"), "repetitions": s["repetitions"],
            "order": "alternating, median", "overrides": group["overrides"], "precision": precisions(res)}
    lora = {"r": 8, "alpha": 16, "dropout": 0, "targets": "every linear layer but the LM head"}
    med = res.get("medgpt", {}).get("median")
    if g in ("sft", "sft_bf16"):
        cfg = {**base, "data": "data/sft/medical_demo_en.jsonl (medgpt's tokenised rows on every side)", "max_length": 512, "batch": 4,
               "optimizer_steps": s["sft_steps"], "lora": lora,
               "counted": "non-padding tokens of training forwards / seconds of the training loop"}
        name = "sft_vs_trl" if g == "sft" else "sft_vs_trl_bf16"
        if name in wanted:
            variants = {k: res[k]["median"] for k in res if k.startswith("trl_") and res[k]["median"]}
            best = max(variants, key=variants.get) if variants else "trl_grouped"
            out.append(row(name, med, variants.get(best), "tokens/s",
                           {**cfg, "peer": f"TRL SFTTrainer, fastest of {sorted(variants) or 'none'}",
                            "peer_variants_tokens_per_s": {k: _round(v) for k, v in variants.items()}}, res, best, peer_variant=best))
        if g == "sft" and "sft_vs_padded_trainer" in wanted:
            out.append(row("sft_vs_padded_trainer", med, res.get("padded_trainer", {}).get("median"), "tokens/s",
                           {**cfg, "peer": "transformers Trainer + DataCollatorForSeq2Seq (padded to the batch's longest), random batches"},
                           res, "padded_trainer"))
        if g == "sft" and "sft_fraction_of_limit" in wanted and res.get("medgpt", {}).get("runs"):
            import statistics

            runs = res["medgpt"]["runs"]
            n = runs[0]["n_params"]
            achieved = statistics.median(6 * n * r["value"] / 1e9 for r in runs)
            peak = statistics.median(r["gemm_gflops"] for r in runs)
            out.append(row("sft_fraction_of_limit", achieved, peak, "GFLOP/s",
                           {**cfg, "formula": "medgpt = 6 * N * tokens/s (N = every weight of the model in the forward, LoRA excluded: "
                                              f"{n:,}); peer = best of 5 2048x2048x2048 fp32 matmuls (2 n^3 FLOP), measured after "
                                              "each repetition in the same process; ratio = fraction of the GEMM peak",
                            "note": "information, not a goal; a LoRA step really costs ~4N FLOP/token (no weight gradients of the frozen base)"},
                           res, "medgpt"))
    elif g == "sft_default" and "sft_default_vs_trl_default" in wanted:
        out.append(row("sft_default_vs_trl_default", med, res.get("trl_default", {}).get("median"), "tokens/s",
                       {**base, "medgpt": "launch.py method=sft (defaults: hardware=auto, data=medical_demo, lora r16 alpha32 dropout "
                                          "0.05, batch 4, max_length 512, length-grouped)",
                        "peer": "SFTTrainer(model in fp32, train_dataset={'messages'}, peft_config=the same LoRA) with SFTConfig "
                                "defaults (batch 8, max_length 1024, random batches, loss on every token, gradient checkpointing, "
                                "bf16=True) and use_cpu=True", "optimizer_steps": s["default_steps"],
                        "counted": "non-padding tokens of training forwards / seconds of the training loop"}, res, "trl_default"))
    elif g == "dpo" and "dpo_vs_trl" in wanted:
        variants = {k: res[k]["median"] for k in res if k.startswith("trl_") and res[k]["median"]}
        best = max(variants, key=variants.get) if variants else "trl_no_precompute"
        out.append(row("dpo_vs_trl", med, variants.get(best), "pairs/s",
                       {**base, "data": f"data/dpo/medical_demo_en.jsonl, first {2 * s['dpo_steps']} pairs (= steps x batch)",
                        "max_length": 512, "batch": 2, "optimizer_steps": s["dpo_steps"], "lora": lora, "loss": "sigmoid, beta 0.1",
                        "reference": "the policy with its adapter disabled", "peer": "TRL DPOTrainer, best of precompute_ref_log_probs on/off",
                        "peer_variants_pairs_per_s": {k: _round(v) for k, v in variants.items()},
                        "counted": "optimiser steps x batch / (training-loop seconds + reference precomputation seconds)"},
                       res, best, peer_variant=best))
    elif g == "pt" and "pt_vs_run_clm" in wanted:
        out.append(row("pt_vs_run_clm", med, res.get("run_clm", {}).get("median"), "tokens/s",
                       {**base, "data": "data/pretrain/medical_demo_en.txt (the same training split)", "max_length": 256, "batch": 4,
                        "optimizer_steps": s["pt_steps"], "lora": lora,
                        "peer": "run_clm recipe: tokenise, concatenate, group_texts into 256-token blocks, Trainer + default_data_collator",
                        "counted": "non-padding tokens of training forwards / seconds of the training loop"}, res, "run_clm"))
    elif g == "serve":
        m, t = res.get("medgpt", {}), res.get("transformers_serve", {})
        cfg = {**base, "requests": "the chat questions of bench/serve_concurrency.py, greedy", "max_tokens": s["max_tokens"],
               "counted": "usage.completion_tokens / wall seconds of the phase",
               "medgpt": "mode=serve defaults (hf engine, serve.max_batch_size "
                         f"{(m.get('runs') or [{}])[0].get('max_batch_size')}), in-process uvicorn",
               "mean_completion_tokens": {"medgpt": median_of(m, "mean_completion_tokens"), "peer": median_of(t, "mean_completion_tokens")}}
        c0, c1 = s["clients"]
        if "serve_vs_sequential" in wanted:
            r = row("serve_vs_sequential", median_of(m, f"c{c0}"), median_of(m, "sequential"), "tokens/s",
                    {**cfg, "peer": f"the same {c0} requests one at a time, same server"}, res, "medgpt")
            out.append(r)
        for name, c in (("serve_vs_transformers_serve", c0), ("serve_vs_transformers_serve_32", c1)):
            if name in wanted:
                peak = max((r.get("server_peak_rss_mb") or 0 for r in t.get("runs", [])), default=None) or None
                r = row(name, median_of(m, f"c{c}"), median_of(t, f"c{c}"), "tokens/s",
                        {**cfg, "clients": c, "peer": "transformers serve --continuous-batching <the same model folder>"}, res, "transformers_serve")
                r["peak_rss_mb"]["peer"] = peak  # the server process, not the client side
                out.append(r)
    elif g == "eval" and "eval_vs_lm_eval" in wanted:
        out.append(row("eval_vs_lm_eval", med, res.get("lm_eval", {}).get("median"), "questions/s",
                       {**base, "data": f"data/eval/mcq/medical_mcq_en.jsonl, first {s['eval_limit']} questions", "batch": 8,
                        "medgpt": "mode=eval eval=mcq (loglik of each option letter)",
                        "peer": "lm_eval.simple_evaluate, task medgpt/evaluation/lm_eval_tasks/medgpt_mcq.yaml on the same prompts",
                        "counted": "questions / seconds of the whole evaluation, model load included on both sides"}, res, "lm_eval"))
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Measured {m['date']} on {m['cpu']} ({m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} threads, "
             f"load average {m['load_average']}), `make bench`{' (BENCH_QUICK: smoke only)' if result.get('quick') else ''}.", "",
             "| row | medgpt | peer | unit | ratio | goal | peak RSS MiB medgpt / peer | note |", "|---|---|---|---|---|---|---|---|"]
    for r in result["results"]:
        fmt = lambda x: "—" if x is None else f"{x:.4g}"  # noqa: E731
        rss_fmt = lambda x: "—" if x is None else f"{x:.0f}"  # noqa: E731
        rss = r.get("peak_rss_mb") or {}
        note = r.get("error") or "; ".join(filter(None, [f"peer: {r['peer_variant']}" if r.get("peer_variant") else "", r.get("note", "")]))
        lines.append(f"| {r['name']} | {fmt(r['medgpt'])} | {fmt(r['peer'])} | {r['unit']} | {fmt(r['ratio'])}"
                     f"{'' if r['ratio'] is None else 'x'} | {'' if r.get('goal') is None else '≥ ' + str(r['goal'])} | "
                     f"{rss_fmt(rss.get('medgpt'))} / {rss_fmt(rss.get('peer'))} | {note} |")
    return "\n".join(lines) + "\n"


def update_readme(path: Path, table: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{README_START}\n{table}{README_END}"
    if README_START in text and README_END in text:
        head, rest = text.split(README_START, 1)
        text = head + block + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Latest results\n\n" + block + "\n"
    path.write_text(text)


def selected_rows(env: str | None) -> set[str]:
    if not env:
        return set(ROWS)
    wanted = {r.strip() for r in env.split(",") if r.strip()}
    unknown = sorted(wanted - set(ROWS))
    if unknown:
        raise SystemExit(f"BENCH_ROWS names unknown rows {unknown}; the rows are: {', '.join(ROWS)}.")
    return wanted


def main() -> int:
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    try:
        wanted = selected_rows(os.environ.get("BENCH_ROWS"))
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    s = settings(quick, os.environ.get("BENCH_MODEL") or None)
    out_path = Path(os.environ.get("BENCH_OUT") or ROOT / "bench" / "results" / ("quick.json" if quick else "latest.json"))
    started, results = time.time(), []
    for group in groups(s):
        sides = [side for side, rows in group["sides"] if rows & wanted]
        if not sides:
            continue
        print(f"== {group['name']}: {', '.join(x.name for x in sides)} x {s['repetitions']} (alternating)", flush=True)
        res = measure_group(sides, s["repetitions"])
        results += rows_of(group, res, s, wanted)
    results.sort(key=lambda r: ROWS.index(r["name"]))
    result = {"machine": machine(), "quick": quick, "settings": s, "seconds": round(time.time() - started, 1), "results": results}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print("\n" + table + f"\nwritten to {out_path}")
    if not quick and os.environ.get("BENCH_README", "1") != "0":
        update_readme(ROOT / "bench" / "README.md", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
