"""The engine against the bare model: greedy outputs equal one-at-a-time `foe.generate.generate` for
staggered requests of many lengths (also under preemption and prefix caching); prompt logprobs equal a
full forward's log-softmax; stop conditions; seeded sampling; n samples of a prompt sharing its blocks."""

from __future__ import annotations

import random

import pytest
import torch

from foe.engine.engine import LLMEngine
from foe.engine.kv_cache import KVPool
from foe.engine.paged_attention import PagedKVCache
from foe.engine.request import RequestParams
from foe.engine.runner import ModelRunner
from foe.engine.sampler import SamplingParams
from foe.engine.scheduler import SchedulerConfig
from foe.generate import generate
from foe.tokenizer import byte_level_tokenizer
from tests.conftest import build, tiny


def random_prompts(n: int, seed: int = 0, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def staggered(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int], seed: int = 0
              ) -> list[list[int]]:
    """Add requests at random steps while the engine runs; returns each request's output ids."""
    rng = random.Random(seed)
    pending = list(range(len(prompts)))
    seqs = {}
    while pending or engine.has_unfinished:
        for _ in range(rng.randint(0, 3)):
            if pending:
                i = pending.pop(0)
                seqs[i] = engine.add_request(prompts[i], RequestParams(max_tokens=max_tokens[i], ignore_eos=True))
        engine.step()
    return [seqs[i].output_ids for i in range(len(prompts))]


@pytest.mark.parametrize("arch,blocks,prefix", [("foe", 64, False), ("moe", 64, False), ("foe", 14, False),
                                                ("foe", 64, True)])
def test_greedy_matches_one_at_a_time_generation(arch: str, blocks: int, prefix: bool) -> None:
    model = build(tiny(arch))
    prompts = random_prompts(14, seed=1)
    if prefix:  # shared prefixes so that blocks are actually reused
        prompts = [prompts[0] + p for p in prompts]
    rng = random.Random(2)
    max_tokens = [rng.randint(1, 12) for _ in prompts]
    ref = [generate(model, [p], n)[0] for p, n in zip(prompts, max_tokens)]
    cfg = SchedulerConfig(num_blocks=blocks, block_size=4, max_num_batched_tokens=24, max_num_seqs=6,
                          enable_prefix_caching=prefix)
    engine = LLMEngine.from_model(model, cfg)
    assert staggered(engine, prompts, max_tokens) == ref
    if blocks == 14:
        assert engine.scheduler.num_preemptions > 0  # the small pool really forced preemption
    if prefix:
        assert engine.scheduler.blocks[0].num_hit_tokens > 0  # cached blocks were really reused
    assert engine.scheduler.blocks[0].num_free == blocks  # every block came back


def test_paged_cache_forward_equals_full_forward() -> None:
    """Chunks written through PagedKVCache into scattered blocks give the full forward's logits."""
    model = build(tiny("foe"))
    x = torch.randint(0, 256, (1, 19))
    runner = ModelRunner(model, num_blocks=12, block_size=4)
    from foe.engine.request import RowPlan
    blocks = [9, 2, 7, 0, 5]  # deliberately out of order
    parts = []
    for start, end in ((0, 6), (6, 13), (13, 19)):
        parts.append(runner.execute([RowPlan(0, x[0, start:end].tolist(), start, blocks, 0)]))
    torch.testing.assert_close(torch.cat(parts), model(x).logits[0], atol=1e-5, rtol=1e-4)
    assert isinstance(KVPool.for_model(model, 1, 4), KVPool) and PagedKVCache


