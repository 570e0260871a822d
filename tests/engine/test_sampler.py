"""The batched sampler against the distributions it should draw from."""

from __future__ import annotations

import torch

from foe.engine.sampler import SamplingParams, filtered_logprobs, filtered_logprobs_batch, make_generator, sample


def test_batched_filtering_equals_row_by_row() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    params = [SamplingParams(temperature=0.7), SamplingParams(top_k=5), SamplingParams(top_p=0.5),
              SamplingParams(temperature=1.5, top_k=10, top_p=0.8), SamplingParams(top_k=50),
              SamplingParams(temperature=0.0)]
    batch = filtered_logprobs_batch(logits, params)
    for i, p in enumerate(params):
        x = logits[i] / max(p.temperature, 1e-6)
        if 0 < p.top_k < 50:
            x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], float("-inf"))
        if p.top_p < 1:
            sx, idx = torch.sort(x, descending=True)
            pr = sx.softmax(-1)
            drop = (pr.cumsum(-1) - pr) >= p.top_p
            x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
        torch.testing.assert_close(batch[i], x.log_softmax(-1))
        torch.testing.assert_close(filtered_logprobs(logits[i], p), x.log_softmax(-1))
    assert torch.isinf(batch[1]).sum() == 45 and torch.isfinite(batch[4]).all()


def test_draws_follow_the_filtered_distribution() -> None:
    """20k draws per row: every frequency within 5 standard errors of its probability; filtered tokens
    never drawn; greedy rows take the argmax."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]] * 3)
    params = [SamplingParams(temperature=1.0), SamplingParams(top_k=3, temperature=2.0),
              SamplingParams(temperature=0.0)]
    n = 20000
    torch.manual_seed(0)
    draws = torch.stack([sample(logits, params, [None, None, None]) for _ in range(n)])
    for i, p in enumerate(params[:2]):
        probs = filtered_logprobs(logits[i], p).exp()
        freq = torch.bincount(draws[:, i], minlength=5).double() / n
        se = (probs.double() * (1 - probs.double()) / n).sqrt()
        assert ((freq - probs.double()).abs() <= 5 * se + 1e-12).all(), (freq, probs)
    assert (draws[:, 1] < 3).all() and (draws[:, 2] == 0).all()


def test_a_seeded_row_draws_the_same_token_in_any_batch() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 100, generator=g)
    p = SamplingParams(temperature=1.0, seed=3)
    alone = [sample(logits[2:3], [p], [make_generator(3)]).item() for _ in range(2)]
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0), p, SamplingParams(top_p=0.3)]
    batched = sample(logits, others, [None, None, make_generator(3), make_generator(9)])
    assert alone[0] == alone[1] == batched[2].item()
