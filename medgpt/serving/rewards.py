"""Scoring texts with a reward model (a `method=rm` run): `score_texts`, the serving engine and POST /v1/rewards.

    score_texts(run_dir, texts)  -> list[float]     for mode=eval, GRPO, scripts (the loaded model is kept per run)
    POST /v1/rewards                                 mode=serve run=<rm run> (mounted by medgpt.serving.api)

A text is either a string, scored as it is (tokenised without added special tokens, as /v1/completions does), or a
conversation (a list of {"role", "content"} ending with the assistant's answer), rendered through the run's
chat template exactly as training rendered prompt + response. Texts are scored in batches of `batch_size`, right
padded; the score is read at the last non-pad token (medgpt.stages.reward).

Request:  {"model"?: str, "input": str | [str, ...]}  or  {"model"?: str, "messages": [[{"role", "content"}, ...], ...]}
Answer:   {"object": "list", "data": [{"object": "reward", "index": i, "score": float}, ...], "model": ...,
           "usage": {"prompt_tokens": n, "total_tokens": n}}
Errors are the API's JSON bodies: 400 for a bad body (naming the field), 404 for another model's name, 401 without
the key when one is set. On a reward model /v1/chat/completions and /v1/completions answer 400 ("this run is a
reward model").
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from pathlib import Path
from typing import Optional, Union

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool

from medgpt.errors import DataError, ModelError
from medgpt.serving.engine import Engine
from medgpt.serving.protocol import ChatMessage, RequestError

log = logging.getLogger(__name__)

MAX_ITEMS = 256  # texts per request
REFUSAL = ("this run is a reward model (method=rm): it scores texts and does not generate; "
           "send {\"input\": [text, ...]} or {\"messages\": [[...], ...]} to POST /v1/rewards.")


def is_reward_run(summary) -> bool:
    """Whether a run's summary.json (a dict or RunSummary) says it trained a reward model."""
    return summary.get("stage") == "rm"


class RewardScorer:
    """A loaded reward model with its tokenizer and template; thread-safe, batched scoring."""

    def __init__(self, model, tokenizer, template, batch_size: int = 8, context_length: int = 2048):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.batch_size, self.context_length = max(1, batch_size), context_length
        self.pad_token_id = model.config.pad_token_id
        self._lock = threading.Lock()
        self.scored = 0

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def conversation_ids(self, messages: list[dict], where: str = "the conversation") -> list[int]:
        """A conversation ending with the answer to score, rendered as training rendered prompt + response."""
        from medgpt.data.formats import check_dialogue

        check_dialogue(messages, where, end_with="assistant")
        tok = self.tokenizer
        return self.text_ids(self.template.render(messages, tok.bos_token or "", tok.eos_token or ""))

    def ids_of(self, item, where: str = "the conversation") -> list[int]:
        return self.text_ids(item) if isinstance(item, str) else self.conversation_ids(item, where)

    def score_ids(self, rows: list[list[int]]) -> list[float]:
        import torch

        from medgpt.stages.reward import rewards_of

        device = next(self.model.parameters()).device
        scores: list[float] = []
        with self._lock, torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start:start + self.batch_size]
                width = max(len(r) for r in chunk)
                ids = torch.tensor([r + [self.pad_token_id] * (width - len(r)) for r in chunk], device=device)
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
                scores += rewards_of(self.model, ids, mask).tolist()
            self.scored += len(rows)
        return scores

    def score(self, items: list) -> list[float]:
        """Scores of texts (strings) or conversations (lists of messages)."""
        return self.score_ids([self.ids_of(item) for item in items])


class RewardEngine(Engine):
    """What `mode=serve` holds for a reward-model run: scores, and refuses to generate."""

    name = "hf (reward model)"

    def __init__(self, scorer: RewardScorer):
        self.scorer = scorer
        self.max_batch_size = scorer.batch_size

    def submit(self, prompt_ids, params, loop=None):
        raise ModelError("this run is a reward model (method=rm): it scores texts and does not generate; serve it with "
                         "mode=serve and POST /v1/rewards, or call medgpt.serving.rewards.score_texts.")

    def stats(self) -> dict:
        return {"scored": self.scorer.scored, "max_batch_size": self.scorer.batch_size}


def load_reward_engine(cfg, artefacts, tokenizer, batch_size: int) -> tuple[RewardEngine, int]:
    """The reward model of a run (base + adapter merged in memory, or its full weights) as an engine; and its context."""
    from medgpt.modeling.loader import resolve_placement

    if cfg.serve.engine != "hf":
        raise ModelError(f"serve.engine={cfg.serve.engine} does not serve reward models; use serve.engine=hf.")
    model = _load_model(artefacts.model_path, artefacts.adapter_path, resolve_placement(cfg.hardware), tokenizer,
                        artefacts.trust_remote_code)
    context = int(getattr(model.config, "max_position_embeddings", 0) or tokenizer.model_max_length or 2048)
    return RewardEngine(RewardScorer(model, tokenizer, artefacts.template, batch_size or 8, context)), context


def _load_model(model_path: str, adapter_path: str | None, placement, tokenizer, trust_remote_code: bool = False):
    from medgpt.stages.reward import load_reward_model

    model = load_reward_model(model_path, placement, trust_remote_code=trust_remote_code, pad_token_id=tokenizer.pad_token_id)
    if adapter_path:
        from peft import PeftModel

        try:
            with warnings.catch_warnings():  # peft calls a deprecated transformers property while merging
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelError(f"could not apply the reward adapter {adapter_path} to {model_path}: {e}") from None
    return model.eval()


