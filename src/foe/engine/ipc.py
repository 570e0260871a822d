"""The messages between the API process and the engine core.

They travel over one duplex `multiprocessing` connection (a Unix socketpair; pickled). The core sends one
`StepOutputs` per step with every request's new token ids and logprobs (no text: detokenisation and stop
strings are the API process's, see output.py), so a step of 64 decoding sequences is one small message.
Per-step items are NamedTuples, which pickle as plain tuples (cheaper than dataclasses).

API -> core: AddRequest, Abort, AbortAll, Shutdown.
core -> API: Ready (once, after the model is built) or StartupFailed, then Accepted/Refused (one per
AddRequest, in order), StepOutputs, and CoreDead when the engine can no longer run (a worker rank died,
a step raised). The channel's EOF means the other side has gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from foe.engine.request import RequestParams, TokenLogprob


@dataclass(frozen=True)
class EngineInfo:
    """What the API process needs to know of the engine to check requests."""

    max_seq_len: int
    vocab_size: int


# ---- API -> core ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class AddRequest:
    """n samples of one prompt (`LLMEngine.add_samples`); rid: the API's key for the Accepted/Refused reply."""

    rid: int
    prompt_ids: list[int]
    params: RequestParams
    n: int


@dataclass(frozen=True)
class Abort:
    seq_ids: tuple[int, ...]


@dataclass(frozen=True)
class AbortAll:
    """End every request now, as finished with reason "abort" (a server that must stop)."""


@dataclass(frozen=True)
class Shutdown:
    """Stop the engine (and its worker ranks) and exit."""


# ---- core -> API ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ready:
    info: EngineInfo


@dataclass(frozen=True)
class StartupFailed:
    error: BaseException  # re-raised in the API process (a ValueError or ConnectionError keeps its type)


@dataclass(frozen=True)
class Accepted:
    rid: int
    seq_ids: tuple[int, ...]


@dataclass(frozen=True)
class Refused:
    rid: int
    message: str  # a ValueError's: the request can never run (too long, bad token ids)


class CoreDelta(NamedTuple):
    """What one step added to one sequence. finish_reason: "stop" (a stop token), "length" or "abort";
    stop strings are found in the API process. prompt_logprobs: sent once, with the sequence's first delta."""

    seq_id: int
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    prompt_logprobs: list[TokenLogprob | None] | None


class EngineStats(NamedTuple):
    running: int
    waiting: int
    kv_usage: float
    preemptions: int


@dataclass(frozen=True)
class StepOutputs:
    deltas: list[CoreDelta]
    stats: EngineStats


@dataclass(frozen=True)
class CoreDead:
    reason: str
