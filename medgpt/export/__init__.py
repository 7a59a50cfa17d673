"""mode=export: a finished run's model as GGUF (llama.cpp / Ollama), a bitsandbytes 4/8-bit folder or merged
fp16/bf16 safetensors (vLLM), each verified by a round trip and carrying a model card (modes.py has the rest)."""
