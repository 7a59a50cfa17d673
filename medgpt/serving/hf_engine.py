"""The `hf` engine: transformers models, concurrent requests decoded together in one batch.

A single worker thread owns the model; requests arrive through a queue. The first request waits up
to `batch_wait_ms` for others, then all of them (up to `max_batch_size`) are prefilled as one
left-padded batch and decoded step by step with the KV cache. Each row has its own sampling
parameters, seed, stop strings and token budget, streams its own text and finishes on its own (its text is
decoded incrementally; the greedy rows' tokens come from one argmax over the batch and the sampled rows' from one
batched draw on the logits' device, with noise from each request's own seeded generator); a
finished or cancelled row leaves the batch at once (its cache rows are dropped) and a waiting request
takes the free slot: it is prefilled and its cache is left-padded into the running batch. On CPU
this beats one-at-a-time decoding by ~5x at 8 requests (bench/serve_concurrency.py), because a step
costs about the same for 1 row as for 8.

`max_batch_size=0` (serve.max_batch_size's default) picks the batch size from the model and the memory:
as many KV caches of min(context, 4096) tokens as fit beside the weights (CUDA: 90% of the device's
memory; CPU: 70% of the available RAM), clamped to 8..64 (`auto_batch_size`).

A PeftModel holding several adapters (mode=serve run=[dirA,dirB]) answers a mixed batch: each row's
adapter goes to PEFT as `adapter_names` on every forward pass, so requests for different runs still
share one batch and one base model.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import queue
import secrets
import threading
import time

import torch
import torch.nn.functional as F

from medgpt.serving.engine import Delta, Engine, Handle

log = logging.getLogger(__name__)
AUTO_BATCH_RANGE = (8, 64)  # serve.max_batch_size=0: never fewer than the old fixed default, never more than measured useful
AUTO_REQUEST_TOKENS = 4096  # the KV cache budgeted per request: a long prompt plus a long answer (at most the context)


def kv_bytes_per_token(config, bytes_per_element: int) -> int:
    """Bytes of KV cache one token takes in every layer (keys and values), from a transformers config; 0 if unknown."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        return 0
    return int(2 * layers * kv_heads * head_dim * bytes_per_element)


