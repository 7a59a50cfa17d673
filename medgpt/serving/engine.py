"""The engine interface (submit / stream / generate) and the request handle every engine returns.

An engine takes prompt token ids (the caller renders the chat template and tokenises, so every engine
sees exactly the ids training saw) and sampling parameters, and answers with a `Handle`: an iterator,
sync or async, of `Delta`s — new text as it is decoded, the last one carrying `finish_reason`
(stop | length | cancelled | error) and the token counts. `Handle.cancel()` stops the request and frees
its slot (the API calls it when a client disconnects, mid-stream or while waiting for a whole answer).
The engines themselves live in hf_engine.py (transformers, batching concurrent requests) and vllm_engine.py.

Engines are registered declarations (`EngineSpec`): a name, the builder (a "module:function" path, imported
only when that engine is used, or a callable) and an optional check that refuses, in one sentence, an
engine that cannot run here before anything loads. `serve.engine` accepts the registered names (its
config limit reads `engine_names()`), so a new engine is its module plus one `register_engine(...)` call.
A request may name the adapter it wants (`submit(..., adapter=<name>)`) when the engine serves several
runs' adapters on one base model (mode=serve run=[dirA,dirB]).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from medgpt.errors import ConfigError, ModelError

_ids = itertools.count(1)


@dataclass
class SamplingParams:
    max_tokens: int = 256  # new tokens at most (finish_reason "length" when reached)
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling; 1 = off
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the answer
    stop: tuple[str, ...] = ()  # strings that end the answer (not included in it)
    seed: int | None = None  # same seed + same prompt = same answer


@dataclass
class Delta:
    text: str  # text decoded since the previous delta
    finish_reason: str | None = None  # set on the last delta: stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0  # tokens generated so far (the stop token included)
    error: str | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Handle:
    """One submitted request. Iterate it (for / async for) to receive its deltas; cancel() to stop it."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop | None = None  # deltas go to an asyncio queue of this loop when set
    adapter: str | None = None  # the served adapter this request uses (multi-adapter serving); None = the engine's default
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False

    def __post_init__(self):
        self._sync: queue.Queue = queue.Queue()
        self._async: asyncio.Queue | None = asyncio.Queue() if self.loop else None

    def put(self, delta: Delta) -> None:
        """Called by the engine's thread."""
        if self._async is None:
            self._sync.put(delta)
            return
        try:
            self.loop.call_soon_threadsafe(self._async.put_nowait, delta)
        except RuntimeError:  # the consumer's event loop is closed: nobody listens any more
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[Delta]:
        if self._async is not None:
            raise RuntimeError("this handle delivers to an event loop: use `async for`")
        try:
            while not self.finished:
                delta = self._sync.get()
                self.finished = delta.finish_reason is not None
                yield delta
        finally:
            if not self.finished:  # the consumer stopped early (Ctrl-C, a closed generator)
                self.cancel()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            while not self.finished:
                delta = await self._async.get()
                self.finished = delta.finish_reason is not None
                yield delta
        finally:
            if not self.finished:  # client gone (the server cancelled our task): stop generating
                self.cancel()

    def result(self) -> Completion:
        parts, last = [], None
        for last in self:
            parts.append(last.text)
        if last.finish_reason == "error":
            raise ModelError(f"generation failed: {last.error}")
        return Completion("".join(parts), last.finish_reason, last.prompt_tokens, last.completion_tokens)


class Engine(ABC):
    """What every engine offers; `stream` and `generate` are built on `submit`."""

    name: str = "engine"

    @abstractmethod
    def submit(self, prompt_ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None,
               adapter: str | None = None) -> Handle:
        """Queue a request and return at once; the handle yields its deltas. `adapter`: which served adapter answers."""

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[Delta]:
        yield from self.submit(prompt_ids, params)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Completion]:
        """Answer all prompts; they are submitted together, so the engine batches them."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        handles = [self.submit(p, sp) for p, sp in zip(prompts, plist)]
        return [h.result() for h in handles]

    def stats(self) -> dict:
        return {}

    def close(self) -> None:  # noqa: B027 - an engine without resources has nothing to close
        """Stop the engine's worker; pending requests are dropped."""


def sampling_params(generation, **overrides) -> SamplingParams:
    """`generation` (the config's defaults) with the request's non-None overrides on top."""
    values = dict(max_tokens=generation.max_new_tokens, temperature=generation.temperature, top_p=generation.top_p,
                  top_k=generation.top_k, repetition_penalty=generation.repetition_penalty, seed=generation.seed)
    values.update({k: v for k, v in overrides.items() if v is not None})
    stop = values.pop("stop", ())
    values["top_k"] = max(0, int(values["top_k"]))  # OpenAI-style -1 means off, as 0 does
    return SamplingParams(stop=(stop,) if isinstance(stop, str) else tuple(stop), **values)


# --- the engine registry ---------------------------------------------------------------------------------------

Builder = Callable[..., Engine]  # (cfg, artefacts, tokenizer, stop_ids, stop_strings, max_batch_size) -> Engine


@dataclass(frozen=True)
class EngineSpec:
    """A serving engine as a declaration; `serve.engine=<name>` picks it."""

    name: str
    build: str | Builder  # "module:function" (imported on use: composing a config imports no torch) or a callable
    check: str | Callable[[object], None] | None = None  # (cfg) -> None; raises ConfigError when the engine cannot run here
    description: str = ""


ENGINES: dict[str, EngineSpec] = {}


def register_engine(spec: EngineSpec) -> EngineSpec:
    """File `spec` under its name (a second, different spec with the same name is refused)."""
    if spec.name in ENGINES and ENGINES[spec.name] != spec:
        raise ValueError(f"engine {spec.name!r} registered twice")
    ENGINES[spec.name] = spec
    return spec


def engine_names() -> tuple[str, ...]:
    return tuple(ENGINES)


def engine_spec(name: str) -> EngineSpec:
    if name not in ENGINES:
        raise ConfigError(f"serve.engine={name!r} is not one of {', '.join(ENGINES)}.")
    return ENGINES[name]


def resolve_callable(ref: str | Callable) -> Callable:
    """A callable, or the function a "module:function" path names."""
    if callable(ref):
        return ref
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


register_engine(EngineSpec("hf", "medgpt.serving.hf_engine:build_engine",
                           description="transformers; concurrent requests decoded together; bitsandbytes quantize; multi-adapter"))
register_engine(EngineSpec("vllm", "medgpt.serving.vllm_engine:build_engine", "medgpt.serving.vllm_engine:check",
                           description="vLLM on CUDA (pip install 'medgpt[gpu]'); paged attention, continuous batching"))
