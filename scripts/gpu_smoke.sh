#!/usr/bin/env bash
# GPU smoke test (a few minutes on one CUDA GPU): flash-attention 2 in training and in the hf engine, then vLLM serving
# the run (base model + LoRA adapter) through the OpenAI API, plain and streamed. Exits 0 without doing anything where
# there is no NVIDIA GPU; needs `pip install 'medgpt[gpu]'` (flash-attn, vllm) where there is one.
#   scripts/gpu_smoke.sh            # PY=.venv/bin/python by default
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8111}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_smoke: no NVIDIA GPU here; nothing to do"; exit 0
fi
nvidia-smi -L
$PY -c "import flash_attn, vllm; print('flash-attn', flash_attn.__version__, '| vllm', vllm.__version__)" \
  || { echo "gpu_smoke: install the GPU extras first: pip install 'medgpt[gpu]'" >&2; exit 1; }

WORK=$(mktemp -d)
SERVER=""
cleanup() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

echo "== 1. LoRA SFT of smollm2-135m with flash-attention 2 (bf16), a few steps"
$PY launch.py model=smollm2-135m hardware=auto hardware.attn_implementation=flash_attention_2 debug=smoke data=sharegpt \
  hydra.run.dir="$WORK/run"
grep -q "flash_attention_2 attention" "$WORK/run/train.log" || { echo "gpu_smoke: training did not use flash-attention 2" >&2; exit 1; }

echo "== 2. the hf engine on the GPU: batched predict from the run"
printf 'What is a fever?\nIs 38.5 C a fever in adults?\nWhen should a headache be checked?\n' > "$WORK/prompts.txt"
$PY launch.py mode=predict run="$WORK/run" predict.input="$WORK/prompts.txt" predict.output="$WORK/hf.jsonl" \
  generation.temperature=0 generation.max_new_tokens=32 hardware.attn_implementation=flash_attention_2 hydra.run.dir="$WORK/p"
test "$(wc -l < "$WORK/hf.jsonl")" -eq 3

echo "== 3. vLLM serving the run (base + LoRA adapter) on port $PORT"
$PY launch.py mode=serve serve.engine=vllm run="$WORK/run" serve.port="$PORT" serve.gpu_memory_utilization=0.3 \
  hydra.run.dir="$WORK/s" > "$WORK/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { tail -50 "$WORK/serve.log"; echo "gpu_smoke: vLLM server did not start" >&2; exit 1; }
BODY='{"messages": [{"role": "user", "content": "What is a fever?"}], "max_tokens": 32, "temperature": 0}'
curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d "$BODY" | $PY -c '
import json, sys
r = json.load(sys.stdin)
c = r["choices"][0]
assert c["message"]["content"].strip() and c["finish_reason"] in ("stop", "length"), r
assert r["usage"]["completion_tokens"] > 0, r
print("vllm chat:", repr(c["message"]["content"][:80]), r["usage"])'
STREAM=$(curl -sfN "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "What is a fever?"}], "max_tokens": 16, "stream": true}')
printf '%s\n' "$STREAM" | grep -q '^data: \[DONE\]$' || { echo "gpu_smoke: the vLLM stream did not end with [DONE]" >&2; exit 1; }
echo "hf engine (greedy) said: $($PY -c "import json; print(repr(json.loads(open('$WORK/hf.jsonl').readline())['output'][:80]))")"
echo "gpu_smoke: OK"
