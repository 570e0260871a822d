"""Continuous batching: which tokens of which sequences run in the next step. Pure CPU, no torch.distributed.

Every step, per data-parallel shard, with a budget of `max_num_batched_tokens` tokens and
`max_num_seqs` sequences:
1. Running sequences first, oldest first: each gets its uncomputed tokens (1 when decoding; a chunk of
   the prompt when prefilling, cut to the remaining budget: chunked prefill). If the shard's pool has no
   block for them, the youngest running sequence is preempted (its blocks freed, it goes back to the
   front of the waiting queue and is later recomputed from its prompt plus what it generated so far).
2. Then waiting sequences, first come first served, while budget, sequence slots and blocks last. A
   new sequence goes to the shard with the fewest running sequences (expert parallelism: spread the
   load), and first shares any cached prefix blocks.

Samples 2..n of one prompt (OpenAI's `n`) wait until the first sample has computed the prompt's full
blocks, then fork: they share those blocks by reference on its shard and compute only the last partial
block (as a prefix-cache hit does; each sample needs the last prompt token's logits). If the first
sample stops running before that (preempted, aborted), they compute the prompt themselves.

A sequence needs logits when the chunk reaches its last token (and at every prompt position when it
asked for prompt logprobs). The scheduler never looks at logits: `update` only advances counters
after the engine has appended the sampled tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from foe.engine.kv_cache import BlockManager
from foe.engine.request import RowPlan, Sequence, SeqStatus, StepPlan


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # per shard and step
    max_num_batched_tokens: int = 512  # per shard and step (the chunked-prefill budget)
    num_blocks: int = 512  # per shard
    block_size: int = 16
    dp_size: int = 1
    enable_prefix_caching: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_blocks", "block_size", "dp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ScheduledRow:
    seq: Sequence
    num_tokens: int


class Scheduler:
    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.blocks = [BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
                       for _ in range(cfg.dp_size)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order = priority order
        self.num_preemptions = 0
        self.forks: dict[int, list[Sequence]] = {}  # seq id -> samples waiting to share its prompt blocks

    # ---- queue management -------------------------------------------------------------------------
    def add(self, seq: Sequence, share_from: Sequence | None = None) -> None:
        """Queue a sequence; share_from: an earlier sample of the same prompt whose blocks it may share."""
        max_tokens = self.cfg.num_blocks * self.cfg.block_size
        if seq.num_tokens + seq.params.max_tokens > max_tokens:
            raise ValueError(f"request needs {seq.num_tokens + seq.params.max_tokens} tokens of KV cache; "
                             f"a shard holds {max_tokens}")
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        # samples that score the prompt (echo) compute it themselves, as with prefix caching
        if (share_from is not None and not share_from.is_finished and self._shared_tokens(seq)
                and not seq.wants_prompt_logprobs):
            seq.share_from = share_from
            self.forks.setdefault(share_from.seq_id, []).append(seq)

    def _shared_tokens(self, seq: Sequence) -> int:
        """Prompt tokens a fork shares: the full blocks before the last prompt token."""
        return (len(seq.prompt_ids) - 1) // self.cfg.block_size * self.cfg.block_size

    def _fork(self, src: Sequence) -> None:
        """`src` has computed its prompt's full blocks: the samples waiting on it share them."""
        for seq in self.forks.pop(src.seq_id):
            seq.share_from = None
            if not seq.is_finished:  # aborted while waiting
                seq.dp_rank = src.dp_rank
                seq.num_computed = self.blocks[src.dp_rank].share(src, seq, self._shared_tokens(seq))

    def _release_forks(self, src: Sequence) -> None:
        """`src` stops running before forking: its waiting samples compute the prompt themselves."""
        for seq in self.forks.pop(src.seq_id, ()):
            seq.share_from = None

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark finished (stop, length, abort) and free its blocks, wherever it is."""
        self._release_forks(seq)
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.blocks[seq.dp_rank].release(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
            self.blocks[seq.dp_rank].release(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def usage(self) -> float:
        return sum(b.usage for b in self.blocks) / len(self.blocks)

    # ---- one step ---------------------------------------------------------------------------------
    def schedule(self) -> tuple[StepPlan, list[ScheduledRow]]:
        cfg = self.cfg
        budget = [cfg.max_num_batched_tokens] * cfg.dp_size
        seats = [cfg.max_num_seqs] * cfg.dp_size
        rows: list[ScheduledRow] = []
        preempted: set[int] = set()

        for seq in list(self.running):
            if seq.seq_id in preempted:
                continue
            d = seq.dp_rank
            if budget[d] == 0 or seats[d] == 0:
                continue
            n = min(seq.num_uncomputed, budget[d])
            while not self.blocks[d].grow(seq, seq.num_computed + n):
                victim = next(s for s in reversed(self.running) if s.dp_rank == d)
                self._preempt(victim)
                preempted.add(victim.seq_id)
                if victim is seq:
                    break
            if seq.seq_id in preempted:
                continue
            rows.append(ScheduledRow(seq, n))
            budget[d] -= n
            seats[d] -= 1

        # No admissions in a step that preempted: the freed blocks go to the running sequences first.
        while self.waiting and not preempted:
            seq = self.waiting[0]
            if seq.share_from is not None:  # a sample waiting to fork (its first sample is running)
                break
            d = self._pick_shard(seq, budget, seats)
            if d is None:
                break
            self.waiting.popleft()
            seq.dp_rank, seq.status = d, SeqStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget[d])
            self.blocks[d].grow(seq, seq.num_computed + n)
            rows.append(ScheduledRow(seq, n))
            budget[d] -= n
            seats[d] -= 1

        plan = StepPlan([[] for _ in range(cfg.dp_size)])
        for r in rows:
            plan.shards[r.seq.dp_rank].append(self._row_plan(r))
        return plan, rows

    def _pick_shard(self, seq: Sequence, budget: list[int], seats: list[int]) -> int | None:
        """The least-loaded shard that can take the sequence's first chunk now, else None. A fork
        already holds blocks: only its own shard will do."""
        forked = bool(seq.block_ids)
        for d in [seq.dp_rank] if forked else self._shards_by_load():
            if budget[d] == 0 or seats[d] == 0:
                continue
            bm = self.blocks[d]
            if not forked:
                seq.num_computed = bm.match_prefix(seq)
            n = min(seq.num_uncomputed, budget[d])
            if bm.grow(seq, seq.num_computed + n):
                return d
            if not forked:
                bm.release(seq)
                seq.num_computed = 0
        return None

    def _shards_by_load(self) -> list[int]:
        load = [0] * self.cfg.dp_size
        for s in self.running:
            load[s.dp_rank] += 1
        return sorted(range(self.cfg.dp_size), key=lambda d: (load[d], -self.blocks[d].num_free))

    def _row_plan(self, r: ScheduledRow) -> RowPlan:
        seq, n = r.seq, r.num_tokens
        start = seq.num_computed
        end = start + n
        if end < seq.num_tokens:  # a prefill chunk that does not reach the end: no token to sample
            logits_from = n
        else:
            logits_from = n - 1
        if seq.wants_prompt_logprobs:
            # Logits at position p score token p + 1: all prompt positions from the first unscored one.
            first = len(seq.prompt_logprobs) - 1
            logits_from = min(logits_from, max(first - start, 0))
        return RowPlan(seq.seq_id, seq.token_ids[start:end], start, list(seq.block_ids), logits_from)

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption: drop the KV, requeue at the front; prompt + output is refed later."""
        self._release_forks(seq)
        self.running.remove(seq)
        self.blocks[seq.dp_rank].release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, rows: list[ScheduledRow]) -> None:
        """After the step ran: the scheduled tokens are now in the cache."""
        for r in rows:
            r.seq.num_computed += r.num_tokens
            if not r.seq.is_finished:
                self.blocks[r.seq.dp_rank].register_computed(r.seq)
                if r.seq.seq_id in self.forks and r.seq.num_computed >= self._shared_tokens(r.seq):
                    self._fork(r.seq)