# --- score_texts: for mode=eval, GRPO and scripts ---

_SCORERS: dict[tuple[str, str], RewardScorer] = {}
_SCORERS_LOCK = threading.Lock()


def load_scorer(run_dir: str | Path, device: str = "auto", batch_size: int = 8) -> RewardScorer:
    """The reward model of `run_dir` (a method=rm run, or a pipeline whose last stage is one), loaded once per process."""
    from medgpt.data.templates import load_saved_template
    from medgpt.modeling.loader import load_tokenizer, resolve_placement
    from medgpt.tracking.rundir import RunDir, trained_run

    path = trained_run(Path(run_dir)).resolve()
    key = (str(path), device)
    with _SCORERS_LOCK:
        if key in _SCORERS:
            return _SCORERS[key]
        run = RunDir(path)
        if not run.summary_path.exists() or not is_reward_run(run.read_summary()):
            raise ModelError(f"{path} is not a reward-model run (its summary.json does not say stage rm); train one with method=rm.")
        found = run.weights()
        if found is None:
            raise ModelError(f"run {path} has no model/ or adapter/ to score with; did its training finish?")
        kind, folder = found
        model_path = run.base_model_path() if kind == "adapter" else str(folder)
        if not model_path or not Path(model_path).exists():
            raise ModelError(f"run {path}: the base model of its adapter ({model_path}) is not there any more.")
        tokenizer = load_tokenizer(str(folder) if (folder / "tokenizer_config.json").exists() else model_path)
        template = load_saved_template(folder)
        if template is None:
            raise ModelError(f"run {path}: {folder.name}/ has no medgpt_template.yaml to render conversations with.")
        from omegaconf import OmegaConf

        hardware = OmegaConf.create({"name": device, "device": device, "dtype": "auto", "attn_implementation": "auto"})
        model = _load_model(model_path, str(folder) if kind == "adapter" else None, resolve_placement(hardware), tokenizer)
        context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        _SCORERS[key] = RewardScorer(model, tokenizer, template, batch_size, context)
        return _SCORERS[key]


def score_texts(run_dir: str | Path, texts: list, device: str = "auto", batch_size: int = 8) -> list[float]:
    """One reward per text: a string is scored as it is, a list of messages is rendered through the run's template.

    The run's model is loaded on first use and kept (per run directory and device) for later calls."""
    if isinstance(texts, str):
        raise TypeError("score_texts takes a list of texts (a single string would be scored character by character)")
    return load_scorer(run_dir, device, batch_size).score(list(texts))


# --- POST /v1/rewards ---

class RewardRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    input: Optional[Union[str, list[str]]] = None
    messages: Optional[list[list[ChatMessage]]] = Field(None, min_length=1, max_length=MAX_ITEMS)

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        texts = [v] if isinstance(v, str) else v
        if texts is not None and (not texts or any(not t for t in texts)):
            raise ValueError("give a non-empty text or a non-empty list of non-empty texts")
        if texts is not None and len(texts) > MAX_ITEMS:
            raise ValueError(f"at most {MAX_ITEMS} texts per request")
        return v

    def items(self) -> tuple[str, list]:
        """(the field the texts came from, the texts: strings or message lists)."""
        if (self.input is None) == (self.messages is None):
            raise RequestError("input", "give either 'input' (a text or a list of texts) or 'messages' (a list of conversations), "
                               "not both and not neither.")
        if self.input is not None:
            return "input", [self.input] if isinstance(self.input, str) else list(self.input)
        return "messages", [[{"role": m.role, "content": m.text()} for m in conv] for conv in self.messages]


def mount_rewards(app, loaded, require_key, metrics) -> None:
    """POST /v1/rewards on a reward-model run; its /v1/chat/completions and /v1/completions answer 400.

    Call it before the generation routes are added: the first route that matches a path answers."""
    scorer: RewardScorer = loaded.engine.scorer
    model_id = loaded.artefacts.name

    async def refuse():
        raise RequestError(None, REFUSAL, code="reward_model")

    for path in ("/v1/chat/completions", "/v1/completions"):
        app.add_api_route(path, refuse, methods=["POST"], dependencies=[Depends(require_key)], include_in_schema=False)

    @app.post("/v1/rewards", dependencies=[Depends(require_key)])
    async def rewards(body: RewardRequest, request: Request):
        started = time.monotonic()
        if body.model not in (None, "", model_id):
            raise RequestError("model", f"model {body.model!r} is not served here (this server serves {model_id!r}).", 404,
                               code="model_not_found")
        field, items = body.items()

        def encode() -> list[list[int]]:
            rows = []
            for i, item in enumerate(items):
                try:
                    ids = scorer.ids_of(item, f"{field}.{i}")
                except DataError as e:
                    raise RequestError(f"{field}.{i}", str(e)) from None
                if not ids:
                    raise RequestError(f"{field}.{i}", f"{field}.{i}: the text has no tokens.")
                if len(ids) > scorer.context_length:
                    raise RequestError(f"{field}.{i}", f"{field}.{i}: {len(ids)} tokens, more than the model's context of "
                                       f"{scorer.context_length} tokens; shorten it.", code="context_length_exceeded")
                rows.append(ids)
            return rows

        rows = await run_in_threadpool(encode)  # tokenising and scoring happen off the event loop
        scores = await run_in_threadpool(scorer.score_ids, rows)
        tokens = sum(len(r) for r in rows)
        metrics.observe(request.url.path, 200, time.monotonic() - started, tokens, 0)
        return {"object": "list", "data": [{"object": "reward", "index": i, "score": s} for i, s in enumerate(scores)],
                "model": model_id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
