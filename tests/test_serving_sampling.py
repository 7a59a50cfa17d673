"""The hf engine's batched sampler (medgpt.serving.hf_engine.sample_tokens): every non-greedy row of a batch at once,
with each request's own seed, top-k / top-p / temperature per row, and the repetition penalty."""

from __future__ import annotations

import torch

from medgpt.serving.engine import SamplingParams
from medgpt.serving.hf_engine import _Row, sample_tokens

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))  # a 4-token vocabulary with known probabilities


def row(seed: int, seen=(), **params) -> _Row:
    r = _Row.__new__(_Row)  # the sampler's state only: params, tokens seen, generator
    r.params, r.seen, r.generator = SamplingParams(seed=seed, **params), set(seen), torch.Generator().manual_seed(seed)
    return r


def draws(rows: list[_Row], n: int, logits: torch.Tensor = LOGITS) -> list[list[int]]:
    return [sample_tokens(rows, logits.repeat(len(rows), 1).clone()) for _ in range(n)]


def test_samples_follow_the_softmax_at_temperature_one():
    counts = torch.bincount(torch.tensor([d[0] for d in draws([row(1, temperature=1.0)], 4000)]), minlength=4) / 4000
    assert torch.allclose(counts, LOGITS.exp(), atol=0.03), counts


def test_temperature_top_k_and_top_p_per_row_in_one_batch():
    rows = [row(2, temperature=1.0, top_k=2), row(3, temperature=1.0, top_p=0.6), row(4, temperature=0.05), row(5, temperature=1.0, top_k=1)]
    picked = torch.tensor(draws(rows, 400))
    assert set(picked[:, 0].tolist()) == {0, 1}  # top-k 2: only the two likeliest, both drawn
    assert set(picked[:, 1].tolist()) == {0, 1}  # top-p 0.6: 0.5 alone is short of it, 0.5 + 0.3 reaches it
    share = (picked[:, 1] == 0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.07  # renormalised over what top-p keeps
    assert (picked[:, 2] == 0).float().mean() > 0.99  # a cold temperature concentrates on the likeliest token
    assert set(picked[:, 3].tolist()) == {0}  # top_k=1 is the argmax


def test_a_seed_gives_the_same_tokens_alone_or_batched_with_others():
    alone = [d[0] for d in draws([row(7, temperature=1.0, top_p=0.9)], 30)]
    batched = [d[1] for d in draws([row(8, temperature=1.0), row(7, temperature=1.0, top_p=0.9)], 30)]
    other_seed = [d[0] for d in draws([row(9, temperature=1.0, top_p=0.9)], 30)]
    assert alone == batched and alone != other_seed


def test_repetition_penalty_lowers_the_seen_tokens_before_sampling():
    logits = torch.tensor([2.0, 1.9, -5.0, -5.0])
    plain = [d[0] for d in draws([row(1, temperature=0.0)], 1, logits)]
    penalised = [d[0] for d in draws([row(1, seen={0}, temperature=0.0, repetition_penalty=1.2)], 1, logits)]
    assert plain == [0] and penalised == [1]  # 2.0 / 1.2 < 1.9: the argmax moves to the unseen token
    peaked = torch.tensor([3.0, 0.0, 0.0, 0.0])  # p(0) = e^3 / (e^3 + 3) = 0.87; penalised by 3: e / (e + 3) = 0.475
    share = lambda seen, penalty: (torch.tensor([d[0] for d in draws([row(3, seen=seen, temperature=1.0, repetition_penalty=penalty)],  # noqa: E731
                                                                      400, peaked)]) == 0).float().mean().item()
    assert abs(share(set(), 3.0) - 0.87) < 0.05 and abs(share({0}, 3.0) - 0.475) < 0.07