def test_float64_engine_equals_generate_and_the_full_forward() -> None:
    """A float64 model serves in float64: its KV pool, the logits it samples from (no float32 detour),
    paged-cache logits equal to the full forward's to 1e-12, and greedy tokens equal to `generate`'s."""
    model = build(tiny("foe")).double()
    runner = ModelRunner(model, num_blocks=8, block_size=4)
    from foe.engine.request import RowPlan
    x = torch.randint(0, 256, (1, 11))
    chunks = ((0, 6), (6, 11))
    logits = torch.cat([runner.execute([RowPlan(0, x[0, a:b].tolist(), a, [5, 1, 3], 0)]) for a, b in chunks])
    assert runner.pool.k.dtype == logits.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x).logits[0], rtol=0, atol=1e-12)
    prompts = random_prompts(6, seed=4)
    max_tokens = [3 + i for i in range(len(prompts))]
    ref = [generate(model, [p], n)[0] for p, n in zip(prompts, max_tokens)]
    cfg = SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=24, max_num_seqs=4)
    assert staggered(LLMEngine.from_model(model, cfg), prompts, max_tokens) == ref


def test_bf16_engine_keeps_bf16_kv_and_samples_from_float32_logits() -> None:
    runner = ModelRunner(build(tiny("moe")).to(torch.bfloat16), num_blocks=4, block_size=4)
    from foe.engine.request import RowPlan
    logits = runner.execute([RowPlan(0, [1, 2, 3], 0, [0], 0)])
    assert runner.pool.k.dtype == torch.bfloat16 and logits.dtype == torch.float32 and logits.isfinite().all()


def test_prompt_logprobs_match_full_forward_log_softmax() -> None:
    model = build(tiny("moe"))
    prompts = random_prompts(3, seed=3, lo=5, hi=30)
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=7))
    seqs = [engine.add_request(p, RequestParams(max_tokens=0, prompt_logprobs=2)) for p in prompts]
    while engine.has_unfinished:
        engine.step()
    for p, s in zip(prompts, seqs):
        assert s.output_ids == [] and s.finish_reason == "length"
        with torch.no_grad():
            lp = model(torch.tensor([p])).logits[0].log_softmax(-1)
        assert s.prompt_logprobs[0] is None and len(s.prompt_logprobs) == len(p)
        got = torch.tensor([e.logprob for e in s.prompt_logprobs[1:]])
        torch.testing.assert_close(got, lp[torch.arange(len(p) - 1), torch.tensor(p[1:])], atol=1e-5, rtol=1e-5)
        top = s.prompt_logprobs[1].top
        assert [t for t, _ in top] == lp[0].topk(2).indices.tolist()


def test_generated_logprobs_are_the_models() -> None:
    model = build(tiny("foe"))
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=32, block_size=4))
    p = [3, 1, 4, 1, 5]
    s = engine.add_request(p, RequestParams(max_tokens=4, logprobs=3, ignore_eos=True))
    while engine.has_unfinished:
        engine.step()
    with torch.no_grad():
        full = model(torch.tensor([p + s.output_ids])).logits[0].log_softmax(-1)
    for i, e in enumerate(s.output_logprobs):
        row = full[len(p) - 1 + i]
        assert e.token_id == s.output_ids[i] == int(row.argmax())
        assert abs(e.logprob - float(row[e.token_id])) < 1e-5 and len(e.top) == 3


def test_stop_token_ids_eos_and_ignore_eos() -> None:
    model = build(tiny("foe"))
    tok = byte_level_tokenizer()
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=64, block_size=4), tok)
    p = [10, 20, 30]
    free = engine.generate([p], RequestParams(max_tokens=10, ignore_eos=True))[0]
    stop_at = free[3]
    s = engine.add_request(p, RequestParams(max_tokens=10, stop_token_ids=(stop_at,)))
    while engine.has_unfinished:
        engine.step()
    assert s.output_ids == free[:free.index(stop_at) + 1] and s.finish_reason == "stop"
    # The same token as EOS stops generation unless ignore_eos.
    engine.eos_token_id = stop_at
    assert engine.generate([p], RequestParams(max_tokens=10))[0] == free[:free.index(stop_at) + 1]
    assert engine.generate([p], RequestParams(max_tokens=10, ignore_eos=True))[0] == free


