"""The `vllm` engine (serve.engine=vllm): vLLM's AsyncLLMEngine behind medgpt's engine interface.

Only where `import vllm` works (a CUDA machine with `pip install 'medgpt[gpu]'`); anywhere else it
refuses with one sentence. vLLM does its own continuous batching and paged attention. A run's merged/
or model/ folder is served directly; an adapter/ is applied to the base model as a LoRA request
(vLLM reads PEFT adapters; modules_to_save layers are not supported by it — merge the run first).
Prompts arrive as token ids rendered with the run's template, exactly as for the hf engine.
Several runs' adapters (mode=serve run=[dirA,dirB]) become one LoRA request each, picked per request.
`quantize=nf4` asks vLLM for its bitsandbytes in-flight 4-bit loading; int8 and fp4 are refused here.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from medgpt.errors import ConfigError, ModelError
from medgpt.serving.engine import Delta, Engine, Handle

INSTALL = "serve.engine=vllm needs vLLM on a CUDA machine: pip install 'medgpt[gpu]' there, or use serve.engine=hf."


def check(cfg) -> None:
    """The registry's check: vLLM imports, and `quantize` is one vLLM can load."""
    require_vllm()
    quantize = cfg.get("quantize", "none")
    if quantize not in (None, "none", "nf4"):
        raise ConfigError(f"quantize={quantize} with serve.engine=vllm: vLLM loads bitsandbytes 4-bit (quantize=nf4) only; "
                          "use quantize=nf4 or serve.engine=hf.")


def build_engine(cfg, artefacts, tokenizer, stop_ids: list[int], stop_strings: tuple[str, ...], max_batch_size: int):
    """The `vllm` entry of the engine registry."""
    return VLLMEngine(artefacts, stop_ids, stop_strings, cfg)


def require_vllm():
    try:
        import vllm
        from vllm.lora.request import LoRARequest
    except Exception:  # ImportError, or a broken CUDA stack raising something else at import
        raise ConfigError(INSTALL) from None
    return vllm, LoRARequest


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, artefacts, stop_ids: list[int], stop_strings: tuple[str, ...], cfg):
        vllm, LoRARequest = require_vllm()
        self.vllm, self.stop_ids, self.stop_strings = vllm, list(stop_ids), tuple(s for s in stop_strings if s)
        dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(cfg.hardware.dtype, "auto")
        args = dict(model=artefacts.model_path, tokenizer=artefacts.tokenizer_path, dtype=dtype,
                    gpu_memory_utilization=cfg.serve.gpu_memory_utilization, max_num_seqs=max(cfg.serve.max_batch_size, 1),
                    trust_remote_code=artefacts.trust_remote_code)
        if cfg.get("quantize", "none") == "nf4":
            args.update(quantization="bitsandbytes")
        self.lora, self.loras = None, {}
        adapters = dict(artefacts.adapters) or ({"adapter": artefacts.adapter_path} if artefacts.adapter_path else {})
        if adapters:
            rank = max(json.loads((Path(p) / "adapter_config.json").read_text()).get("r", 16) for p in adapters.values())
            args.update(enable_lora=True, max_lora_rank=max(8, 1 << (int(rank) - 1).bit_length()),  # vLLM wants 8, 16, 32, ...
                        max_loras=len(adapters))
            self.loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())}
            self.lora = next(iter(self.loras.values()))
        self.counters = {"requests": 0, "finished": 0, "cancelled": 0, "generated_tokens": 0}
        self._running = 0
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="medgpt-vllm-loop", daemon=True).start()
        try:
            self._engine = asyncio.run_coroutine_threadsafe(self._start(args), self._loop).result()
        except Exception as e:
            raise ModelError(f"vLLM could not load {artefacts.model_path}: {type(e).__name__}: {e}") from None
        self.context_length = int(self._engine_config_len() or 4096)

    async def _start(self, args: dict):
        return self.vllm.AsyncLLMEngine.from_engine_args(self.vllm.AsyncEngineArgs(**args))

    def _engine_config_len(self) -> int | None:
        for path in ("model_config.max_model_len", "vllm_config.model_config.max_model_len"):
            obj = self._engine
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
                return int(obj)
            except (AttributeError, TypeError, ValueError):
                continue
        return None

    def submit(self, prompt_ids, params, loop=None, adapter=None) -> Handle:
        if adapter is not None and adapter not in self.loras:
            raise ValueError(f"adapter {adapter!r} is not served by this engine (it serves: {', '.join(self.loras) or 'none'})")
        handle = Handle(list(prompt_ids), params, loop, adapter=adapter)
        self.counters["requests"] += 1
        asyncio.run_coroutine_threadsafe(self._run(handle), self._loop)
        return handle

    async def _run(self, handle: Handle) -> None:
        p = handle.params
        sampling = self.vllm.SamplingParams(
            n=1, max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k if p.top_k > 0 else -1,
            repetition_penalty=p.repetition_penalty, stop=list(p.stop + self.stop_strings) or None, stop_token_ids=self.stop_ids,
            seed=p.seed, skip_special_tokens=True)
        rid, sent, n, prompt_len = f"medgpt-{handle.id}", 0, 0, len(handle.prompt_ids)
        self._running += 1
        try:
            async for out in self._engine.generate({"prompt_token_ids": handle.prompt_ids}, sampling, rid,
                                                       lora_request=self.loras.get(handle.adapter, self.lora)):
                if handle.cancelled.is_set():
                    await self._engine.abort(rid)
                    self.counters["cancelled"] += 1
                    handle.put(Delta("", "cancelled", prompt_len, n))
                    return
                choice = out.outputs[0]
                text, n = choice.text, len(choice.token_ids)
                delta, sent = text[sent:], len(text)
                if out.finished:
                    self.counters["generated_tokens"] += n
                    reason = choice.finish_reason if choice.finish_reason in ("stop", "length") else "stop"
                    handle.put(Delta(delta, reason, prompt_len, n))
                    return
                if delta:
                    handle.put(Delta(delta, None, prompt_len, n))
        except Exception as e:
            handle.put(Delta("", "error", prompt_len, n, f"{type(e).__name__}: {e}"))
        finally:
            self._running -= 1
            self.counters["finished"] += 1

    def stats(self) -> dict:
        return {**self.counters, "running": self._running}

    def close(self) -> None:
        shutdown = getattr(self._engine, "shutdown", None)
        if callable(shutdown):
            try:
                shutdown()
            except Exception:
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
