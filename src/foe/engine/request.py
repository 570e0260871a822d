"""Request state the engine tracks, and the plain-data step plan that crosses process boundaries.

A `Sequence` is one request's life: prompt, generated tokens, how many of them are already in the KV
cache (`num_computed`), the blocks holding them, and the data-parallel shard that owns it. Prefill,
chunked prefill, decode and recompute after preemption are all the same operation: feed the tokens
from `num_computed` on. No torch here except the per-request sampling generator.

`RowPlan`/`StepPlan` are what rank 0 broadcasts each step: pure Python data, so they pickle cheaply.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace

import torch

from foe.engine.sampler import SamplingParams, make_generator


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class RequestParams:
    """Everything about a request except its prompt: sampling, stopping and what to report."""

    sampling: SamplingParams = SamplingParams(temperature=0.0)
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n alternatives per generated token (0: just the chosen one)
    prompt_logprobs: int | None = None  # same for prompt tokens (echo); disables nothing else

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 20:
                raise ValueError(f"{name} must be between 0 and 20, got {v}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    def for_sample(self, i: int) -> RequestParams:
        """Sample i of n from one prompt: a seeded request's sample i uses seed + i (as vLLM does), so
        the samples differ yet each is reproducible on its own."""
        seed = self.sampling.seed
        if seed is None or i == 0:
            return self
        return replace(self, sampling=replace(self.sampling, seed=seed + i))


@dataclass
class TokenLogprob:
    """Log-probability of one token under the model (raw logits, before temperature/top-k/top-p)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: RequestParams
    eos_token_id: int | None = None
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens of `token_ids` whose K/V sit in the cache
    block_ids: list[int] = field(default_factory=list)
    dp_rank: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_preemptions: int = 0
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    # prompt_logprobs[i] scores prompt token i; token 0 has no context, so entry 0 is None.
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    generator: torch.Generator | None = None
    # n > 1: the sample whose prompt blocks this one waits to share (Scheduler.add); None once forked
    share_from: Sequence | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a prompt needs at least one token")
        self.generator = make_generator(self.params.sampling.seed)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Whether prompt positions still need logits (echo): until every prompt token is scored."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)


@dataclass
class RowPlan:
    """One sequence's part of a step: feed `token_ids` at positions start.. with KV in `block_ids`.

    Logits are wanted for chunk positions `logits_from..` (none when logits_from == len(token_ids)).
    """

    seq_id: int
    token_ids: list[int]
    start: int
    block_ids: list[int]
    logits_from: int

    @property
    def num_logits(self) -> int:
        return len(self.token_ids) - self.logits_from


@dataclass
class StepPlan:
    """The rows of every data-parallel shard for one step (shards[d] runs on the ranks of dp shard d)."""

    shards: list[list[RowPlan]]

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for rows in self.shards for r in rows)
