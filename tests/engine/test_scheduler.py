"""The scheduler on fake requests (no model): budgets, chunked prefill, preemption and resume, shard
balancing, prefix sharing, forked samples, and that every block comes back."""

from __future__ import annotations

import pytest

from foe.engine.kv_cache import BlockManager
from foe.engine.request import RequestParams, Sequence, SeqStatus
from foe.engine.scheduler import Scheduler, SchedulerConfig


def seq(i: int, n_prompt: int, max_tokens: int = 8, **kw) -> Sequence:
    return Sequence(i, list(range(100 + i, 100 + i + n_prompt)), RequestParams(max_tokens=max_tokens, **kw))


def run_step(s: Scheduler, fake_token: int = 7) -> dict[int, tuple[int, int, int]]:
    """Schedule, 'run' and append one token to every sequence that reached its end; returns
    seq_id -> (start, num_tokens, logits_from)."""
    plan, rows = s.schedule()
    s.update(rows)
    seen = {}
    for shard in plan.shards:
        for r in shard:
            seen[r.seq_id] = (r.start, len(r.token_ids), r.logits_from)
    for r in rows:
        if r.seq.num_computed == r.seq.num_tokens:
            r.seq.output_ids.append(fake_token)
            if len(r.seq.output_ids) >= r.seq.params.max_tokens:
                s.finish(r.seq, "length")
    return seen


def check_blocks_consistent(s: Scheduler) -> None:
    for d, bm in enumerate(s.blocks):
        owned = [b for q in s.running if q.dp_rank == d for b in q.block_ids]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert len(owned) + bm.num_free == bm.num_blocks


def test_chunked_prefill_respects_token_budget_and_decodes_first() -> None:
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=10, num_blocks=100, block_size=4))
    a, b = seq(0, 23), seq(1, 5)
    s.add(a)
    s.add(b)
    assert run_step(s) == {0: (0, 10, 10)}  # a chunk of a's prompt; no logits (not at the end)
    assert run_step(s) == {0: (10, 10, 10)}
    assert run_step(s) == {0: (20, 3, 2), 1: (0, 5, 4)}  # a finishes its prompt; b's whole prompt fits
    assert run_step(s) == {0: (23, 1, 0), 1: (5, 1, 0)}  # both decode
    check_blocks_consistent(s)


def test_max_num_seqs_limits_a_step() -> None:
    s = Scheduler(SchedulerConfig(max_num_seqs=2, num_blocks=100, block_size=4))
    for i in range(3):
        s.add(seq(i, 3))
    assert set(run_step(s)) == {0, 1}
    assert set(run_step(s)) == {0, 1}
    assert [q.seq_id for q in s.waiting] == [2]


def test_preemption_frees_blocks_and_resumes_by_recompute() -> None:
    # 6 blocks of 4 tokens: two sequences of 8 + 8 tokens cannot both finish.
    s = Scheduler(SchedulerConfig(num_blocks=6, block_size=4))
    a, b = seq(0, 8, max_tokens=8), seq(1, 8, max_tokens=8)
    s.add(a)
    s.add(b)
    finished_order = []
    for _ in range(60):
        if not s.has_work:
            break
        run_step(s)
        check_blocks_consistent(s)
        finished_order += [q.seq_id for q in (a, b) if q.is_finished and q.seq_id not in finished_order]
    assert a.is_finished and b.is_finished
    assert s.num_preemptions >= 1 and b.num_preemptions >= 1 and a.num_preemptions == 0  # youngest goes
    assert finished_order == [0, 1]
    assert len(b.output_ids) == 8 and s.blocks[0].num_free == 6


def test_preempted_sequence_recomputes_prompt_and_output() -> None:
    s = Scheduler(SchedulerConfig(num_blocks=4, block_size=4))
    a, b = seq(0, 6, max_tokens=8), seq(1, 4, max_tokens=8)
    s.add(a)
    s.add(b)
    while b.num_preemptions == 0:
        run_step(s)
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and b.block_ids == []
    had = b.num_tokens
    while True:
        seen = run_step(s)
        if 1 in seen:
            break
    # b comes back with one row from position 0 over its prompt and every token it had generated.
    assert seen[1] == (0, had, had - 1)


def test_request_larger_than_the_cache_is_refused() -> None:
    s = Scheduler(SchedulerConfig(num_blocks=2, block_size=4))
    with pytest.raises(ValueError, match="KV cache"):
        s.add(seq(0, 6, max_tokens=4))


def test_expert_parallel_spreads_sequences_over_shards() -> None:
    s = Scheduler(SchedulerConfig(dp_size=3, num_blocks=50, block_size=4))
    seqs = [seq(i, 5) for i in range(7)]
    for q in seqs:
        s.add(q)
    plan, rows = s.schedule()
    assert sorted(len(sh) for sh in plan.shards) == [2, 2, 3]
    assert all(r.seq_id in {q.seq_id for q in seqs if q.dp_rank == d} for d, sh in enumerate(plan.shards) for r in sh)


def test_prompt_logprobs_need_logits_at_every_prompt_position() -> None:
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=4, num_blocks=10, block_size=4))
    a = seq(0, 6, prompt_logprobs=1)
    s.add(a)
    plan, rows = s.schedule()
    assert plan.shards[0][0].logits_from == 0 and plan.shards[0][0].num_logits == 4


def test_prefix_caching_shares_full_blocks_and_releases_them() -> None:
    s = Scheduler(SchedulerConfig(num_blocks=10, block_size=4, enable_prefix_caching=True))
    a = seq(0, 10, max_tokens=5)
    s.add(a)
    run_step(s)
    b = Sequence(1, list(a.prompt_ids[:9]) + [5, 6], RequestParams(max_tokens=2))
    s.add(b)
    seen = run_step(s)
    assert seen[1][0] == 8  # blocks 0-1 (8 tokens) shared, computation starts at position 8
    assert b.block_ids[:2] == a.block_ids[:2] and s.blocks[0].ref_count[a.block_ids[0]] == 2
    while s.has_work:
        run_step(s)
    assert s.blocks[0].num_free == 10


def test_samples_wait_for_the_first_then_share_its_blocks_on_its_shard() -> None:
    s = Scheduler(SchedulerConfig(dp_size=2, num_blocks=20, block_size=4))
    s.add(seq(9, 3))  # shard 0 busy: the first sample goes to shard 1
    run_step(s)
    first = seq(0, 10)
    samples = [Sequence(i, list(first.prompt_ids), first.params) for i in (1, 2, 3)]
    s.add(first)
    for q in samples:
        s.add(q, share_from=first)
    s.finish(samples[2], "abort")  # gone before the fork: takes no block
    assert set(run_step(s)) == {9, 0}  # the samples wait for the first one's prompt
    a, b = samples[:2]
    assert a.block_ids == b.block_ids == first.block_ids[:2] and a.num_computed == 8  # 2 full blocks shared
    assert a.dp_rank == first.dp_rank == 1 and s.blocks[1].ref_count[first.block_ids[0]] == 3
    s.finish(b, "abort")  # gone after the fork, before running: returns its share
    assert run_step(s)[1] == (8, 2, 1)  # a computes the last partial block only
    while s.has_work:
        run_step(s)
    assert [bm.num_free for bm in s.blocks] == [20, 20] and samples[2].block_ids == []


def test_block_manager_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 4)