def test_stop_strings_cut_the_text_and_stream_in_order() -> None:
    model = build(tiny("foe"))
    tok = byte_level_tokenizer()
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=64, block_size=4), tok)
    p = list(b"The cat")
    ids = engine.generate([p], RequestParams(max_tokens=12, ignore_eos=True))[0]
    text = tok.decode(ids)
    stop = text[4:6]
    seq = engine.add_request(p, RequestParams(max_tokens=12, ignore_eos=True, stop=(stop,)))
    deltas = []
    while engine.has_unfinished:
        deltas += [o.new_text for o in engine.step() if o.seq is seq]
    assert "".join(deltas) == text[:text.index(stop)] and seq.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_matches_generate() -> None:
    model = build(tiny("foe"))
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=11)
    prompts = random_prompts(4, seed=5)
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=64, block_size=4))
    outs = engine.generate(prompts, RequestParams(params, max_tokens=8, ignore_eos=True))
    assert outs == [generate(model, [p], 8, params)[0] for p in prompts]
    other = engine.generate(prompts[:1], RequestParams(SamplingParams(temperature=0.8, seed=12), max_tokens=8))
    assert other[0] != outs[0]


@pytest.mark.parametrize("blocks,prefix_caching", [(64, False), (64, True), (12, False)])
def test_samples_share_the_prompt_and_equal_separate_requests(blocks: int, prefix_caching: bool) -> None:
    model = build(tiny("foe"))
    prompt = random_prompts(1, seed=4, lo=21, hi=21)[0]
    max_tokens = 6 if blocks == 64 else 20  # 12 blocks: not enough for 3 samples of 41 tokens
    params = RequestParams(SamplingParams(temperature=1.0, seed=5), max_tokens=max_tokens, ignore_eos=True)
    cfg = SchedulerConfig(num_blocks=blocks, block_size=4, enable_prefix_caching=prefix_caching)
    engine = LLMEngine.from_model(model, cfg)
    fed: list[int] = []
    execute = engine.executor.execute
    engine.executor.execute = lambda plan: fed.append(plan.num_tokens) or execute(plan)
    seqs = engine.add_samples(prompt, params, 3)
    while engine.has_unfinished:
        engine.step()
    separate = [LLMEngine.from_model(model, cfg).generate([prompt], params.for_sample(i))[0] for i in range(3)]
    assert [s.output_ids for s in seqs] == separate and len({tuple(x) for x in separate}) == 3
    if blocks == 12:
        assert engine.scheduler.num_preemptions > 0
    else:  # the prompt (5 full blocks + 1 token) ran once; the other samples computed only its last token
        assert sum(fed) == 21 + 2 * 1 + 3 * (max_tokens - 1)  # then decodes (the last token is not fed)
    assert engine.scheduler.blocks[0].num_free == blocks


def test_bad_requests_are_refused() -> None:
    model = build(tiny("foe"))
    engine = LLMEngine.from_model(model, SchedulerConfig(num_blocks=64, block_size=4))
    with pytest.raises(ValueError, match="context"):
        engine.add_request([1] * 250, RequestParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], RequestParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([1, 999], RequestParams())
    with pytest.raises(ValueError, match="max_tokens"):
        RequestParams(max_tokens=-1)


def test_a_mixed_step_is_one_packed_forward() -> None:
    """A prompt chunk and a decode in one step: one packed forward, each row's logits as when run alone."""
    from foe.engine.request import RowPlan, StepPlan
    model = build(tiny("moe"))
    runner = ModelRunner(model, num_blocks=16, block_size=4)
    runner.execute([RowPlan(1, list(range(9)), 0, [1, 2, 3], 8)])  # context for the decode row
    mixed = runner.execute_plan(StepPlan([[RowPlan(0, list(range(20)), 0, [4, 5, 6, 7, 8], 18),
                                           RowPlan(1, [5], 9, [1, 2, 3], 0)]]))
    alone = runner.execute([RowPlan(1, [5], 9, [1, 2, 3], 0)])
    with torch.no_grad():
        full = model(torch.tensor([list(range(20))])).logits[0, 18:]
    torch.testing.assert_close(mixed[:2], full, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mixed[2:], alone, atol=1e-5, rtol=1e-4)