def auto_batch_size(n_params: float, bytes_per_param: float, kv_bytes_per_token: int, context: int, memory_bytes: float,
                    fraction: float = 0.9, limits: tuple[int, int] = AUTO_BATCH_RANGE) -> int:
    """How many requests to decode together: the KV caches of `context` tokens that fit in `fraction` of
    `memory_bytes` (the memory for weights and cache) once the weights are in, clamped to `limits`."""
    lo, hi = limits
    per_request = kv_bytes_per_token * context
    if per_request <= 0:
        return lo  # an architecture we cannot size: the conservative end
    room = memory_bytes * fraction - n_params * bytes_per_param
    return int(min(hi, max(lo, room // per_request)))


def _memory_for(device: torch.device, weight_bytes: int) -> tuple[float, float]:
    """(memory for weights + cache, the fraction of it to use) on `device`, the loaded weights counted as usable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_allocated(device), 0.9
    import psutil

    return psutil.virtual_memory().available + weight_bytes, 0.7  # the CPU's RAM is shared with everything else


class _Row:
    """One request inside the running batch: its tokens, its sampler state and what it has streamed."""

    def __init__(self, handle: Handle, stop_strings: tuple[str, ...]):
        self.handle, self.params = handle, handle.params
        self.ids: list[int] = []  # generated tokens, the stop token excluded
        self.n = 0  # tokens generated, the stop token included
        self.seen = set(handle.prompt_ids)  # for the repetition penalty
        self.sent = 0  # characters streamed so far
        self.text = ""  # the text of ids[:read] (whole characters), grown by `decoded` from the newest tokens only
        self.prefix = self.read = 0  # ids[prefix:read] are decoded again beside the new ones, so joins render as in a full decode
        self.last = 0  # the token fed at the next step
        self.done = False
        self.stops = tuple(s for s in (*self.params.stop, *stop_strings) if s)
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def greedy(self) -> bool:
        """Picks the most likely token, untouched by a repetition penalty (the batch decides these rows at once)."""
        p = self.params
        return (p.temperature < 1e-5 or p.top_k == 1) and not (p.repetition_penalty != 1.0 and self.seen)

    def penalise(self, logits: torch.Tensor) -> None:
        """The repetition penalty (CTRL, Keskar et al. 2019) on this row's logits, in place, on their device."""
        p = self.params
        if p.repetition_penalty != 1.0 and self.seen:
            idx = torch.tensor(sorted(self.seen), device=logits.device)
            picked = logits[idx]
            logits[idx] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)

    def noise(self, vocab: int) -> torch.Tensor:
        """Exp(1) noise from this request's own generator (on the CPU: a seed gives the same draw on every device)."""
        return torch.empty(vocab).exponential_(generator=self.generator)

    def text_update(self, tokenizer, final: bool) -> tuple[str, bool]:
        """(new text to stream, a stop string was hit). Holds back a tail that may become a stop string."""
        text = self.decoded(tokenizer)
        if self.stops:
            hits = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
            if hits:
                cut = min(hits)
                return text[self.sent:cut], True
        if final:
            return text[self.sent:], False
        safe = len(text) - text.endswith("\ufffd")  # an incomplete multi-byte character waits for the next token
        hold = 0  # the longest tail that is the start of a stop string
        for s in self.stops:
            hold = max([hold] + [k for k in range(1, min(len(s) - 1, safe) + 1) if text[:safe].endswith(s[:k])])
        safe -= hold
        return text[self.sent:max(safe, self.sent)], False


    def decoded(self, tokenizer) -> str:
        """The text of all generated tokens, equal to decoding `ids` whole, but decoding only the tokens since the last
        complete character (the incremental detokenisation of TGI / vLLM): each step costs a few tokens, not the answer."""
        if self.read == len(self.ids):
            return self.text
        before = tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if not after.startswith(before):  # a tokenizer whose pieces render differently side by side: decode it whole
            return tokenizer.decode(self.ids, skip_special_tokens=True)
        tail = after[len(before):]
        if tail.endswith("\ufffd"):  # an incomplete multi-byte character: keep its tokens for the next step
            return self.text + tail
        self.text += tail
        self.prefix, self.read = self.read, len(self.ids)
        return self.text


def pick_tokens(rows: list[_Row], logits: torch.Tensor) -> list[int]:
    """The next token of each row: greedy rows from one argmax over the batch (one transfer from the device for all of
    them), the others sampled together by `sample_tokens` (temperature, top-k/top-p, repetition penalty, per-request seed)."""
    greedy = [i for i, r in enumerate(rows) if r.greedy]
    tokens: list[int] = [0] * len(rows)
    if greedy:
        picked = logits[greedy].argmax(-1).tolist() if len(greedy) < len(rows) else logits.argmax(-1).tolist()
        for i, t in zip(greedy, picked):
            tokens[i] = t
    others = [i for i, r in enumerate(rows) if not r.greedy]
    if others:
        for i, t in zip(others, sample_tokens([rows[i] for i in others], logits[others].float())):
            tokens[i] = t
    return tokens


def sample_tokens(rows: list[_Row], logits: torch.Tensor) -> list[int]:
    """One token per row from `logits` (rows × vocab, a copy: changed in place), every row at once on the logits' device.

    Temperature, top-k and top-p are per-row tensors; a row at (near) zero temperature or top_k=1 takes the argmax of
    its penalised logits. The draw is the exponential race (argmax of p / q with q ~ Exp(1), the Gumbel-max trick in
    another form, as vLLM samples), with q from each request's own seeded generator: one transfer for the batch, no
    per-row softmax copied to the CPU, and a seed gives the same answer however the batch is made up."""
    for row, row_logits in zip(rows, logits):
        row.penalise(row_logits)
    n, vocab = logits.shape
    device = logits.device
    temperature = torch.tensor([r.params.temperature for r in rows], device=device)
    top_k = torch.tensor([r.params.top_k for r in rows], device=device)
    top_p = torch.tensor([r.params.top_p for r in rows], device=device, dtype=logits.dtype)
    argmax = (temperature < 1e-5) | (top_k == 1)  # (near) zero temperature = greedy; dividing by it would overflow
    logits = logits / torch.where(argmax, torch.ones_like(temperature), temperature).unsqueeze(1).to(logits.dtype)
    limited = (top_k > 0) & (top_k < vocab)
    if bool(limited.any()):
        k = int(top_k[limited].max())
        kth = torch.topk(logits, k, dim=-1).values.gather(1, (top_k.clamp(1, k) - 1).unsqueeze(1))
        logits = logits.masked_fill(limited.unsqueeze(1) & (logits < kth), float("-inf"))
    if bool((top_p < 1.0).any()):
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = (probs.cumsum(-1) - probs) > top_p.unsqueeze(1)  # keep the smallest set reaching top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    q = torch.stack([r.noise(vocab) for r in rows]).to(device)
    sampled = (logits.softmax(-1) / q).argmax(-1)
    return torch.where(argmax, logits.argmax(-1), sampled).tolist()


class HFEngine(Engine):
    name = "hf"

    def __init__(self, model, tokenizer, stop_ids: list[int], stop_strings: tuple[str, ...] = (), max_batch_size: int = 8,
                 batch_wait_ms: int = 20, context_length: int | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.stop_ids, self.stop_strings = set(stop_ids), stop_strings
        self.batch_wait = batch_wait_ms / 1000
        self.context_length = context_length or 2048
        self.device = next(model.parameters()).device
        self.auto_batch = max_batch_size <= 0
        self.max_batch_size = self._auto_batch_size() if self.auto_batch else max_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers 5.2x renamed it
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        peft_config = getattr(model, "peft_config", None) or {}
        self.adapters = list(peft_config) if len(peft_config) > 1 else []  # several served adapters: chosen per row
        self._inbox: queue.Queue = queue.Queue()
        self._rows: list[_Row] = []
        self._forwarding: list[_Row] = []  # the rows of the forward pass under way (in the order of the batch)
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._joinable = True
        self.counters = {"requests": 0, "finished": 0, "cancelled": 0, "errors": 0, "generated_tokens": 0, "prompt_tokens": 0,
                         "decode_steps": 0, "decode_rows": 0, "max_batch": 0}
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="medgpt-hf-engine", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a daemon thread inside torch at interpreter exit aborts the process

    # --- the public side -------------------------------------------------------------------------
    def submit(self, prompt_ids, params, loop=None, adapter=None) -> Handle:
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"adapter {adapter!r} is not served by this engine (it serves: {', '.join(self.adapters) or 'none'})")
        handle = Handle(list(prompt_ids), params, loop, adapter=adapter)
        self.counters["requests"] += 1
        self._inbox.put(handle)
        return handle

    def stats(self) -> dict:
        return {**self.counters, "running": sum(not r.done for r in list(self._rows)), "waiting": self._inbox.qsize(),
                "max_batch_size": self.max_batch_size}

    def _auto_batch_size(self) -> int:
        params = list(self.model.parameters())
        n_params = sum(p.numel() for p in params)
        weight_bytes = sum(p.numel() * p.element_size() for p in params)
        try:
            element = torch.empty((), dtype=self.model.dtype).element_size()
        except (AttributeError, TypeError):
            element = 2
        kv = kv_bytes_per_token(self.model.config, element)
        try:
            memory, fraction = _memory_for(self.device, weight_bytes)
        except Exception as e:  # no psutil, an odd device: the conservative end
            log.warning("cannot measure free memory (%s); serving batches of %d", e, AUTO_BATCH_RANGE[0])
            return AUTO_BATCH_RANGE[0]
        tokens = min(self.context_length, AUTO_REQUEST_TOKENS)
        size = auto_batch_size(n_params, weight_bytes / max(n_params, 1), kv, tokens, memory, fraction)
        log.info("max_batch_size=auto: %d (%.2f GB weights, %d bytes of KV cache a token, %d tokens a request, %.1f GB memory x %.1f)",
                 size, weight_bytes / 1e9, kv, tokens, memory / 1e9, fraction)
        return size

    def close(self) -> None:
        if self._closed and not self._thread.is_alive():
            return
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout=10)

    # --- the worker thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        try:
            self._serve()
        finally:  # closed: nobody may wait forever for an answer
            for row in self._rows:
                self._finish(row, "", "cancelled")
            self._rows = []
            while not self._inbox.empty():
                item = self._inbox.get_nowait()
                if item is not None:
                    self._finish(_Row(item, ()), "", "cancelled")

    def _serve(self) -> None:
        while not self._closed:
            try:
                if not self._rows:
                    first = self._inbox.get()
                    if first is None:
                        return
                    self._admit([first] + self._take(self.max_batch_size - 1, self.batch_wait))
                else:
                    free = self.max_batch_size - len(self._rows)
                    if free > 0 and self._joinable:
                        new = self._take(free, 0.0)
                        if new:
                            self._admit(new)
                    if self._rows:
                        self._step()
            except Exception as e:  # a failing batch must not kill the server: fail its requests, go on
                log.exception("generation failed")
                for row in self._rows:
                    self._finish(row, "", "error", error=f"{type(e).__name__}: {e}")
                self._rows, self._cache, self._mask = [], None, None

    def _take(self, limit: int, wait: float) -> list[Handle]:
        out: list[Handle] = []
        deadline = time.monotonic() + wait
        while len(out) < limit:
            try:
                remaining = deadline - time.monotonic()
                item = self._inbox.get(timeout=remaining) if remaining > 0 else self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._closed = True
                break
            out.append(item)
        return out

    def _forward(self, input_ids, mask, cache):
        """One forward pass of the rows in `self._forwarding` (their adapters, when several are served)."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        extra = {"adapter_names": [r.handle.adapter or self.adapters[0] for r in self._forwarding]} if self.adapters else {}
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_kw: cache}, **self._keep, **extra)
        cache = getattr(out, self._cache_kw, None)
        return out.logits[:, -1, :].float(), cache if cache is not None else out.past_key_values

    def _admit(self, handles: list[Handle]) -> None:
        """Prefill new requests as one left-padded batch and join them to the running batch."""
        live = []
        for h in handles:
            if h.cancelled.is_set():
                self._finish(_Row(h, ()), "", "cancelled")
            else:
                live.append(h)
        if not live:
            return
        width = max(len(h.prompt_ids) for h in live)
        ids = torch.tensor([[self.pad_id] * (width - len(h.prompt_ids)) + h.prompt_ids for h in live], device=self.device)
        mask = torch.tensor([[0] * (width - len(h.prompt_ids)) + [1] * len(h.prompt_ids) for h in live], device=self.device)
        rows = [_Row(h, self.stop_strings) for h in live]
        try:
            self._forwarding = rows
            logits, cache = self._forward(ids, mask, None)
        except Exception as e:  # e.g. out of memory for a huge prompt: fail these requests, keep the running batch
            log.exception("prefill failed")
            for row in rows:
                self._finish(row, "", "error", error=f"{type(e).__name__}: {e}")
            return
        for h in live:
            self.counters["prompt_tokens"] += len(h.prompt_ids)
        if self._rows:
            self._cache, self._mask = _merge(self._cache, self._mask, cache, mask)
        else:
            self._cache, self._mask = cache, mask
            self._joinable = all(type(layer).__name__ == "DynamicLayer" for layer in getattr(cache, "layers", [None]))
        self._rows += rows
        self._advance(rows, logits)

    def _step(self) -> None:
        for row in self._rows:
            if row.handle.cancelled.is_set():
                self._finish(row, "", "cancelled")
        self._compact()
        if not self._rows:
            return
        ids = torch.tensor([[r.last] for r in self._rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        self._forwarding = self._rows
        logits, self._cache = self._forward(ids, self._mask, self._cache)
        self.counters["decode_steps"] += 1
        self.counters["decode_rows"] += len(self._rows)
        self.counters["max_batch"] = max(self.counters["max_batch"], len(self._rows))
        self._advance(self._rows, logits)

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        for row, token in zip(rows, pick_tokens(rows, logits)):  # logits: one row per entry of `rows`
            row.n += 1
            row.last = token
            self.counters["generated_tokens"] += 1
            if token in self.stop_ids:
                text, _ = row.text_update(self.tokenizer, final=True)
                self._finish(row, text, "stop")
                continue
            row.ids.append(token)
            row.seen.add(token)
            out_of_room = row.n >= row.params.max_tokens or len(row.handle.prompt_ids) + row.n >= self.context_length
            text, hit = row.text_update(self.tokenizer, final=out_of_room)
            if hit or out_of_room:
                self._finish(row, text, "stop" if hit else "length")
            elif text:
                row.sent += len(text)
                row.handle.put(Delta(text, None, len(row.handle.prompt_ids), row.n))
        self._compact()

    def _finish(self, row: _Row, text: str, reason: str, error: str | None = None) -> None:
        row.done = True  # first the bookkeeping, then the news: a consumer that reads stats() next sees it
        self.counters["finished"] += 1
        self.counters["cancelled"] += reason == "cancelled"
        self.counters["errors"] += reason == "error"
        row.handle.put(Delta(text, reason, len(row.handle.prompt_ids), row.n, error))

    def _compact(self) -> None:
        """Drop finished rows from the batch and the cache; trim columns that are padding in every row."""
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        first = int(self._mask.any(0).int().argmax())
        if first > 0 and self._joinable:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self._mask = self._mask[:, first:]


def _merge(cache, mask, new_cache, new_mask):
    """Join two left-padded batches: pad the shorter on the left (keys, values, mask) and stack the rows."""
    width = max(mask.shape[1], new_mask.shape[1])
    for old, new in zip(cache.layers, new_cache.layers):
        for name in ("keys", "values"):
            a, b = getattr(old, name), getattr(new, name)
            a = F.pad(a, (0, 0, width - a.shape[-2], 0))
            b = F.pad(b, (0, 0, width - b.shape[-2], 0))
            setattr(old, name, torch.cat([a, b], dim=0))
    mask = torch.cat([F.pad(mask, (width - mask.shape[1], 0)), F.pad(new_mask, (width - new_mask.shape[1], 0))], dim=0)
    return cache, mask


def build_engine(cfg, artefacts, tokenizer, stop_ids: list[int], stop_strings: tuple[str, ...], max_batch_size: int) -> HFEngine:
    """The `hf` entry of the engine registry: the model as medgpt.serving.loading loads it (quantize, adapters), batched."""
    from medgpt.serving.loading import load_hf_model

    model = load_hf_model(cfg, artefacts)
    context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length or 2048)
    return HFEngine(model, tokenizer, stop_ids, stop_strings, max_batch_size, cfg.serve.batch_wait_ms, context)
