"""The hf engine on the tiny model: exact greedy output, per-row budgets and stops, batching, joining, cancelling."""

from __future__ import annotations

import pytest
import torch
from test_serving_support import load_tiny

from medgpt.serving.engine import SamplingParams
from medgpt.serving.hf_engine import HFEngine

QUESTIONS = ["What is a fever?", "Is 38.5 C a fever in adults, and when should I see a doctor about it?", "Headache after a fall?",
             "How much water should I drink each day when I have a cold and a fever?"]


@pytest.fixture(scope="module")
def loaded():
    loaded, _ = load_tiny("serve.max_batch_size=4")
    yield loaded
    loaded.engine.close()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def reference(loaded, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy generate, one prompt, no padding."""
    out = loaded.engine.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=n,
                                       do_sample=False, eos_token_id=loaded.stop_ids, pad_token_id=loaded.tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def test_greedy_equals_transformers_generate(loaded):
    ids = loaded.chat_ids([{"role": "user", "content": QUESTIONS[1]}])
    ref = reference(loaded, ids, 12)
    got = loaded.engine.generate([ids], greedy(12))[0]
    expected = [t for t in ref if t not in loaded.stop_ids]
    assert got.text == loaded.tokenizer.decode(expected, skip_special_tokens=True)
    assert got.completion_tokens == len(ref) and got.prompt_tokens == len(ids)
    assert got.finish_reason == ("stop" if ref[-1] in loaded.stop_ids else "length")


def test_batched_rows_match_single_rows_and_keep_their_own_budget(loaded):
    prompts = [loaded.chat_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
    budgets = [3, 9, 5, 7]
    singles = [loaded.engine.generate([p], greedy(n))[0] for p, n in zip(prompts, budgets)]
    before = loaded.engine.stats()["decode_steps"]
    batch = loaded.engine.generate(prompts, [greedy(n) for n in budgets])
    assert [b.text for b in batch] == [s.text for s in singles]  # left padding changes nothing
    for b, n in zip(batch, budgets):
        assert b.completion_tokens == n if b.finish_reason == "length" else b.completion_tokens < n
    # the four rows were decoded together: fewer steps than the budgets added up
    assert loaded.engine.stats()["decode_steps"] - before < sum(budgets) - len(budgets)


def test_stop_string_cuts_the_answer_and_is_never_streamed(loaded):
    ids = loaded.chat_ids([{"role": "user", "content": QUESTIONS[0]}])
    full = loaded.engine.generate([ids], greedy(16))[0].text
    assert len(full) > 8
    stop = full[len(full) // 2:len(full) // 2 + 3]
    deltas = list(loaded.engine.stream(ids, greedy(16, stop=(stop,))))
    text = "".join(d.text for d in deltas)
    assert text == full[:full.index(stop)] and deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_seeded_sampling_is_reproducible(loaded):
    ids = loaded.chat_ids([{"role": "user", "content": QUESTIONS[2]}])
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=40, repetition_penalty=1.2, seed=7)
    first, second = (loaded.engine.generate([ids], params)[0] for _ in range(2))
    assert first.text == second.text and first.completion_tokens == second.completion_tokens


def test_a_request_joining_a_running_batch_gets_the_same_answer(loaded):
    a = loaded.chat_ids([{"role": "user", "content": QUESTIONS[3]}])
    b = loaded.chat_ids([{"role": "user", "content": QUESTIONS[0]}])
    alone = loaded.engine.generate([b], greedy(8))[0]
    long_run = loaded.engine.submit(a, greedy(200))
    stream = iter(long_run)
    next(stream)  # a is being decoded now; b joins its batch
    joined = loaded.engine.submit(b, greedy(8)).result()
    long_run.cancel()
    assert joined.text == alone.text and joined.completion_tokens == alone.completion_tokens
    assert list(stream)[-1].finish_reason == "cancelled"


def test_cancel_frees_the_slot_for_a_waiting_request(loaded):
    engine = HFEngine(loaded.engine.model, loaded.tokenizer, loaded.stop_ids, max_batch_size=1, batch_wait_ms=0,
                      context_length=loaded.context_length)
    try:
        ids = loaded.chat_ids([{"role": "user", "content": QUESTIONS[1]}])
        first = engine.submit(ids, greedy(1000))
        deltas = iter(first)
        next(deltas)
        waiting = engine.submit(ids, greedy(4))  # the only slot is taken: it waits
        first.cancel()
        rest = list(deltas)
        assert rest[-1].finish_reason == "cancelled" and rest[-1].completion_tokens < 1000
        assert waiting.result().completion_tokens <= 4
        stats = engine.stats()
        assert stats["cancelled"] == 1 and stats["running"] == 0 and stats["max_batch"] == 1
    finally:
        engine.close()


def test_a_failing_prefill_fails_its_request_only_and_close_answers_everyone(loaded):
    from medgpt.errors import ModelError

    engine = HFEngine(loaded.engine.model, loaded.tokenizer, loaded.stop_ids, max_batch_size=2, batch_wait_ms=0,
                      context_length=loaded.context_length)
    ids = loaded.chat_ids([{"role": "user", "content": QUESTIONS[0]}])
    forward = engine._forward
    engine._forward = lambda *a: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with pytest.raises(ModelError, match="generation failed: RuntimeError: out of memory"):
        engine.submit(ids, greedy(4)).result()
    engine._forward = forward
    assert engine.submit(ids, greedy(4)).result().completion_tokens >= 1  # the engine still serves
    running = iter(engine.submit(ids, greedy(100000)))
    next(running)
    engine.close()  # a request still running when the engine closes is answered, not left hanging
    assert list(running)[-1].finish_reason == "cancelled" and engine.stats()["errors"] == 1


def test_a_registered_engine_is_selectable_with_no_other_change(tmp_path):
    """issue 8: an engine is a declaration; registering one makes serve.engine=<name> valid and load() builds it."""
    from conftest import ROOT, compose

    from medgpt.config import validate
    from medgpt.errors import ConfigError
    from medgpt.serving.engine import ENGINES, Completion, Engine, EngineSpec, register_engine
    from medgpt.serving.loading import load

    class Echo(Engine):
        name = "echo"
        context_length = 64

        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def submit(self, prompt_ids, params, loop=None, adapter=None):
            raise NotImplementedError

        def generate(self, prompts, params):
            return [Completion(self.tokenizer.decode(p[-3:]), "stop", len(p), 3) for p in prompts]

    built = {}

    def build(cfg, artefacts, tokenizer, stop_ids, stop_strings, max_batch_size):
        built.update(model=artefacts.model_path, batch=max_batch_size, stops=stop_strings)
        return Echo(tokenizer)

    cfg = compose(["mode=serve", "model=tiny", f"paths.root={ROOT}", "serve.engine=echo", "serve.max_batch_size=3"])
    with pytest.raises(ConfigError, match="serve.engine='echo' is not one of hf, vllm"):
        validate(cfg)
    register_engine(EngineSpec("echo", build, description="test engine"))
    try:
        validate(cfg)
        loaded = load(cfg)
        assert loaded.engine.name == "echo" and loaded.context_length == 64 and built["batch"] == 3
        assert built["model"].endswith("tiny-v1") and built["stops"] == ("<|im_end|>",)
        ids = loaded.chat_ids([{"role": "user", "content": "hi"}])
        assert loaded.engine.generate([ids], greedy(3))[0].text == loaded.tokenizer.decode(ids[-3:])
    finally:
        ENGINES.pop("echo")
    with pytest.raises(ConfigError, match="serve.engine='echo' is not one of hf, vllm"):
        validate(cfg)
